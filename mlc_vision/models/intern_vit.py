"""InternViT (InternViT-300M-448px, InternViT-6B-448px-V1-5): the vision tower of InternVL 1.5 / 2 / 2.5.

Semantics follow OpenGVLab's ``InternVisionModel`` (``modeling_intern_vit.py``,
config ``model_type: intern_vit_6b``), which InternVL-chat checkpoints embed
under ``vision_model.``:

- embeddings: a class token, a stride-14 conv with bias, and a learned
  position embedding ``[1, 1 + grid^2, d]`` added to all tokens. There is no
  pre-norm: ``hidden_states[0]`` is the embeddings.
- block: ``x + ls1 * attn(norm1(x))`` then ``x + ls2 * mlp(norm2(x))`` (layer
  scale), norms LayerNorm (300M) or RMSNorm (6B), MLP with erf GELU.
- attention: one fused ``qkv`` projection whose rows are ``q | k | v``; the 6B
  normalizes q and k with an RMSNorm over all ``d`` channels (not per head)
  before splitting into heads (``qk_normalization``).
- no final norm: the last hidden state is the output, and InternVL-chat takes
  ``hidden_states[select_layer]`` (``-1``) without the class token.

Routing is by ``config.json`` (``model_type`` ``intern_vit_6b`` for the tower,
``internvl_chat`` for a whole chat checkpoint), never by the checkpoint's
path: InternViT-300M is not a CLIP model even though some code treats it so.
"""

from __future__ import annotations

from typing import Iterable

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..config import Preprocess, Tiling, VisionConfig
from .weight_map import LLAVA_NON_VISION_KEYS, WeightMap
from .transforms import interpolate_position_embedding
from . import layers
from .registry import Family, register

NAME = "intern_vit"
MODEL_TYPES = ("intern_vit_6b", "internvl_chat")
ARCHITECTURES = ("InternVisionModel", "InternVLChatModel")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# InternVisionConfig's defaults (configuration_intern_vit.py): those of the 6B.
HF_DEFAULTS = {
    "hidden_size": 3200,
    "intermediate_size": 12800,
    "num_hidden_layers": 48,
    "num_attention_heads": 25,
    "image_size": 224,
    "patch_size": 14,
    "num_channels": 3,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "norm_type": "rms_norm",
    "qkv_bias": False,
    "qk_normalization": True,
}

# Keys only InternViT has: a fused qkv next to layer-scale vectors.
SIGNATURE_KEYS = ("encoder.layers.0.attn.qkv.weight", "encoder.layers.0.ls1")


# ---- config ------------------------------------------------------------------------


def _field(vision: dict, name: str):
    value = vision.get(name)
    return HF_DEFAULTS[name] if value is None else value


def config_from_hf(hf: dict) -> VisionConfig:
    """Our config from an ``InternVisionConfig`` dict or a whole ``internvl_chat`` config.

    A chat config nests the tower under ``vision_config`` and says which hidden
    state the LLM reads (``select_layer``) and at what size the tower runs
    (``force_image_size``: the chat model interpolates the position embedding
    to it, so we compile at that size and convert interpolates once).
    """
    vision = hf.get("vision_config") or hf
    checkpoint_size = _field(vision, "image_size")
    image_size = hf.get("force_image_size") or checkpoint_size
    chat = {}
    if "vision_config" in hf:
        chat = {"select_layer": hf.get("select_layer", -1), "downsample_ratio": hf.get("downsample_ratio", 0.5)}
    return VisionConfig(
        family=NAME,
        hidden_size=_field(vision, "hidden_size"),
        intermediate_size=_field(vision, "intermediate_size"),
        num_hidden_layers=_field(vision, "num_hidden_layers"),
        num_attention_heads=_field(vision, "num_attention_heads"),
        image_size=image_size,
        patch_size=_field(vision, "patch_size"),
        num_channels=_field(vision, "num_channels"),
        layer_norm_eps=_field(vision, "layer_norm_eps"),
        hidden_act=_field(vision, "hidden_act"),
        norm_type=_field(vision, "norm_type"),
        qkv_bias=bool(_field(vision, "qkv_bias")),
        qk_norm=bool(_field(vision, "qk_normalization")),
        layer_scale=True,
        class_token=True,
        patch_bias=True,
        checkpoint_image_size=checkpoint_size if checkpoint_size != image_size else None,
        tiling=tiling_from_hf(hf),
        preprocess=Preprocess(
            resize="exact", size=image_size, crop_size=None, resample="bicubic",
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
        ),
        **chat,
    ).validated()


