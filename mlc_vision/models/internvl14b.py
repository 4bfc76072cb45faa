"""InternVL-14B (``InternVLModel``): InternViT-6B plus QLLaMA's learned query tokens.

Semantics follow OpenGVLab's ``modeling_internvl.py`` / ``modeling_qllama.py``
(the hub checkpoint ``OpenGVLab/InternVL-14B-224px``, config ``model_type:
internvl``), and what InternVL's LLaVA ``CLIPVisionTower`` returns for it:
``[features, query_outputs]``.

- The vision tower is InternViT-6B (:mod:`.intern_vit`), always built to its
  last layer: ``features`` are its selected hidden state (``select_layer``,
  ``feature``) as for the other towers, and the query tokens attend to its
  last hidden state (every token, the class token included; no final norm).
- QLLaMA (``qllama.model.*``): ``num_query_token`` learned ``query_tokens``
  go through LLaMA decoder layers. Each layer: ``x + o(attn(rope(q), rope(k),
  v))`` over ``input_layernorm(x)``, with rotary positions ``0..N-1`` (base
  10000, the rotate-half layout) and no mask (the all-ones attention mask
  makes the self-attention bidirectional); then, in layers ``0, f, 2f, ...``
  (``cross_attention_frequency`` f), ``x + o(attn(q(norm1(x)),
  k(norm2(vision)), v(norm2(vision))))`` with no rotary and no mask, keys and
  values projected from the tower's width (InternVL fixes it at 3200, the
  6B's); then ``x + down(silu(gate(y)) * up(y))`` with ``y =
  post_attention_layernorm(x)``. A final RMSNorm gives ``query_outputs``.
  Every norm is an RMSNorm with ``rms_norm_eps``; no projection has a bias.
- Never read: the language-model head (``qllama.lm_head``), the token
  embedding (the text side's), ITM head. The InternVL-C/G contrastive heads
  (``clip_projector``, ``clip_projector2``, ``text_projection``,
  ``logit_scale``) are not compiled: they are listed as ignored.

``hidden_states`` (exposed for parity) are the tower's ``num_hidden_layers +
1`` states followed by QLLaMA's ``num_hidden_layers + 1``: the input of each
layer, then the final normed state (how ``output_hidden_states`` counts them).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..config import Preprocess, QueryTransformer, VisionConfig
from ..errors import MlcVisionError
from . import intern_vit, layers
from .registry import Family, OptionalPart, register
from .transforms import interpolate_position_embedding
from .weight_map import LLAVA_NON_VISION_KEYS, WeightMap

NAME = "internvl_14b"
MODEL_TYPES = ("internvl",)
ARCHITECTURES = ("InternVLModel", "InternVL_C", "InternVL_G")

# InternVLConfig's defaults (configuration_internvl.py) for the fields that shape the query side.
HF_DEFAULTS = {"num_query_token": 96, "cross_attention_frequency": 2, "clip_embed_dim": 768, "attn_pool_num_heads": 16}
# LlamaConfig's defaults for the fields QLLaMA reads (a qllama_config saved without them).
LLAMA_DEFAULTS = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-6,
    "vocab_size": 32000,
    "hidden_act": "silu",
}
# QLLaMA's rotary base: fixed in its code (LlamaRotaryEmbedding's default), not read from the config.
QLLAMA_ROPE_THETA = 10000.0
POOL_NORM_EPS = 1e-5  # the heads' LayerNorms: partial(nn.LayerNorm, eps=1e-5)


# ---- config ------------------------------------------------------------------------


def _llama_field(qllama: dict, name: str):
    value = qllama.get(name)
    return LLAMA_DEFAULTS[name] if value is None else value


def query_transformer_from_hf(hf: dict) -> QueryTransformer:
    """QLLaMA's shape from an ``internvl`` config.json (``qllama_config`` and the outer query fields)."""
    qllama = hf.get("qllama_config") or {}
    act = _llama_field(qllama, "hidden_act")
    if act != "silu":
        raise MlcVisionError(f"QLLaMA hidden_act {act!r} is not supported (only silu, LLaMA's SwiGLU)")
    return QueryTransformer(
        num_query_tokens=int(hf.get("num_query_token") or HF_DEFAULTS["num_query_token"]),
        hidden_size=_llama_field(qllama, "hidden_size"),
        intermediate_size=_llama_field(qllama, "intermediate_size"),
        num_hidden_layers=_llama_field(qllama, "num_hidden_layers"),
        num_attention_heads=_llama_field(qllama, "num_attention_heads"),
        cross_attention_frequency=int(hf.get("cross_attention_frequency") or HF_DEFAULTS["cross_attention_frequency"]),
        rms_norm_eps=float(_llama_field(qllama, "rms_norm_eps")),
        rope_theta=QLLAMA_ROPE_THETA,
        vocab_size=_llama_field(qllama, "vocab_size"),
        attn_pool_num_heads=int(hf.get("attn_pool_num_heads") or HF_DEFAULTS["attn_pool_num_heads"]),
    ).validated()


