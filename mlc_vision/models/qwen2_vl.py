"""Qwen2-VL and Qwen2.5-VL vision towers (native resolution): the ``visual`` part of transformers'
``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``.

Semantics follow transformers:

- patch embedding: a Conv3d with kernel = stride = ``[temporal, patch, patch]``
  and no bias over patches that the processor already flattened to
  ``[C * temporal * patch * patch]``; here one matmul with the kernel
  reshaped to ``[d, C*t*p*p]`` (the same sum).
- 2D rotary position: for head dim ``hd``, ``hd/4`` frequencies
  ``theta^(-2i/(hd/2))``; the angle row of a patch is
  ``[row * f, col * f, row * f, col * f]`` (``hd`` wide) and q, k rotate as
  ``x * cos + rotate_half(x) * sin``, in float32.
- block: ``x + proj(attn(norm1(x)))`` then ``x + mlp(norm2(x))``; Qwen2.5:
  RMSNorm (eps 1e-6) and a SwiGLU MLP with biases
  (``down(silu(gate(x)) * up(x))``); Qwen2: LayerNorm (eps 1e-6) and
  ``fc2(quick_gelu(fc1(x)))``.
- attention never crosses an image; Qwen2.5 also restricts every block not in
  ``fullatt_block_indexes`` to windows of ``window_size`` pixels. Its patches
  are first reordered window by window, in groups of
  ``spatial_merge_size**2`` patches (``window_index``); the hidden states stay
  in that order (as transformers returns them) and the merged output is put
  back in the processor's order at the end.
- merger: ``ln_q`` (RMSNorm for 2.5, LayerNorm for 2), groups of
  ``merge x merge`` consecutive patches concatenated, then
  ``Linear -> GELU -> Linear`` into the LLM width.

Attention segments are per-patch ids from the runtime: two patches attend to
each other when their ids are equal (``docs/native_resolution.md``); in the
order the blocks see the patches (window order) every image and every window
is one contiguous run of ids. Attention is one segmented-attention call per
block, which each pipeline lowers (compiler/passes/segment_attention.py): on
the CPU a flash-style kernel per segment, elsewhere a ``[n, n]`` mask from
the ids and matmul -> softmax (float32) -> matmul.
"""

from __future__ import annotations


import numpy as np
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..config import Preprocess, VisionConfig
from ..errors import MlcVisionError
from . import layers
from .registry import Family, register
from .weight_map import WeightMap

NAME = "qwen2_vl"
# the released checkpoints' nested vision configs say qwen2_vl / qwen2_5_vl (or nothing: the composite fills it)
MODEL_TYPES = ("qwen2_vl_vision", "qwen2_5_vl_vision", "qwen2_vl", "qwen2_5_vl")
ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
SWIGLU = "swiglu"  # Qwen2.5's gate/up/down MLP; Qwen2's is fc1/fc2 with quick_gelu
NORM_EPS = 1e-6  # every norm of both towers (the checkpoints' config has no field for it)
# Qwen2VLImageProcessor defaults: 4 to 16384 tokens of 28 x 28 pixels
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
MASKED = -1.0e30  # additive score of a key outside the query's segment (float32 softmax)
#: The call the model emits for attention within segments; every pipeline lowers it (see segmented_attention).
SEGMENT_ATTENTION = "mlc_vision.segment_attention"
# A nominal image size: the library takes any patch grid; this only satisfies VisionConfig's checks.
NOMINAL_IMAGE_SIZE = 448


# ---- config ------------------------------------------------------------------------


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _qwen2_5(hf: dict) -> dict:
    """Qwen2.5-VL: ``hidden_size`` is the tower's width, ``out_hidden_size`` the LLM's."""
    return dict(
        hidden_size=hf.get("hidden_size", 3584),
        intermediate_size=hf.get("intermediate_size", 3420),
        num_hidden_layers=hf.get("depth", 32),
        hidden_act=SWIGLU,
        norm_type="rms_norm",
        window_size=hf.get("window_size", 112),
        fullatt_block_indexes=tuple(hf.get("fullatt_block_indexes", (7, 15, 23, 31))),
        merger_hidden_size=hf.get("out_hidden_size", 3584),
    )


def _qwen2(hf: dict) -> dict:
    """Qwen2-VL: ``embed_dim`` is the tower's width, ``hidden_size`` the LLM's."""
    width = hf.get("embed_dim", 1280)
    return dict(
        hidden_size=width,
        intermediate_size=int(width * hf.get("mlp_ratio", 4)),
        num_hidden_layers=hf.get("depth", 32),
        hidden_act=hf.get("hidden_act", "quick_gelu"),
        norm_type="layer_norm",
        merger_hidden_size=hf.get("hidden_size", 3584),
    )


VARIANTS = {"qwen2_5_vl_vision": _qwen2_5, "qwen2_5_vl": _qwen2_5, "qwen2_vl_vision": _qwen2, "qwen2_vl": _qwen2}


