"""DINOv2 (ViT-S/B/L/g 14, with or without register tokens): transformers' ``Dinov2Model`` and
``Dinov2WithRegistersModel``.

Semantics follow transformers:

- embeddings: a class token and the patch conv (with bias), plus a learned
  position embedding over the class token and the patches; with registers,
  ``num_register_tokens`` learned tokens go between the class token and the
  patches, without a position. ``hidden_states[0]`` is that sequence (no
  pre-norm).
- block: ``x + ls1 * attn(norm1(x))`` then ``x + ls2 * mlp(norm2(x))`` (layer
  scale ``lambda1``); the MLP is ``fc2(gelu(fc1))``, or for ``use_swiglu_ffn``
  (ViT-g) SwiGLU: ``weights_out(silu(a) * b)`` with ``a | b = weights_in(x)``.
- ``layernorm`` after the last layer gives ``last_hidden_state``; the pooled
  output is its class token. ``patch`` drops the class and register tokens,
  ``cls_patch`` keeps all; both return hidden states without the final norm,
  as every family here does, unless ``post_norm_tokens`` (last layer only)
  asks for ``last_hidden_state``.

Our config records SwiGLU as ``hidden_act="swiglu"`` with ``intermediate_size``
the SwiGLU width, and the registers as ``register_tokens``.
"""

from __future__ import annotations

import numpy as np
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..config import Preprocess, VisionConfig
from ..errors import MlcVisionError
from . import layers
from .registry import Family, register
from .transforms import interpolate_position_embedding
from .weight_map import WeightMap

