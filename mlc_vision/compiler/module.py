"""From a VisionConfig to an IRModule with ``encode``, ``encode_rgb8`` and ``_metadata``.

Nothing here needs weights, a GPU or the network: parameters are arguments
(one packed tuple), described in the metadata by name, shape and dtype.

``encode_rgb8`` takes the resized image as bytes (``uint8 [batch, H, W, 3]``,
the layout image decoders give) and does the rescale, normalization and
NHWC -> NCHW transpose in the graph, so a chat runtime only has to resize.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from .. import __version__
from ..config import DTYPES, IMAGE_NEWLINE_PARAM, VisionConfig
from ..errors import MlcVisionError
from ..models import get_family
from ..models import projector as projectors
from .native import PATCHES, TOKENS, native_metadata, native_spec
from .kernels.cpu_f32_gemm import uses_f32_kernel
from .passes.bf16_cpu import bf16_interface
from .passes.f32_cpu import PREPACK_FUNCTION, PREPACKED_SUFFIX
from .targets import cpu_spec, resolve_attention, resolve_gemm

BATCH = "batch"


@dataclass(frozen=True)
class BuiltModule:
    mod: tvm.IRModule
    metadata: dict


def build_vision_model(config: VisionConfig, dtype: str, full: bool = False) -> nn.Module:
    """The family's Relax module with parameters in ``dtype``."""
    if dtype not in DTYPES:
        raise MlcVisionError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    model = get_family(config.family).module(config, full=full)
    model.to(dtype)
    return model


def build_projector(config: VisionConfig, dtype: str) -> nn.Module | None:
    """The projector compiled after feature selection, or None when ``config.projector`` is unset."""
    if config.projector is None:
        return None
    projector = projectors.Projector(config)
    projector.to(dtype)
    return projector


def output_width(config: VisionConfig) -> int:
    if config.projector:
        return config.projector_hidden_size
    if config.feature == "pooled" and config.projection_dim:
        return config.projection_dim
    return config.hidden_size


def projector_metadata(config: VisionConfig) -> dict | None:
    if config.projector is None:
        return None
    meta = {
        "type": config.projector,
        "input_tokens": config.tokens.selected,
        "input_width": config.hidden_size,
        "output_tokens": config.tokens.output,
        "hidden_size": config.projector_hidden_size,
    }
    if config.projector == "mlp1":
        meta["downsample_ratio"] = config.downsample_ratio
    if config.projector == "two_mlp":
        meta.update(query_tokens=config.qllama.num_query_tokens, query_width=config.qllama.hidden_size,
                    order="the projected query outputs, then the projected patch features")
    return meta


class _Exported(nn.Module):
    """Wraps a family model so that its entry points have the names of the calling convention."""

    def __init__(self, model: nn.Module, projector: nn.Module | None, config: VisionConfig, dtype: str):
        self.model = model
        self.projector = projector
        self.preprocess = config.preprocess
        self.dtype = dtype

    def encode(self, pixel_values: nn.Tensor):
        """The features (projected when a projector is compiled in), or the model's tuple of outputs."""
        outputs = self.model(pixel_values)
        if self.projector is None:
            return outputs
        return self.projector(*outputs) if isinstance(outputs, tuple) else self.projector(outputs)

    def encode_rgb8(self, pixels: nn.Tensor) -> nn.Tensor:
        return self.encode(normalize_rgb8(pixels, self.preprocess, self.dtype))

    def hidden_states(self, pixel_values: nn.Tensor):
        return tuple(self.model.hidden_states(pixel_values))