def config_from_hf(hf: dict) -> VisionConfig:
    """Our config from a ``Qwen2VLVisionConfig`` / ``Qwen2_5_VLVisionConfig`` dict (their defaults)."""
    model_type = hf.get("model_type", "qwen2_5_vl_vision")
    if model_type not in VARIANTS:
        raise MlcVisionError(f"unknown Qwen vision config model_type {model_type!r}; known: {', '.join(VARIANTS)}")
    patch = hf.get("patch_size", 14)
    merge = hf.get("spatial_merge_size", 2)
    return VisionConfig(
        family=NAME,
        num_attention_heads=hf.get("num_heads", 16),
        image_size=NOMINAL_IMAGE_SIZE,
        patch_size=patch,
        num_channels=hf.get("in_channels", 3),
        layer_norm_eps=NORM_EPS,
        qkv_bias=True,
        class_token=False,
        temporal_patch_size=hf.get("temporal_patch_size", 2),
        spatial_merge_size=merge,
        rope_theta=_rope_theta(hf),
        preprocess=Preprocess(
            resize="smart", size=patch * merge, crop_size=None, resample="bicubic",
            min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
        ),
        **VARIANTS[model_type](hf),
    ).validated()


def check_native_config(config: VisionConfig) -> None:
    """What a library of this family cannot do (one line each)."""
    if config.layer_index != config.num_hidden_layers:
        raise MlcVisionError(
            f"the Qwen vision tower's merger follows the last block; select_layer {config.select_layer} is not supported"
        )
    if config.projector is not None:
        raise MlcVisionError("the Qwen vision tower has its own patch merger; no --projector")
    if config.window_size and config.window_size % (config.patch_size * config.spatial_merge_size):
        raise MlcVisionError(
            f"window_size {config.window_size} is not a multiple of patch_size x spatial_merge_size "
            f"({config.patch_size} x {config.spatial_merge_size})"
        )


# ---- module -------------------------------------------------------------------------


def patch_width(config: VisionConfig) -> int:
    """Length of one flattened patch: ``C * temporal * patch * patch``."""
    return config.num_channels * config.temporal_patch_size * config.patch_size**2


def rotary_inverse_frequencies(config: VisionConfig) -> np.ndarray:
    """``hd/4`` float32 frequencies (transformers' ``compute_axial_rope_parameters``)."""
    spatial = config.head_dim // 2
    return (1.0 / config.rope_theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial)).astype(np.float32)


