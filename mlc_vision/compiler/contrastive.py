"""Contrastive libraries: ``encode_text`` (and the image side's pooled ``encode``) of CLIP, SigLIP, EVA-CLIP.

``--part text`` builds ``encode_text(input_ids, attention_mask, params)``:
``int32 [batch, length]`` each, ``batch`` and ``length`` symbolic
(``length`` <= ``max_position_embeddings``, checked by the runtime), returning
``[batch, projection_dim]``, the unnormalized text embedding (transformers'
``get_text_features``). ``--part both`` adds ``encode`` with
``feature="pooled"``: ``[batch, 1, projection_dim]``, the image embedding.
The metadata's ``text`` entry says how to tokenize (padding, maximum length,
pad id) and how the logits are made (``softmax``: CLIP, EVA; ``sigmoid``:
SigLIP); ``logit_scale`` (and ``logit_bias``) are float32 params.

Targets: the CPU only, for now. On CUDA, dlight's matmul rule cannot
schedule the masked attention-score matmul (its cast/scale/mask epilogue is
not inlined: "consumers of the cache-write stage that are not properly
inlined"); the text attention needs the split/fused attention path the
vision towers take on GPUs, with an additive mask, before GPU targets can be
offered.
"""

from __future__ import annotations

import dataclasses

from tvm.relax.frontend import nn

from ..config import VisionConfig
from ..errors import MlcVisionError
from ..models.text import TextConfig, TextModel
from .module import (
    BATCH,
    BuiltModule,
    add_metadata_function,
    build_vision_model,
    compute_dtype,
    make_metadata,
    prepack_metadata,
)
from .targets import cpu_spec, resolve_attention, resolve_gemm

PARTS = ("vision", "text", "both")
CONTRASTIVE_TARGETS = ("cpu",)
LENGTH = "length"


class _Contrastive(nn.Module):
    """The entries of a contrastive library; parameters named as in the params dir once the prefix is stripped."""

    def __init__(self, model: nn.Module | None, text: TextModel):
        self.model = model
        self.text = text

    def encode(self, pixel_values: nn.Tensor) -> nn.Tensor:
        return self.model(pixel_values)

    def encode_text(self, input_ids: nn.Tensor, attention_mask: nn.Tensor) -> nn.Tensor:
        return self.text(input_ids, attention_mask)


def text_metadata(text: TextConfig, dtype: str) -> dict:
    """What a runtime needs to tokenize, call ``encode_text`` and turn embeddings into probabilities."""
    style = text.style
    return {
        "config": text.to_dict(),
        "max_length": text.max_position_embeddings,
        "padding": style.padding,
        "pad_token_id": text.pad_token_id,
        "pooling": text.pooling,
        "causal": style.causal,
        "logits": style.logits,
        "projection_dim": text.projection_dim,
        "entry": {
            "inputs": [
                {"name": "input_ids", "shape": [BATCH, LENGTH], "dtype": "int32"},
                {"name": "attention_mask", "shape": [BATCH, LENGTH], "dtype": "int32",
                 "layout": "1 = token, 0 = padding"},
            ],
            "output": {"shape": [BATCH, text.projection_dim], "dtype": dtype},
        },
    }


def build_contrastive_module(
    vision: VisionConfig, text: TextConfig, dtype: str, target: str, part: str, attention: str | None = None,
    gemm: str | None = None, cpu: str | None = None,
) -> BuiltModule:
    """``encode_text`` (``part="text"``) or ``encode`` (pooled) + ``encode_text`` (``part="both"``)."""
    if part not in ("text", "both"):
        raise MlcVisionError(f"a contrastive library is part 'text' or 'both', got {part!r}")
    if text.family != vision.family:
        raise MlcVisionError(f"text tower of family {text.family!r} with a {vision.family!r} vision tower")
    if target not in CONTRASTIVE_TARGETS:
        raise MlcVisionError(
            f"contrastive libraries (--part text|both) build for {', '.join(CONTRASTIVE_TARGETS)} only, not {target!r} "
            "(the masked text attention has no GPU schedule yet)"
        )
    if compute_dtype(target, dtype) != dtype:
        raise MlcVisionError(f"{dtype} contrastive libraries are not supported on {target}; use float32")
    attention = resolve_attention(target, dtype, attention)
    if part == "both":
        vision = dataclasses.replace(vision, feature="pooled", projector=None, projector_hidden_size=None)
    model = build_vision_model(vision, dtype) if part == "both" else None
    options = {"param_mode": "packed", "effect_mode": "none"}
    ids = nn.spec.Tensor([BATCH, LENGTH], "int32")
    spec = {"encode_text": {"input_ids": ids, "attention_mask": ids, "$": options}}
    if part == "both":
        size = vision.image_size
        pixels = nn.spec.Tensor([BATCH, vision.num_channels, size, size], dtype)
        spec["encode"] = {"pixel_values": pixels, "$": options}
    mod, named = _Contrastive(model, TextModel(text).cast(dtype)).export_tvm(spec=spec)
    params = [
        {"name": _strip(name), "shape": [int(s) for s in p.shape], "dtype": str(p.dtype)} for name, p in named
    ]
    metadata = make_metadata(vision, dtype, target, params, False)
    if part == "text":
        metadata["entries"] = {}
    else:
        metadata["entries"] = {"encode": metadata["entries"]["encode"]}
    metadata["entries"]["encode_text"] = text_metadata(text, dtype)["entry"]
    metadata.update(part=part, text=text_metadata(text, dtype), attention=attention, gemm=resolve_gemm(target, dtype, gemm))
    if target == "cpu":
        metadata["cpu"] = cpu_spec(cpu)
        metadata["prepack"] = prepack_metadata(dtype, metadata["cpu"], metadata["entries"])
    return BuiltModule(mod=add_metadata_function(mod, metadata), metadata=metadata)


def _strip(name: str) -> str:
    for prefix in ("model.", "text."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name