class _NativeExported(nn.Module):
    """A native-resolution tower's entries: per-patch inputs (compiler/native.py), no ``encode_rgb8``.

    The nn exporter binds the spec's inputs by the entry's parameter names, hence
    one signature per input list (:class:`_WindowedExported` adds the windows).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def encode(self, patches, position_ids, image_ids) -> nn.Tensor:
        return self.model(patches, position_ids, image_ids)

    def hidden_states(self, patches, position_ids, image_ids):
        return tuple(self.model.hidden_states(patches, position_ids, image_ids))


class _WindowedExported(_NativeExported):
    def encode(self, patches, position_ids, image_ids, window_ids, window_index) -> nn.Tensor:
        return self.model(patches, position_ids, image_ids, window_ids, window_index)

    def hidden_states(self, patches, position_ids, image_ids, window_ids, window_index):
        return tuple(self.model.hidden_states(patches, position_ids, image_ids, window_ids, window_index))


def build_module(
    config: VisionConfig,
    dtype: str,
    target: str,
    expose_hidden_states: bool = False,
    attention: str | None = None,
    gemm: str | None = None,
    cpu: str | None = None,
) -> BuiltModule:
    """Export the encoder as an IRModule and describe it in the metadata.

    ``attention`` (``None``: the target's default for ``dtype``) is checked
    against the target here, so a combination it cannot build fails before
    any work; the metadata records it and ``export.build_library`` compiles
    with it. ``gemm`` (the matmul schedule, ``None``: the default) likewise.
    ``cpu`` (target ``cpu`` only; None: this machine's CPU) is
    recorded the same way, with the instruction sets the library needs.
    """
    if cpu is not None and target != "cpu":
        raise MlcVisionError(f"--cpu is only for the cpu target, not {target!r}")
    attention = resolve_attention(target, dtype, attention)
    gemm = resolve_gemm(target, dtype, gemm)
    compute = compute_dtype(target, dtype)
    if get_family(config.family).native_resolution:
        return build_native_module(config, dtype, target, expose_hidden_states, attention, gemm, cpu)
    model = build_vision_model(config, compute)
    projector = build_projector(config, compute)
    size = config.image_size
    options = {"param_mode": "packed", "effect_mode": "none"}
    pixel_spec = nn.spec.Tensor([BATCH, config.num_channels, size, size], compute)
    method = {"pixel_values": pixel_spec, "$": options}
    spec = {"encode": method, "encode_rgb8": {"pixels": nn.spec.Tensor(rgb8_shape(config), "uint8"), "$": options}}
    if expose_hidden_states:
        spec["hidden_states"] = dict(method)
    # The wrapper's parameters are the model's, prefixed with "model." (strip it), then
    # the projector's, already named "projector.*" as in the params dir.
    mod, named_params = _Exported(model, projector, config, compute).export_tvm(spec=spec)
    if compute != dtype:
        mod = bf16_interface(mod)  # bf16 in and out, fp32 inside (bf16 matmuls: compiler/passes/bf16_cpu.py)
    params = [
        {"name": name.removeprefix("model."), "shape": [int(s) for s in p.shape],
         "dtype": dtype if str(p.dtype) == compute else str(p.dtype)}
        for name, p in named_params
    ]  # fmt: skip
    metadata = make_metadata(config, dtype, target, params, expose_hidden_states)
    metadata["attention"] = attention
    metadata["gemm"] = gemm
    if target == "cpu":
        metadata["cpu"] = cpu_spec(cpu)
        metadata["prepack"] = prepack_metadata(dtype, metadata["cpu"], metadata["entries"])
    if compute != dtype:
        metadata["compute"] = {
            "matmul": "bfloat16 x bfloat16 -> float32",
            "other": compute,
            # the C GEMM picks its instructions when it runs: none of them is required
            "bf16_gemm_paths": ["amx-bf16", "avx512bf16", "generic"],
        }
    mod = add_metadata_function(mod, metadata)
    return BuiltModule(mod=mod, metadata=metadata)


def build_native_module(config, dtype, target, expose_hidden_states, attention, gemm, cpu) -> BuiltModule:
    """:func:`build_module` for a native-resolution family: symbolic patch count, per-patch inputs."""
    if compute_dtype(target, dtype) != dtype:
        raise MlcVisionError(f"{config.family} libraries are built in float32 or float16 on the CPU, not {dtype}")
    model = build_vision_model(config, dtype)
    method = native_spec(config, dtype, {"param_mode": "packed", "effect_mode": "none"})
    spec = {"encode": method}
    if expose_hidden_states:
        spec["hidden_states"] = dict(method)
    wrapper = _WindowedExported(model) if config.window_size else _NativeExported(model)
    mod, named_params = wrapper.export_tvm(spec=spec)
    params = [
        {"name": name.removeprefix("model."), "shape": [int(s) for s in p.shape], "dtype": str(p.dtype)}
        for name, p in named_params
    ]
    native = native_metadata(config, dtype)
    output = {"shape": [TOKENS, config.merger_hidden_size], "dtype": dtype}
    entries = {"encode": {"inputs": native["inputs"], "output": output}}
    if expose_hidden_states:
        entries["hidden_states"] = {"inputs": native["inputs"], "output": f"tuple of [{PATCHES}, hidden] in window order"}
    metadata = {
        "mlc_vision_version": __version__,
        "family": config.family,
        "preset": config.preset,
        "config": config.to_dict(),
        "patch_size": config.patch_size,
        "tokens": None,
        "num_tokens": None,
        "output_width": config.merger_hidden_size,
        "hidden_size": config.hidden_size,
        "dtype": dtype,
        "target": target,
        "select_layer": config.select_layer,
        "feature": config.feature,
        "projector": None,
        "preprocess": config.preprocess.to_dict(),
        "tiling": None,
        "native_resolution": native,
        "entries": entries,
        "params": params,
        "attention": attention,
        "gemm": gemm,
    }
    if target == "cpu":
        metadata["cpu"] = cpu_spec(cpu)
        metadata["prepack"] = prepack_metadata(dtype, metadata["cpu"], entries)
    return BuiltModule(mod=add_metadata_function(mod, metadata), metadata=metadata)


def prepack_metadata(dtype: str, cpu: dict, entries) -> dict | None:
    """How a runtime packs the weights once (an fp32 CPU library whose linear layers call the C
    GEMM), else None: ``{"function": "prepack_params", "entries": {"encode": "encode_prepacked", ...}}``.

    ``prepacked = function(params)`` once after loading the params; then each entry's twin is called
    with ``prepacked`` where the entry takes ``params``, and computes the same. The entries
    themselves stay as they are (a runtime may ignore this and call them with ``params``).
    """
    if dtype != "float32" or not uses_f32_kernel("cpu", cpu.get("features")):
        return None
    return {"function": PREPACK_FUNCTION, "entries": {name: name + PREPACKED_SUFFIX for name in entries}}


def compute_dtype(target: str, dtype: str) -> str:
    """The dtype the graph computes in: a bf16 CPU library computes in fp32 except its matmuls."""
    return "float32" if target == "cpu" and dtype == "bfloat16" else dtype


def encode_outputs(config: VisionConfig, dtype: str) -> list[dict]:
    """What ``encode`` returns, in order: the features, then (InternVL-14B) QLLaMA's query outputs.

    One output is returned as a tensor, several as a tuple in this order
    (docs/internals.md, "Calling convention").
    """
    outputs = [{"name": "features", "shape": [BATCH, config.tokens.output, output_width(config)], "dtype": dtype}]
    # pooled: InternVL-C/G's one image embedding; two_mlp joins both outputs into one
    if config.qllama is not None and config.feature != "pooled" and config.projector is None:
        q = config.qllama
        outputs.append({"name": "query_outputs", "shape": [BATCH, q.num_query_tokens, q.hidden_size], "dtype": dtype})
    return outputs


def _entry(inputs: list[dict], outputs: list[dict]) -> dict:
    """An entry's description: ``output`` is the first output (the features), ``outputs`` all of them, named."""
    first = {key: value for key, value in outputs[0].items() if key != "name"}
    return {"inputs": inputs, "output": first, "outputs": outputs}


def hidden_states_description(config: VisionConfig) -> str:
    if config.qllama is None:
        return "tuple of [batch, tokens, hidden]"
    return (
        f"tuple of the tower's {config.num_hidden_states} [batch, tokens, hidden], then QLLaMA's "
        f"{config.qllama.num_hidden_layers + 1} [batch, queries, qllama hidden] (each layer's input, then the final norm)"
    )


def make_metadata(config: VisionConfig, dtype: str, target: str, params: list[dict], hidden_states: bool) -> dict:
    """The JSON a chat runtime reads instead of hard-coding numbers."""
    tokens = config.tokens.output
    outputs = encode_outputs(config, dtype)
    pixel_input = {"name": "pixel_values", "shape": [BATCH, config.num_channels, config.image_size, config.image_size],
                   "dtype": dtype, "layout": "NCHW, normalized"}  # fmt: skip
    rgb8_input = {"name": "pixels", "shape": rgb8_shape(config), "dtype": "uint8",
                  "layout": "NHWC, RGB 0..255, resized and cropped to image_size; the graph rescales and normalizes"}  # fmt: skip
    entries = {"encode": _entry([pixel_input], outputs), "encode_rgb8": _entry([rgb8_input], outputs)}
    if hidden_states:
        entries["hidden_states"] = {"inputs": [pixel_input], "output": hidden_states_description(config)}
    return {
        "mlc_vision_version": __version__,
        "family": config.family,
        "preset": config.preset,
        "config": config.to_dict(),
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_patches": config.num_patches,
        "num_tokens": tokens,
        "tokens": config.tokens.to_dict(),
        "output_width": output_width(config),
        "hidden_size": config.hidden_size,
        "dtype": dtype,
        "target": target,
        "select_layer": config.select_layer,
        "feature": config.feature,
        "projector": projector_metadata(config),
        "preprocess": config.preprocess.to_dict(),
        "tiling": tiling_metadata(config, tokens),
        "entries": entries,
        "params": params,
    }


def tiling_metadata(config: VisionConfig, tokens_per_tile: int) -> dict | None:
    """The tiling contract a runtime follows for an image of any size (docs/tiling.md)."""
    if config.tiling is None:
        return None
    tiling = config.tiling.to_dict()
    tiling.update(tile_size=config.image_size, tokens_per_tile=tokens_per_tile, grid="rows x cols (height x width)")
    if config.tiling.mode == "internvl":
        tiling["order"] = "tiles row-major, then the thumbnail (only when the grid has more than one tile)"
        return tiling
    newline = None
    if config.has_image_newline:
        newline = {"param": IMAGE_NEWLINE_PARAM, "shape": [config.projector_hidden_size]}
    tiling.update(
        order="the base image (resized to one tile), then the tiles of the chosen pinpoint row-major",
        image_newline=newline,
        packing="tile token maps joined, cropped to the image's aspect (unpad), "
        + ("shrunk to about anyres_max tiles (bilinear) when larger, " if config.tiling.anyres_max else "")
        + "image_newline after each row, base image tokens first"
        if newline
        else "none in the library: compile with the projector to pack",
    )
    return tiling


def rgb8_shape(config: VisionConfig) -> list:
    return [BATCH, config.image_size, config.image_size, config.num_channels]


def normalize_rgb8(pixels: nn.Tensor, pre, dtype: str) -> nn.Tensor:
    """``uint8 [b, H, W, c] -> dtype [b, c, H, W]``: ``(x * rescale - mean) / std``, as preprocess does.

    The arithmetic is float32 (as the CPU preprocessing does) and only the
    result is cast to the compiled dtype, so fp16 libraries see the same input
    as ``encode`` fed by our preprocess.
    """
    channels = pixels.shape[-1]
    mean = nn.Tensor.from_const(np.asarray(pre.mean, dtype="float32").reshape(1, 1, 1, channels))
    std = nn.Tensor.from_const(np.asarray(pre.std, dtype="float32").reshape(1, 1, 1, channels))
    x = (pixels.astype("float32") * float(pre.rescale_factor) - mean) / std
    if dtype != "float32":
        x = x.astype(dtype)
    return op.permute_dims(x, [0, 3, 1, 2])


def add_metadata_function(mod: tvm.IRModule, metadata: dict) -> tvm.IRModule:
    """Add ``_metadata() -> str`` returning the JSON (readable without the params)."""
    builder = relax.BlockBuilder(mod)
    with builder.function("_metadata", params=[]):
        builder.emit_func_output(tvm.ir.StringImm(json.dumps(metadata, sort_keys=True)))
    return builder.finalize()
