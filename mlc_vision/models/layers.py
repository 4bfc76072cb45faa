"""Blocks shared by the vision-encoder families (Relax ``nn`` modules and ops).

Attribute names follow the Hugging Face / original checkpoints so that a
family's weight map is mostly prefixes. Shapes in comments use ``b`` batch,
``s`` tokens, ``d`` hidden width, ``h`` heads.
"""

from __future__ import annotations

import math

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..config import VisionConfig


# ---- small ops ----------------------------------------------------------------


def slice_axis(x: Tensor, axis: int, begin: int, end: int, name: str = "slice") -> Tensor:
    """``x[..., begin:end, ...]`` on one axis (the nn frontend has no slicing op)."""
    expr = relax.op.strided_slice(x._expr, axes=[axis], begin=[begin], end=[end])
    return op.wrap_nested(expr, name)


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's activation: ``x * sigmoid(1.702 x)``."""
    return x * op.sigmoid(x * 1.702)


def gelu_erf(x: Tensor) -> Tensor:
    return op.gelu(x)


def gelu_tanh(x: Tensor) -> Tensor:
    return op.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": gelu_erf,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# ---- norms ----------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm as InternViT and EVA-CLIP-8B define it.

    The mean of squares is taken in float32 and the normalized value is cast
    back to the input dtype before the weight multiplies it, so fp16 libraries
    do not overflow on wide (3200-channel) rows.
    """

    def __init__(self, dim: int, eps: float):
        self.weight = nn.Parameter((dim,))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.astype("float32") if x.dtype != "float32" else x
        variance = op.sum(x32 * x32, axis=-1, keepdims=True) / float(x.shape[-1])
        normed = x32 / op.sqrt(variance + self.eps)
        if x.dtype != "float32":
            normed = normed.astype(x.dtype)
        return normed * self.weight


def make_norm(config: VisionConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm_type == "rms_norm":
        return RMSNorm(dim, config.layer_norm_eps)
    if config.norm_type == "layer_norm":
        return nn.LayerNorm(dim, eps=config.layer_norm_eps)
    raise ValueError(f"unknown norm_type {config.norm_type!r}")


# ---- attention and MLP -------------------------------------------------------------


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``[b, s, d] -> [b, s, h, d/h]`` (the layout ``scaled_dot_product_attention`` takes)."""
    b, s, d = x.shape
    return op.reshape(x, (b, s, num_heads, d // num_heads))


def merge_heads(x: Tensor) -> Tensor:
    b, s, h, hd = x.shape
    return op.reshape(x, (b, s, h * hd))


def attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float | None = None) -> Tensor:
    """Bidirectional multi-head attention on ``[b, s, d]`` projections; returns ``[b, s, d]``."""
    head_dim = q.shape[-1] // num_heads
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out = op.scaled_dot_product_attention(
        split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads), scale=scale
    )
    return merge_heads(out)


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``, the MLP of every family here."""

    def __init__(self, config: VisionConfig):
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ---- patch embedding ---------------------------------------------------------------


class PatchEmbedding(nn.Module):
    """A stride-``p`` ``p x p`` convolution, computed as a matmul over unfolded patches.

    The weight keeps the conv layout ``[d, c, p, p]`` of the checkpoint; the
    graph reshapes it. Pixels past the last whole patch are dropped, exactly as
    the strided conv does (SigLIP 384/14 loses 6 rows and columns).
    """

    def __init__(self, config: VisionConfig, bias: bool):
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        self.patch_size = p
        self.grid = config.grid_size
        self.weight = nn.Parameter((d, c, p, p))
        self.bias = nn.Parameter((d,)) if bias else None

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``[b, c, H, W] -> [b, grid*grid, d]``."""
        p, g = self.patch_size, self.grid
        x = pixel_values
        if x.shape[2] != g * p:
            x = slice_axis(x, 2, 0, g * p, "crop_rows")
        if x.shape[3] != g * p:
            x = slice_axis(x, 3, 0, g * p, "crop_cols")
        b, c = x.shape[0], x.shape[1]
        x = op.reshape(x, (b, c, g, p, g, p))
        x = op.permute_dims(x, [0, 2, 4, 1, 3, 5])  # b, gy, gx, c, py, px
        x = op.reshape(x, (b, g * g, c * p * p))
        d = self.weight.shape[0]
        w = op.reshape(self.weight, (d, c * p * p))
        out = op.matmul(x, op.permute_dims(w, [1, 0]))
        if self.bias is not None:
            out = out + self.bias
        return out


def prepend_class_token(x: Tensor, class_embedding: Tensor) -> Tensor:
    """``[b, n, d] -> [b, 1 + n, d]`` with the learned class token first."""
    b, _, d = x.shape
    cls = op.broadcast_to(op.reshape(class_embedding, (1, 1, d)), (b, 1, d))
    return op.concat([cls, x], dim=1)


# ---- feature selection ---------------------------------------------------------------


def select_feature(hidden: Tensor, config: VisionConfig) -> Tensor:
    """``patch`` drops the class token where there is one; ``cls_patch`` keeps every token."""
    if config.feature == "patch" and config.class_token:
        return slice_axis(hidden, 1, 1, hidden.shape[1], "patch_tokens")
    return hidden