def config_from_hf(hf: dict) -> VisionConfig:
    """Our config from an InternVL-14B ``config.json`` (``model_type: internvl``).

    The tower is InternViT-6B's config (``vision_config``), run at
    ``force_image_size`` when set (InternVLModel resizes its position
    embedding to it; convert interpolates once). Preprocessing is the hub
    checkpoint's ``CLIPImageProcessor``: resize the short side to the image
    size, center crop, ImageNet mean/std. No tiling.
    """
    vision = dict(hf.get("vision_config") or {})
    tower = intern_vit.config_from_hf(vision)
    size = hf.get("force_image_size") or tower.image_size
    checkpoint_size = tower.image_size
    return VisionConfig.from_dict(
        {
            **tower.to_dict(),
            "family": NAME,
            "image_size": size,
            "checkpoint_image_size": checkpoint_size if checkpoint_size != size else None,
            "tiling": None,
            "preprocess": Preprocess(
                resize="shortest_edge", size=size, crop_size=size, resample="bicubic",
                mean=intern_vit.IMAGENET_MEAN, std=intern_vit.IMAGENET_STD,
            ).to_dict(),
            "qllama": query_transformer_from_hf(hf).to_dict(),
            # the InternVL-C/G heads' width; settled to None where the checkpoint has no heads (LLaVA's copy)
            "projection_dim": int(hf.get("clip_embed_dim") or HF_DEFAULTS["clip_embed_dim"]),
        }
    )


def claims(hf_config: dict, keys: Iterable[str]) -> bool:
    """True when the checkpoint holds QLLaMA's query tokens next to an InternViT."""
    keys = list(keys)
    has_queries = any(key.endswith("query_tokens") for key in keys)
    return has_queries and any(".qllama.model." in f".{key}" for key in keys)


# ---- QLLaMA -------------------------------------------------------------------------