def tiling_from_hf(hf: dict) -> Tiling | None:
    """InternVL's dynamic tiles, as an InternVL-chat config records them.

    ``dynamic_image_size: false`` means one tile per image (no tiling); a tower
    saved alone records nothing and gets InternVL's defaults (1..12 tiles and
    a thumbnail).
    """
    if hf.get("dynamic_image_size") is False:
        return None
    return Tiling(
        mode="internvl",
        min_tiles=int(hf.get("min_dynamic_patch", 1)),
        max_tiles=int(hf.get("max_dynamic_patch", 12)),
        thumbnail=bool(hf.get("use_thumbnail", True)),
    ).validated()


def claims(hf_config: dict, keys: Iterable[str]) -> bool:
    """True when the checkpoint holds InternViT's own tensors (a fused qkv and layer scale)."""
    keys = list(keys)
    return all(any(key.endswith(sig) for key in keys) for sig in SIGNATURE_KEYS)


# ---- module -------------------------------------------------------------------------


class InternVisionEmbeddings(nn.Module):
    """Class token + patch conv (with bias) + learned position embedding, no pre-norm."""

    def __init__(self, config: VisionConfig):
        d = config.hidden_size
        self.class_embedding = nn.Parameter((1, 1, d))
        self.patch_embedding = layers.PatchEmbedding(config, bias=True)
        self.position_embedding = nn.Parameter((1, config.num_positions, d))

    def forward(self, pixel_values: Tensor) -> Tensor:
        tokens = layers.prepend_class_token(self.patch_embedding(pixel_values), self.class_embedding)
        return tokens + self.position_embedding


class InternAttention(nn.Module):
    """Fused-qkv attention; the 6B's q/k RMSNorm spans all heads (``d`` channels) at once."""

    def __init__(self, config: VisionConfig):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(d, 3 * d, bias=config.qkv_bias)
        self.q_norm = layers.RMSNorm(d, config.layer_norm_eps) if config.qk_norm else None
        self.k_norm = layers.RMSNorm(d, config.layer_norm_eps) if config.qk_norm else None
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = op.split(self.qkv(x), 3, axis=-1)  # rows of qkv are q | k | v
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.proj(layers.attention(q, k, v, self.num_heads))


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm block with layer scale: ``x + ls * f(norm(x))``."""

    def __init__(self, config: VisionConfig):
        d = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = layers.Mlp(config)
        self.norm1 = layers.make_norm(config)
        self.norm2 = layers.make_norm(config)
        self.ls1 = nn.Parameter((d,)) if config.layer_scale else None
        self.ls2 = nn.Parameter((d,)) if config.layer_scale else None

    @staticmethod
    def _scaled(x: Tensor, scale) -> Tensor:
        return x if scale is None else x * scale

    def forward(self, x: Tensor) -> Tensor:
        x = x + self._scaled(self.attn(self.norm1(x)), self.ls1)
        return x + self._scaled(self.mlp(self.norm2(x)), self.ls2)


class VisionModel(nn.Module):
    """InternViT built up to the selected layer (``full`` builds every layer, for convert)."""

    def __init__(self, config: VisionConfig, full: bool = False):
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = layers.Encoder(
            [InternVisionEncoderLayer(config) for _ in range(layers.layers_to_build(config, full))]
        )

    def hidden_states(self, pixel_values: Tensor) -> list[Tensor]:
        return self.encoder.hidden_states(self.embeddings(pixel_values))

    @staticmethod
    def pooled(last_hidden: Tensor) -> Tensor:
        """InternVisionModel's pooler_output: the last layer's class token, no norm."""
        return layers.slice_axis(last_hidden, 1, 0, 1, "class_token")

    def forward(self, pixel_values: Tensor) -> Tensor:
        return layers.features(self.hidden_states(pixel_values), self.config, self.pooled)


# ---- weights -------------------------------------------------------------------------

WEIGHTS = WeightMap(
    prefixes=(
        ("vision_model.", ""),  # InternVL-chat checkpoints (InternVL 1.5 / 2 / 2.5)
        # InternViT-300M-448px / InternViT-6B-448px-V1-5 saved alone: no prefix
        ("embeddings.", "embeddings."),
        ("encoder.", "encoder."),
        # InternVL's LLaVA fork (internvl_chat_llava): the tower inside the whole checkpoint
        ("model.vision_tower.vision_tower.embeddings.", "embeddings."),
        ("model.vision_tower.vision_tower.encoder.", "encoder."),
    ),
    ignore=(
        # the chat model's LLM and projector (the projector has its own map in
        # models/projector.py when one is compiled in)
        r"^language_model\.",
        r"^mlp1\.",
        *LLAVA_NON_VISION_KEYS,
    ),
    transforms=(
        # a library compiled at another size than the checkpoint's
        (r"^embeddings\.position_embedding$", interpolate_position_embedding),
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
        claims=claims,
    )
)