NAME = "dinov2"
MODEL_TYPES = ("dinov2", "dinov2_with_registers")
ARCHITECTURES = (
    "Dinov2Model",
    "Dinov2ForImageClassification",
    "Dinov2WithRegistersModel",
    "Dinov2WithRegistersForImageClassification",
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# BitImageProcessor, as the DINOv2 checkpoints configure it: shortest edge 256, center crop 224.
RESIZE_OVER_CROP = 256 / 224
SWIGLU = "swiglu"  # a gated activation of models/layers.py: the MLP becomes Dinov2SwiGLU


# ---- config ------------------------------------------------------------------------


def _mlp_width(hf: dict) -> int:
    """fc1's width, or SwiGLU's: two thirds of it rounded up to a multiple of 8 (as transformers sizes it)."""
    width = int(hf.get("hidden_size", 768) * hf.get("mlp_ratio", 4))
    return (int(width * 2 / 3) + 7) // 8 * 8 if hf.get("use_swiglu_ffn") else width


def config_from_hf(hf: dict) -> VisionConfig:
    """Our config from a ``Dinov2Config`` / ``Dinov2WithRegistersConfig`` dict (their defaults)."""
    image_size = hf.get("image_size", 224)
    return VisionConfig(
        family=NAME,
        hidden_size=hf.get("hidden_size", 768),
        intermediate_size=_mlp_width(hf),
        num_hidden_layers=hf.get("num_hidden_layers", 12),
        num_attention_heads=hf.get("num_attention_heads", 12),
        image_size=image_size,
        patch_size=hf.get("patch_size", 14),
        num_channels=hf.get("num_channels", 3),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
        hidden_act=SWIGLU if hf.get("use_swiglu_ffn") else hf.get("hidden_act", "gelu"),
        qkv_bias=bool(hf.get("qkv_bias", True)),
        layer_scale=True,
        class_token=True,
        register_tokens=int(hf.get("num_register_tokens", 0)),
        patch_bias=True,
        preprocess=Preprocess(
            resize="shortest_edge", size=round(image_size * RESIZE_OVER_CROP), crop_size=image_size,
            resample="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        ),
    ).validated()


# ---- module -------------------------------------------------------------------------


class Dinov2PatchEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        self.projection = layers.PatchEmbedding(config, bias=True)


class Dinov2Embeddings(nn.Module):
    """Class token + patches + position embedding, then the register tokens after the class token."""

    def __init__(self, config: VisionConfig):
        d = config.hidden_size
        self.cls_token = nn.Parameter((1, 1, d))
        self.patch_embeddings = Dinov2PatchEmbeddings(config)
        self.position_embeddings = nn.Parameter((1, config.num_positions, d))
        registers = config.tokens.register_tokens
        self.register_tokens = nn.Parameter((1, registers, d)) if registers else None

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embeddings.projection(pixel_values)
        tokens = layers.prepend_class_token(patches, self.cls_token) + self.position_embeddings
        if self.register_tokens is None:
            return tokens
        b, s, d = tokens.shape
        registers = op.broadcast_to(self.register_tokens, (b, self.register_tokens.shape[1], d))
        cls = layers.slice_axis(tokens, 1, 0, 1, "class_token")
        rest = layers.slice_axis(tokens, 1, 1, s, "patch_tokens")
        return op.concat([cls, registers, rest], dim=1)


class Dinov2SelfAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(d, d, bias=config.qkv_bias)
        self.key = nn.Linear(d, d, bias=config.qkv_bias)
        self.value = nn.Linear(d, d, bias=config.qkv_bias)

    def forward(self, x: Tensor) -> Tensor:
        return layers.attention(self.query(x), self.key(x), self.value(x), self.num_heads)


class Dinov2SelfOutput(nn.Module):
    def __init__(self, config: VisionConfig):
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)


class Dinov2Attention(nn.Module):
    """``attention.attention.{query,key,value}`` then ``attention.output.dense`` (the checkpoint's names)."""

    def __init__(self, config: VisionConfig):
        self.attention = Dinov2SelfAttention(config)
        self.output = Dinov2SelfOutput(config)

    def forward(self, x: Tensor) -> Tensor:
        return self.output.dense(self.attention(x))


class Dinov2LayerScale(nn.Module):
    def __init__(self, config: VisionConfig):
        self.lambda1 = nn.Parameter((config.hidden_size,))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.lambda1


class Dinov2SwiGLU(nn.Module):
    """``weights_out(silu(a) * b)`` where ``weights_in`` packs the gate ``a`` and the value ``b`` (in that order)."""

    def __init__(self, config: VisionConfig):
        d, width = config.hidden_size, config.intermediate_size
        self.weights_in = nn.Linear(d, 2 * width)
        self.weights_out = nn.Linear(width, d)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = op.split(self.weights_in(x), 2, axis=-1)
        return self.weights_out(layers.GATED_ACTIVATIONS[SWIGLU](gate) * value)


class Dinov2Layer(nn.Module):
    """Pre-norm block with layer scale on both branches."""

    def __init__(self, config: VisionConfig):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attention = Dinov2Attention(config)
        self.layer_scale1 = Dinov2LayerScale(config)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = Dinov2SwiGLU(config) if config.hidden_act == SWIGLU else layers.Mlp(config)
        self.layer_scale2 = Dinov2LayerScale(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class VisionModel(nn.Module):
    """DINOv2 built up to the selected layer (``full`` builds every layer and the final norm, for convert)."""

    def __init__(self, config: VisionConfig, full: bool = False):
        if not full:
            layers.check_post_norm_tokens(config, "DINOv2's final layernorm")
        self.config = config
        needs_norm = full or config.feature == "pooled" or config.post_norm_tokens
        num_layers = config.num_hidden_layers if needs_norm else config.num_layers_compiled
        self.embeddings = Dinov2Embeddings(config)
        self.encoder = layers.Encoder([Dinov2Layer(config) for _ in range(num_layers)])
        if needs_norm:
            self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def hidden_states(self, pixel_values: Tensor) -> list[Tensor]:
        return self.encoder.hidden_states(self.embeddings(pixel_values))

    def pooled(self, last_hidden: Tensor) -> Tensor:
        """``[b, 1, d]``: transformers' ``pooler_output``, the layernormed class token."""
        return layers.pooled_class_token(last_hidden, self.layernorm, None)

    def forward(self, pixel_values: Tensor) -> Tensor:
        states = self.hidden_states(pixel_values)
        if self.config.post_norm_tokens and self.config.feature != "pooled":
            return layers.select_feature(self.layernorm(states[-1]), self.config)
        return layers.features(states, self.config, self.pooled)


# ---- weights -------------------------------------------------------------------------


def _antialiased_cubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` bicubic resampling with ``antialias=True``, as torch computes it.

    The cubic kernel (``a = -0.5``) is stretched by the scale when shrinking,
    taps outside the input are dropped and the row is renormalized.
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        x = np.abs((np.arange(lo, hi) - center + 0.5) * inv)
        w = np.where(x < 1, ((1.5 * x - 2.5) * x) * x + 1, np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0.0))
        matrix[i, lo:hi] = w / w.sum()
    return matrix


def interpolate_position_embeddings(array: np.ndarray, config: VisionConfig) -> np.ndarray:
    """The position table resampled to the compiled grid, as the model would at every forward pass.

    ``Dinov2Model`` resizes with plain bicubic (the shared transform);
    ``Dinov2WithRegistersModel`` (the checkpoints with registers) with
    ``antialias=True``, reproduced here.
    """
    if not config.register_tokens:
        return interpolate_position_embedding(array, config)
    tokens, dim = array.shape[-2], array.shape[-1]
    old = round((tokens - 1) ** 0.5)
    rows, cols = config.tokens.grid
    if old * old != tokens - 1:
        raise MlcVisionError(f"position embedding {tuple(array.shape)}: {tokens - 1} positions are not a square grid")
    if (rows, cols) == (old, old):
        return array
    table = np.asarray(array, dtype=np.float32).reshape(tokens, dim)
    grid = table[1:].reshape(old, old, dim)
    row_m = _antialiased_cubic_matrix(old, rows).astype(np.float32)
    col_m = _antialiased_cubic_matrix(old, cols).astype(np.float32)
    resized = np.einsum("pw,owc->opc", col_m, np.einsum("oh,hwc->owc", row_m, grid))
    out = np.concatenate([table[:1], resized.reshape(rows * cols, dim)], axis=0)
    return out.reshape(*array.shape[:-2], 1 + rows * cols, dim).astype(array.dtype)


WEIGHTS = WeightMap(
    prefixes=(
        # Dinov2Model / Dinov2WithRegistersModel: no prefix
        ("embeddings.", "embeddings."),
        ("encoder.", "encoder."),
        ("layernorm.", "layernorm."),
        ("dinov2.", ""),  # *ForImageClassification: the backbone under dinov2.
        ("dinov2_with_registers.", ""),
    ),
    renames=((r"^encoder\.layer\.", "encoder.layers."),),
    ignore=(
        r"embeddings\.mask_token$",  # masked-image pretraining only
        r"^classifier\.",
    ),
    transforms=((r"^embeddings\.position_embeddings$", interpolate_position_embeddings),),
)


FAMILY = register(
    Family(
        name=NAME,
        model_types=MODEL_TYPES,
        architectures=ARCHITECTURES,
        config_from_hf=config_from_hf,
        module=VisionModel,
        weights=WEIGHTS,
    )
)