def rotary_cos_sin(position_ids: Tensor, config: VisionConfig) -> tuple[Tensor, Tensor]:
    """``[n, 2]`` int32 (row, col) -> cos, sin ``[n, 1, hd]`` float32."""
    inv = nn.Tensor.from_const(rotary_inverse_frequencies(config).reshape(1, 1, -1))
    freqs = op.unsqueeze(position_ids.astype("float32"), -1) * inv  # [n, 2, hd/4]
    n = freqs.shape[0]
    angles = op.reshape(freqs, (n, config.head_dim // 2))  # rows' frequencies then cols'
    angles = op.concat([angles, angles], dim=-1)
    cos = op.wrap_nested(relax.op.cos(angles._expr), "rotary_cos")
    sin = op.wrap_nested(relax.op.sin(angles._expr), "rotary_sin")
    return op.unsqueeze(cos, 1), op.unsqueeze(sin, 1)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    first = layers.slice_axis(x, 2, 0, half, "rot_first")
    second = layers.slice_axis(x, 2, half, x.shape[-1], "rot_second")
    return op.concat([op.negative(second), first], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x [n, h, hd]`` rotated in float32, cast back to its dtype."""
    x32 = x.astype("float32") if x.dtype != "float32" else x
    out = x32 * cos + rotate_half(x32) * sin
    return out.astype(x.dtype) if x.dtype != "float32" else out


def segmented_attention(q: Tensor, k: Tensor, v: Tensor, segments: Tensor) -> Tensor:
    """``[n, h, hd]`` each -> ``[n, h*hd]``: softmax(q k^T / sqrt(hd)) v over the keys of the query's segment.

    One call that the pipelines lower (compiler/passes/segment_attention.py):
    the CPU's segmented kernel, or a ``[n, n]`` mask from the ids elsewhere.
    """
    n, h, hd = q.shape
    out_ty = relax.TensorType([n, h, hd], q.dtype)
    call = relax.call_dps_packed(SEGMENT_ATTENTION, [q._expr, k._expr, v._expr, segments._expr], out_ty)
    return op.reshape(op.wrap_nested(call, "segment_attention"), (n, h * hd))


class PatchEmbed(nn.Module):
    """``proj.weight [d, C, t, p, p]`` (the Conv3d's), applied as one matmul to flattened patches."""

    def __init__(self, config: VisionConfig):
        p, t = config.patch_size, config.temporal_patch_size
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter((config.hidden_size, config.num_channels, t, p, p))

    def forward(self, patches: Tensor) -> Tensor:
        w = self.proj.weight
        kernel = op.reshape(w, (w.shape[0], patches.shape[1]))
        return op.matmul(patches, op.permute_dims(kernel, [1, 0]))


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(d, 3 * d, bias=True)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: Tensor) -> Tensor:
        n, d = x.shape
        h = self.num_heads
        q, k, v = op.split(op.reshape(self.qkv(x), (n, 3, h, d // h)), 3, axis=1)
        q, k, v = (op.squeeze(t, 1) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.proj(segmented_attention(q, k, v, segments))


class SwiGLUMlp(nn.Module):
    """Qwen2.5: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, all with biases."""

    def __init__(self, config: VisionConfig):
        d, width = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, width)
        self.up_proj = nn.Linear(d, width)
        self.down_proj = nn.Linear(width, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(op.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        self.norm1 = layers.make_norm(config)
        self.norm2 = layers.make_norm(config)
        self.attn = VisionAttention(config)
        self.mlp = SwiGLUMlp(config) if config.hidden_act == SWIGLU else layers.Mlp(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """``ln_q``, then ``merge**2`` consecutive patches as one row, ``mlp.0 -> GELU -> mlp.2`` (here fc1, fc2)."""

    def __init__(self, config: VisionConfig):
        width = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = layers.make_norm(config)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, config.merger_hidden_size)
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        rows = op.reshape(self.ln_q(x), (-1, self.width))
        return self.fc2(op.gelu(self.fc1(rows)))


def take_rows(x: Tensor, index: Tensor, name: str) -> Tensor:
    """``x[index]`` along axis 0. ``index`` is an input of the library (``window_index``): an index out of
    range is clamped (``mode="clip"``) instead of read out of bounds (TVM's default ``fast`` gather)."""
    return op.wrap_nested(relax.op.take(x._expr, index._expr, axis=0, mode="clip"), name)


def window_order(x: Tensor, window_index: Tensor, group: int) -> Tensor:
    """Per-patch rows ``[n, ...]`` reordered by merge groups: ``x.reshape(m, group, ...)[window_index]``."""
    rest = [int(s) for s in x.shape[1:]]
    grouped = op.reshape(x, (window_index.shape[0], group, *rest))
    ordered = take_rows(grouped, window_index, "window_order")
    return op.reshape(ordered, (window_index.shape[0] * group, *rest))


class VisionModel(nn.Module):
    """The ``visual`` tower and its merger (``full`` is accepted for the registry; every block is always built).

    ``hidden_states`` / ``forward`` take the per-patch inputs in the
    processor's order: ``patches [n, C*t*p*p]``, ``position_ids [n, 2]`` int32
    (row, col in the image's patch grid), ``image_ids [n]`` int32 (which image a
    patch belongs to); with windows also ``window_ids [n]`` int32 (which window)
    and ``window_index [n / merge**2]`` int32 (transformers' ``window_index``).
    """

    def __init__(self, config: VisionConfig, full: bool = False):
        check_native_config(config)
        self.config = config
        self.group = config.spatial_merge_size**2
        self.windows = bool(config.window_size)
        self.full_attention = set(config.fullatt_block_indexes) if self.windows else set(range(config.num_hidden_layers))
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList([VisionBlock(config) for _ in range(config.num_hidden_layers)])
        self.merger = PatchMerger(config)

    def hidden_states(self, patches, position_ids, image_ids, window_ids=None, window_index=None) -> list[Tensor]:
        """Every hidden state (patch embedding, then each block), in the order the blocks see them."""
        x = self.patch_embed(patches)
        if self.windows:
            x, position_ids, image_ids, window_ids = (
                window_order(t, window_index, self.group) for t in (x, position_ids, image_ids, window_ids)
            )
        cos, sin = rotary_cos_sin(position_ids, self.config)
        states = [x]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, image_ids if i in self.full_attention else window_ids)
            states.append(x)
        return states

    def merge(self, last: Tensor, window_index=None) -> Tensor:
        """The merger's output, back in the processor's order: ``[n / merge**2, merger_hidden_size]``."""
        merged = self.merger(last)
        if not self.windows:
            return merged
        # row window_index[i] of the output is merged row i (the inverse permutation, as a scatter)
        rows = op.broadcast_to(op.unsqueeze(window_index.astype("int64"), 1), merged.shape)
        undone = relax.op.scatter_elements(merged._expr, rows._expr, merged._expr, axis=0)
        return op.wrap_nested(undone, "processor_order")

    def forward(self, patches, position_ids, image_ids, window_ids=None, window_index=None) -> Tensor:
        states = self.hidden_states(patches, position_ids, image_ids, window_ids, window_index)
        return self.merge(states[-1], window_index)


# ---- weights -------------------------------------------------------------------------


WEIGHTS = WeightMap(
    prefixes=(
        ("model.visual.", ""),  # transformers 4.52+ / 5 save_pretrained
        ("visual.", ""),  # the released checkpoints
    ),
    renames=((r"^merger\.mlp\.0\.", "merger.fc1."), (r"^merger\.mlp\.2\.", "merger.fc2.")),
    ignore=(
        r"^(model\.)?language_model\.",
        r"^model\.(layers|embed_tokens|norm|rotary_emb)\.",
        r"^lm_head\.",
    ),
)


FAMILY = register(
    Family(
        name=NAME,
        model_types=MODEL_TYPES,
        architectures=ARCHITECTURES,
        config_from_hf=config_from_hf,
        module=VisionModel,
        weights=WEIGHTS,
        native_resolution=True,
    )
)