def rotary_tables(positions: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin`` ``[positions, head_dim]`` (float32) of LLaMA's rotate-half rotary embedding.

    Channel ``i`` and ``i + head_dim/2`` rotate together by ``position *
    theta ** (-2i / head_dim)``; the table repeats the angles for both halves.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angles = np.outer(np.arange(positions, dtype=np.float32), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last axis (halves of the head)."""
    half = x.shape[-1] // 2
    x1 = layers.slice_axis(x, x.ndim - 1, 0, half, "rot_lo")
    x2 = layers.slice_axis(x, x.ndim - 1, half, 2 * half, "rot_hi")
    return op.concat([op.negative(x2), x1], dim=x.ndim - 1)


class QLlamaSelfAttention(nn.Module):
    """LLaMA attention over the query tokens: rotary q/k, no mask, no bias."""

    def __init__(self, q: QueryTransformer):
        d = q.hidden_size
        self.num_heads = q.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        cos, sin = rotary_tables(q.num_query_tokens, d // self.num_heads, q.rope_theta)
        self.cos_table, self.sin_table = cos, sin

    def _rotary(self, x: Tensor) -> Tensor:
        """``[b, s, h, hd]`` rotated by position (the tables broadcast over batch and heads)."""
        s, hd = x.shape[1], x.shape[3]
        cos = op.reshape(nn.Tensor.from_const(self.cos_table).astype(x.dtype), (1, s, 1, hd))
        sin = op.reshape(nn.Tensor.from_const(self.sin_table).astype(x.dtype), (1, s, 1, hd))
        return x * cos + rotate_half(x) * sin

    def forward(self, x: Tensor) -> Tensor:
        q = self._rotary(layers.split_heads(self.q_proj(x), self.num_heads))
        k = self._rotary(layers.split_heads(self.k_proj(x), self.num_heads))
        v = layers.split_heads(self.v_proj(x), self.num_heads)
        scale = 1.0 / math.sqrt(q.shape[-1])
        return self.o_proj(layers.merge_heads(op.scaled_dot_product_attention(q, k, v, scale=scale)))


class QLlamaCrossAttention(nn.Module):
    """Queries (``norm1``) attend to the tower's tokens (``norm2``, the tower's width); no rotary, no mask."""

    def __init__(self, q: QueryTransformer, vision_width: int):
        d = q.hidden_size
        self.num_heads = q.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(vision_width, d, bias=False)
        self.v_proj = nn.Linear(vision_width, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.norm1 = layers.RMSNorm(d, q.rms_norm_eps)
        self.norm2 = layers.RMSNorm(vision_width, q.rms_norm_eps)

    def forward(self, x: Tensor, vision: Tensor) -> Tensor:
        kv = self.norm2(vision)
        out = layers.attention(self.q_proj(self.norm1(x)), self.k_proj(kv), self.v_proj(kv), self.num_heads)
        return self.o_proj(out)


class QLlamaMlp(nn.Module):
    """LLaMA's SwiGLU: ``down(silu(gate(x)) * up(x))``, no bias."""

    def __init__(self, q: QueryTransformer):
        self.gate_proj = nn.Linear(q.hidden_size, q.intermediate_size, bias=False)
        self.up_proj = nn.Linear(q.hidden_size, q.intermediate_size, bias=False)
        self.down_proj = nn.Linear(q.intermediate_size, q.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(op.silu(self.gate_proj(x)) * self.up_proj(x))


class QLlamaDecoderLayer(nn.Module):
    """Self-attention, then (every ``cross_attention_frequency``-th layer) cross-attention, then the MLP."""

    def __init__(self, q: QueryTransformer, vision_width: int, cross: bool):
        self.self_attn = QLlamaSelfAttention(q)
        self.cross_attn = QLlamaCrossAttention(q, vision_width) if cross else None
        self.mlp = QLlamaMlp(q)
        self.input_layernorm = layers.RMSNorm(q.hidden_size, q.rms_norm_eps)
        self.post_attention_layernorm = layers.RMSNorm(q.hidden_size, q.rms_norm_eps)

    def forward(self, x: Tensor, vision: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, vision)
        return x + self.mlp(self.post_attention_layernorm(x))


def has_cross_attention(layer: int, frequency: int) -> bool:
    """QLLaMA's layers ``0, f, 2f, ...`` cross-attend to the vision tokens."""
    return layer % frequency == 0


class QLlama(nn.Module):
    """``qllama.model`` without its token embedding: the decoder layers and the final norm."""

    def __init__(self, q: QueryTransformer, vision_width: int):
        self.layers = nn.ModuleList(
            [
                QLlamaDecoderLayer(q, vision_width, has_cross_attention(i, q.cross_attention_frequency))
                for i in range(q.num_hidden_layers)
            ]
        )
        self.norm = layers.RMSNorm(q.hidden_size, q.rms_norm_eps)

    def hidden_states(self, queries: Tensor, vision: Tensor) -> list[Tensor]:
        """The input of each layer, then the final normed state (the last is ``query_outputs``)."""
        states = [queries]
        x = queries
        for layer in self.layers:
            x = layer(x, vision)
            states.append(x)
        states[-1] = self.norm(x)
        return states


# ---- InternVL-C / InternVL-G image heads ------------------------------------------------


class PoolingCrossAttention(nn.Module):
    """``cross_attn`` of InternVL's attention pooling: q/k/v without a Linear bias, separate ``*_bias`` vectors."""

    def __init__(self, width: int, out: int, num_heads: int):
        self.num_heads = num_heads
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.q_bias = nn.Parameter((width,))
        self.k_bias = nn.Parameter((width,))
        self.v_bias = nn.Parameter((width,))
        self.proj = nn.Linear(width, out)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        q, k, v = self.q(query) + self.q_bias, self.k(keys) + self.k_bias, self.v(values) + self.v_bias
        return self.proj(layers.attention(q, k, v, self.num_heads))


class AttentionPool(nn.Module):
    """``clip_projector`` / ``clip_projector2``: the token mean (LayerNorm ``norm1_q``) attends to the tokens.

    Keys are ``norm1_k(x)``, values ``norm1_v(x)`` (LayerNorms, eps 1e-5);
    the result is ``[b, 1, out]``.
    """

    def __init__(self, width: int, out: int, num_heads: int):
        if width % num_heads:
            raise MlcVisionError(f"attention pooling: width {width} is not divisible by attn_pool_num_heads {num_heads}")
        self.norm1_q = nn.LayerNorm(width, eps=POOL_NORM_EPS)
        self.norm1_k = nn.LayerNorm(width, eps=POOL_NORM_EPS)
        self.norm1_v = nn.LayerNorm(width, eps=POOL_NORM_EPS)
        self.cross_attn = PoolingCrossAttention(width, out, num_heads)

    def forward(self, x: Tensor) -> Tensor:
        mean = op.sum(x, axis=1, keepdims=True) / float(x.shape[1])
        return self.cross_attn(self.norm1_q(mean), self.norm1_k(x), self.norm1_v(x))


def l2_normalized(x: Tensor) -> Tensor:
    """``x / ||x||`` over the last axis (computed in float32)."""
    x32 = x.astype("float32") if x.dtype != "float32" else x
    out = x32 / op.sqrt(op.sum(x32 * x32, axis=-1, keepdims=True))
    return out.astype(x.dtype) if x.dtype != "float32" else out


# ---- the whole encoder ----------------------------------------------------------------


def _query_config(config: VisionConfig) -> QueryTransformer:
    if config.qllama is None:
        raise MlcVisionError(f"family {NAME} needs the config's qllama section (QLLaMA's shape)")
    return config.qllama


class VisionModel(intern_vit.VisionModel):
    """InternViT-6B (all its layers) and QLLaMA; ``forward`` returns ``(features, query_outputs)``."""

    def __init__(self, config: VisionConfig, full: bool = False):
        super().__init__(config, full=True)  # the query tokens read the tower's last hidden state
        q = _query_config(config)
        self.qllama = QLlama(q, config.hidden_size)
        self.query_tokens = nn.Parameter((1, q.num_query_tokens, q.hidden_size))
        pooled = config.feature == "pooled"
        if pooled and not config.projection_dim:
            raise MlcVisionError(
                "feature 'pooled' is InternVL-C/G's image embedding: this checkpoint has no clip_projector heads"
            )
        heads = config.projection_dim and (full or pooled)
        self.clip_projector = AttentionPool(config.hidden_size, config.projection_dim, q.attn_pool_num_heads) if heads else None
        with_queries = heads and (full or q.pooled_head == "internvl_g")
        self.clip_projector2 = (
            AttentionPool(q.hidden_size, config.projection_dim, q.attn_pool_num_heads) if with_queries else None
        )

    def _queries(self, batch) -> Tensor:
        _, n, d = self.query_tokens.shape
        return op.broadcast_to(self.query_tokens, (batch, n, d))

    def tower_states(self, pixel_values: Tensor) -> list[Tensor]:
        return super().hidden_states(pixel_values)

    def hidden_states(self, pixel_values: Tensor) -> list[Tensor]:
        """The tower's hidden states, then QLLaMA's (see the module docstring)."""
        tower = self.tower_states(pixel_values)
        return tower + self.qllama.hidden_states(self._queries(pixel_values.shape[0]), tower[-1])

    def _query_outputs(self, tower: list[Tensor], batch) -> Tensor:
        return self.qllama.hidden_states(self._queries(batch), tower[-1])[-1]

    def image_embedding(self, tower: list[Tensor], batch) -> Tensor:
        """InternVL-C: ``clip_projector(last state)``; InternVL-G: that and ``clip_projector2(queries)``, normalized, summed."""
        backbone = self.clip_projector(tower[-1])
        if self.config.qllama.pooled_head == "internvl_c":
            return backbone
        queries = self.clip_projector2(self._query_outputs(tower, batch))
        return l2_normalized(backbone) + l2_normalized(queries)

    def forward(self, pixel_values: Tensor):
        """``(features, query_outputs)``; ``feature="pooled"``: the InternVL-C/G image embedding ``[b, 1, dim]``."""
        tower, batch = self.tower_states(pixel_values), pixel_values.shape[0]
        if self.config.feature == "pooled":
            return self.image_embedding(tower, batch)
        return layers.features(tower, self.config, self.pooled), self._query_outputs(tower, batch)


# ---- weights ---------------------------------------------------------------------------

# InternVL's LLaVA fork keeps the whole InternVLModel under this prefix of its checkpoint.
LLAVA_TOWER = r"model\.vision_tower\.vision_tower\."

WEIGHTS = WeightMap(
    prefixes=(
        ("vision_model.", ""),
        ("qllama.model.", "qllama."),
        ("query_tokens", "query_tokens"),
        ("model.vision_tower.vision_tower.vision_model.", ""),
        ("model.vision_tower.vision_tower.qllama.model.", "qllama."),
        ("model.vision_tower.vision_tower.query_tokens", "query_tokens"),
        ("clip_projector.", "clip_projector."),  # the InternVL-C/G image heads (feature "pooled")
        ("clip_projector2.", "clip_projector2."),
        ("model.vision_tower.vision_tower.clip_projector.", "clip_projector."),
        ("model.vision_tower.vision_tower.clip_projector2.", "clip_projector2."),
    ),
    ignore=(
        rf"^({LLAVA_TOWER})?qllama\.lm_head\.",  # the language-model head: never read
        rf"^({LLAVA_TOWER})?qllama\.model\.embed_tokens\.",  # the text side's token embedding
        r"\.rotary_emb\.inv_freq$",  # a buffer older checkpoints saved; recomputed from the head width
        # the text side of InternVL-C/G (not compiled: docs/internvl14b.md) and the ITM head
        rf"^({LLAVA_TOWER})?itm_head\.",
        rf"^({LLAVA_TOWER})?(text_projection|logit_scale)$",
        *LLAVA_NON_VISION_KEYS,
    ),
    transforms=((r"^embeddings\.position_embedding$", interpolate_position_embedding),),
)


FAMILY = register(
    Family(
        name=NAME,
        model_types=MODEL_TYPES,
        architectures=ARCHITECTURES,
        config_from_hf=config_from_hf,
        module=VisionModel,
        weights=WEIGHTS,
        claims=claims,
        # InternVL-14B's hub checkpoint has the InternVL-C/G heads; InternVL's LLaVA copy of it has none
        optional_parts={"projection_dim": OptionalPart(r"^clip_projector\.")},
    )
)
