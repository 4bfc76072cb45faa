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
from ..errors import MlcVisionError


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


# Gated MLPs (``out(act(gate) * value)``) name their gate's activation here: a
# family whose config says one of these builds its gated MLP (DINOv2's SwiGLU).
GATED_ACTIVATIONS = {"swiglu": op.silu}


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
        self.grid = config.tokens.grid
        self.weight = nn.Parameter((d, c, p, p))
        self.bias = nn.Parameter((d,)) if bias else None

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``[b, c, H, W] -> [b, rows*cols, d]``, patches row major."""
        p, (rows, cols) = self.patch_size, self.grid
        x = pixel_values
        if x.shape[2] != rows * p:
            x = slice_axis(x, 2, 0, rows * p, "crop_rows")
        if x.shape[3] != cols * p:
            x = slice_axis(x, 3, 0, cols * p, "crop_cols")
        b, c = x.shape[0], x.shape[1]
        x = op.reshape(x, (b, c, rows, p, cols, p))
        x = op.permute_dims(x, [0, 2, 4, 1, 3, 5])  # b, gy, gx, c, py, px
        x = op.reshape(x, (b, rows * cols, c * p * p))
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


def features(states: list[Tensor], config: VisionConfig, pooled) -> Tensor:
    """What ``encode`` returns: ``pooled(last state)`` for ``feature="pooled"``, else the selected state."""
    if config.feature == "pooled":
        return pooled(states[-1])
    return select_feature(states[config.layer_index], config)


def select_feature(hidden: Tensor, config: VisionConfig) -> Tensor:
    """``patch`` drops the prefix (class and register tokens) where there is one; ``cls_patch`` keeps every token."""
    dropped = config.tokens.dropped_prefix
    if dropped:
        return slice_axis(hidden, 1, dropped, hidden.shape[1], "patch_tokens")
    return hidden


# ---- the transformer stack shared by the families ------------------------------------------


class SelfAttention(nn.Module):
    """Separate q/k/v projections and an output projection (CLIP, SigLIP, EVA-CLIP names).

    ``k_bias=False`` for EVA-CLIP: a bias on k adds the same value to every
    score of a query row, which the softmax cancels, so the port drops it.
    """

    def __init__(self, config: VisionConfig, qv_bias: bool = True, k_bias: bool = True):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=qv_bias)
        self.k_proj = nn.Linear(d, d, bias=k_bias)
        self.v_proj = nn.Linear(d, d, bias=qv_bias)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads)
        return self.out_proj(out)


class EncoderLayer(nn.Module):
    """``self_attn`` + ``mlp`` with ``layer_norm1``/``layer_norm2``.

    Pre-norm (``x + f(norm(x))``, CLIP and SigLIP) or, with
    ``config.post_norm_blocks``, post-norm on each branch's output
    (``x + norm(f(x))``, EVA02-CLIP-E).
    """

    def __init__(self, config: VisionConfig, self_attn: nn.Module):
        self.post_norm = config.post_norm_blocks
        self.self_attn = self_attn
        self.layer_norm1 = make_norm(config)
        self.mlp = Mlp(config)
        self.layer_norm2 = make_norm(config)

    def forward(self, x: Tensor) -> Tensor:
        if self.post_norm:
            x = x + self.layer_norm1(self.self_attn(x))
            return x + self.layer_norm2(self.mlp(x))
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """``encoder.layers.N``: the stack, built only as deep as it is used."""

    def __init__(self, blocks: list[nn.Module]):
        self.layers = nn.ModuleList(blocks)

    def hidden_states(self, x: Tensor) -> list[Tensor]:
        """The input followed by every layer's output (``hidden_states`` as transformers counts them)."""
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        return states


def pooled_class_token(last_hidden: Tensor, norm: nn.Module, projection: nn.Module | None) -> Tensor:
    """``[b, 1, width]``: the class token of the last layer, normed, then projected if there is a projection."""
    cls = norm(slice_axis(last_hidden, 1, 0, 1, "class_token"))
    return projection(cls) if projection is not None else cls


def check_post_norm_tokens(config: VisionConfig, norm: str) -> None:
    """``post_norm_tokens`` applies the final ``norm``, which exists after the last layer only."""
    last = config.num_hidden_states - 1
    if config.post_norm_tokens and config.layer_index != last:
        raise MlcVisionError(
            f"post_norm_tokens applies {norm}, which follows the last layer only; "
            f"select_layer {config.select_layer} is hidden state {config.layer_index}, not {last}"
        )


def layers_to_build(config: VisionConfig, full: bool) -> int:
    """Every layer for convert (``full``) and for pooled outputs; else up to the selected one."""
    if full or config.feature == "pooled":
        return config.num_hidden_layers
    return config.num_layers_compiled
