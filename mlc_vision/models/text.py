"""Text towers of the contrastive models (CLIP, SigLIP, InternVL's EVA-CLIP port) and their head.

The three are one network with a few switches, read from each family's row
of :data:`TEXT_STYLES`:

- token embedding + learned position embedding (first ``length`` rows);
- pre-norm transformer blocks (EVA's port: post-norm when its text config says
  ``post_layernorm``), causal self-attention for CLIP and EVA, bidirectional
  for SigLIP; ``attention_mask`` (1 = token, 0 = padding) masks padded keys;
- ``final_layer_norm`` over every token, then one token is pooled: CLIP's end
  of text (the highest id, or the first ``eos_token_id`` in configs with a
  real one), EVA's highest id, SigLIP's last position;
- the projection: CLIP's and EVA's ``text_projection`` (no bias), SigLIP's
  ``text_model.head`` (with bias).

The image side is the vision family's ``feature="pooled"`` output; the
logits are ``logit_scale.exp() * cos`` (+ ``logit_bias`` for SigLIP), computed
by the runtime from the two scalars in the params. Parameter names are the
checkpoint's own (``text_model.encoder.layers.0.self_attn.q_proj.weight``), so
the weight map is a list of prefixes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..errors import MlcVisionError
from . import layers
from .weight_map import WeightMap

MASKED = -1e9  # additive score for a masked key (finite: a fully masked row stays finite)


@dataclass(frozen=True)
class TextStyle:
    """What a family's text tower does that its config does not say."""

    causal: bool
    pooling: str  # "eos": CLIP's rule (highest id when eos_token_id is the legacy 2); "argmax"; "last"
    projection: str  # our (and the checkpoint's) name of the projection module
    projection_bias: bool
    padding: str  # how its processor pads a batch: "longest" or "max_length"
    default_act: str
    logits: str  # "softmax" (CLIP, EVA: over the texts of an image) or "sigmoid" (SigLIP)


TEXT_STYLES = {
    "clip": TextStyle(True, "eos", "text_projection", False, "longest", "quick_gelu", "softmax"),
    "eva_clip": TextStyle(True, "argmax", "text_projection", False, "max_length", "gelu", "softmax"),
    "siglip": TextStyle(False, "last", "text_model.head", True, "max_length", "gelu_pytorch_tanh", "sigmoid"),
}


@dataclass(frozen=True)
class TextConfig:
    """A text tower (field names shared with :class:`~mlc_vision.config.VisionConfig` where layers.py reads them)."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    projection_dim: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    norm_type: str = "layer_norm"
    post_norm_blocks: bool = False
    qv_bias: bool = True
    k_bias: bool = True
    eos_token_id: int = 2
    pad_token_id: int = 1

    @property
    def style(self) -> TextStyle:
        return TEXT_STYLES[self.family]

    @property
    def pooling(self) -> str:
        """The pooled token: CLIP configs with the legacy eos id 2 pool at the highest id, as transformers does."""
        if self.style.pooling == "eos" and self.eos_token_id == 2:
            return "argmax"
        return self.style.pooling

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TextConfig":
        return cls(**data)


def _text_part(full: dict) -> dict:
    text = full.get("text_config")
    if not isinstance(text, dict):
        raise MlcVisionError(
            "this checkpoint has no text tower (config.json has no text_config); "
            "--part text and similarity need a whole CLIP / SigLIP / EVA-CLIP model"
        )
    return text


def text_config_from_hf(family: str, full: dict) -> TextConfig:
    """Our text config from a whole CLIP / SigLIP / EVA-CLIP ``config.json``."""
    if family not in TEXT_STYLES:
        raise MlcVisionError(f"family {family!r} has no text tower; text towers: {', '.join(sorted(TEXT_STYLES))}")
    text, style = _text_part(full), TEXT_STYLES[family]
    hidden = text.get("hidden_size", 512)
    qv_bias = bool(text.get("q_bias", True)) and bool(text.get("v_bias", True))
    return TextConfig(
        family=family,
        vocab_size=text.get("vocab_size", 49408),
        hidden_size=hidden,
        intermediate_size=text.get("intermediate_size", 2048),
        num_hidden_layers=text.get("num_hidden_layers", 12),
        num_attention_heads=text.get("num_attention_heads", 8),
        max_position_embeddings=text.get("max_position_embeddings", 77),
        # CLIP/EVA: the outer projection_dim; SigLIP: the text config's projection_size (default: its width)
        projection_dim=full.get("projection_dim") or text.get("projection_size") or hidden,
        layer_norm_eps=text.get("layer_norm_eps", 1e-5 if family != "siglip" else 1e-6),
        hidden_act=text.get("hidden_act", style.default_act),
        post_norm_blocks=bool(text.get("post_layernorm", False)),
        qv_bias=qv_bias,
        k_bias=bool(text.get("k_bias", True)),
        eos_token_id=int(text.get("eos_token_id", 2)),
        pad_token_id=int(text.get("pad_token_id", 1)),
    )


# ---- module ---------------------------------------------------------------------------------------


def _wrap(expr, name: str) -> Tensor:
    return op.wrap_nested(expr, name)


class TextEmbeddings(nn.Module):
    def __init__(self, config: TextConfig):
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        length = input_ids.shape[1]
        positions = _wrap(relax.op.arange(0, length, 1, "int32"), "positions")
        return self.token_embedding(input_ids) + op.take(self.position_embedding.weight, positions, axis=0)


class MaskedSelfAttention(nn.Module):
    """q/k/v/out projections (CLIP names); scores get an additive mask, softmax in float32."""

    def __init__(self, config: TextConfig):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=config.qv_bias)
        self.k_proj = nn.Linear(d, d, bias=config.k_bias)
        self.v_proj = nn.Linear(d, d, bias=config.qv_bias)
        self.out_proj = nn.Linear(d, d)

    def _heads(self, x: Tensor) -> Tensor:
        return op.permute_dims(layers.split_heads(x, self.num_heads), [0, 2, 1, 3])  # [b, h, s, hd]

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = op.matmul(q, op.permute_dims(k, [0, 1, 3, 2])).astype("float32") * scale + mask
        probs = op.softmax(scores, axis=-1).astype(x.dtype)
        out = op.permute_dims(op.matmul(probs, v), [0, 2, 1, 3])
        return self.out_proj(layers.merge_heads(out))


class TextEncoderLayer(nn.Module):
    """CLIP's block (``layer_norm1``/``self_attn``/``layer_norm2``/``mlp``), pre- or post-norm."""

    def __init__(self, config: TextConfig):
        self.post_norm = config.post_norm_blocks
        self.self_attn = MaskedSelfAttention(config)
        self.layer_norm1 = layers.make_norm(config)
        self.mlp = layers.Mlp(config)
        self.layer_norm2 = layers.make_norm(config)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if self.post_norm:
            x = x + self.layer_norm1(self.self_attn(x, mask))
            return x + self.layer_norm2(self.mlp(x))
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class TextEncoder(nn.Module):
    def __init__(self, config: TextConfig):
        self.layers = nn.ModuleList([TextEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class TextTransformer(nn.Module):
    """``text_model.*``: embeddings, encoder, final norm (SigLIP's head lives here too)."""

    def __init__(self, config: TextConfig):
        self.embeddings = TextEmbeddings(config)
        self.encoder = TextEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.style.projection == "text_model.head":
            self.head = nn.Linear(config.hidden_size, config.projection_dim, bias=True)


def attention_bias(attention_mask: Tensor, causal: bool) -> Tensor:
    """``[b, 1, s, s]`` float32: 0 where a query may look, ``MASKED`` at padded keys and (causal) later tokens."""
    b, s = attention_mask.shape
    padded = (1.0 - attention_mask.astype("float32")) * MASKED
    bias = op.reshape(padded, (b, 1, 1, s))
    if causal:
        later = _wrap(relax.op.triu(relax.op.full((s, s), relax.const(MASKED, "float32")), 1), "causal")
        bias = bias + op.reshape(later, (1, 1, s, s))
    return bias


def pooled_index(input_ids: Tensor, pooling: str, eos_token_id: int) -> Tensor:
    """``[b]`` int32: which token each sequence is pooled at (CLIP and EVA)."""
    if pooling == "argmax":  # the end-of-text token has the highest id
        return _wrap(relax.op.argmax(input_ids._expr, axis=1), "eos_at").astype("int32")
    if pooling == "eos":  # the first eos_token_id
        is_eos = _wrap(relax.op.equal(input_ids._expr, relax.const(eos_token_id, input_ids.dtype)), "is_eos")
        return _wrap(relax.op.argmax(is_eos.astype("int32")._expr, axis=1), "eos_at").astype("int32")
    raise ValueError(f"unknown pooling {pooling!r}")


def last_token(hidden: Tensor) -> Tensor:
    """``hidden[:, -1]``: SigLIP pools the last position, padding or not."""
    b, s, d = hidden.shape
    last = relax.op.strided_slice(hidden._expr, axes=[1], begin=[s - 1], end=[s], assume_inbound=True)
    return op.reshape(_wrap(last, "last_token"), (b, d))


def gather_tokens(hidden: Tensor, index: Tensor) -> Tensor:
    """``hidden[i, index[i]]`` for each row: ``[b, s, d], [b] -> [b, d]`` (a one-hot sum: no gather op needed)."""
    s = hidden.shape[1]
    positions = _wrap(relax.op.arange(0, s, 1, "int32"), "token_positions")
    one_hot = _wrap(relax.op.equal(op.reshape(positions, (1, s))._expr, op.reshape(index, (index.shape[0], 1))._expr),
                    "one_hot").astype(hidden.dtype)
    return op.sum(hidden * op.reshape(one_hot, (one_hot.shape[0], s, 1)), axis=1)


class TextModel(nn.Module):
    """The text side of a contrastive model: ``forward(input_ids, attention_mask) -> [b, projection_dim]``.

    Also holds ``logit_scale`` (and SigLIP's ``logit_bias``) so that one params
    dir carries the whole head.
    """

    def __init__(self, config: TextConfig):
        self.config = config
        self.text_model = TextTransformer(config)
        if config.style.projection == "text_projection":
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        # the checkpoint's 0-d scalars, stored as [1] (see text_weight_map)
        self.logit_scale = nn.Parameter((1,), "float32")
        if config.style.logits == "sigmoid":
            self.logit_bias = nn.Parameter((1,), "float32")

    def cast(self, dtype: str) -> "TextModel":
        """Weights in ``dtype``; the logit scalars stay float32 (the runtime reads them as such)."""
        self.to(dtype)
        self.logit_scale.to("float32")
        if hasattr(self, "logit_bias"):
            self.logit_bias.to("float32")
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.text_model.embeddings(input_ids)
        hidden = self.text_model.encoder(hidden, attention_bias(attention_mask, self.config.style.causal))
        hidden = self.text_model.final_layer_norm(hidden)
        if self.config.pooling == "last":
            pooled = last_token(hidden)
        else:
            pooled = gather_tokens(hidden, pooled_index(input_ids, self.config.pooling, self.config.eos_token_id))
        if self.config.style.projection == "text_projection":
            return self.text_projection(pooled)
        return self.text_model.head(pooled)


# ---- weights -----------------------------------------------------------------------------------------


def text_weight_map(config: TextConfig) -> WeightMap:
    """Checkpoint keys of the text side -> ours (the same names); position-id buffers ignored."""
    prefixes = [("text_model.", "text_model."), ("logit_scale", "logit_scale")]
    if config.style.projection == "text_projection":
        prefixes.append(("text_projection.", "text_projection."))
    if config.style.logits == "sigmoid":
        prefixes.append(("logit_bias", "logit_bias"))
    return WeightMap(
        prefixes=tuple(prefixes),
        ignore=(r"^text_model\..*position_ids$",),
        transforms=((r"^logit_(scale|bias)$", _as_vector),),
    )


def _as_vector(array, config):
    """A 0-d logit scalar as ``[1]``: the params dir and the runtime's tensors have no 0-d records."""
    return array.reshape(1)


def text_params(config: TextConfig, dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of the text side; the logit scalars stay float32."""
    module = TextModel(config).cast(dtype)
    return {name: (tuple(int(d) for d in p.shape), str(p.dtype)) for name, p in module.named_parameters()}
