"""EVA-CLIP vision tower (EVA02-CLIP-E/14 "bigE", and the EVA-CLIP-8B style).

The checkpoint format is InternVL's Hugging Face port of EVA-CLIP
(``internvl_chat_llava/llava/model/multimodal_encoder/eva_clip``:
``EvaCLIPVisionModel`` / ``EvaCLIPModel``), a copy of transformers' CLIP with
these switches in its vision config:

- ``q_bias`` / ``k_bias`` / ``v_bias``: which of the q, k, v projections have
  a bias (EVA: q and v, not k).
- ``post_layernorm``: a **block** flag, not the final norm module of the same
  name. True gives post-norm blocks (E/14): ``x = x + LN1(attn(x));
  x = x + LN2(mlp(x))``; false gives CLIP's pre-norm blocks.
- ``use_rms_norm`` (EVA-CLIP-8B style): RMSNorm instead of LayerNorm.

Semantics follow the port: there is no pre-norm, so ``hidden_states[0]`` is
the embeddings (class token + patches + position embedding); the pooled
embedding is ``post_layernorm`` of the class token of the last hidden state,
then ``visual_projection`` (a Linear *with* bias in ``EvaCLIPModel``, as in
the original EVA-CLIP head; without one in ``EvaCLIPVisionModelWithProjection``). Layers after the selected hidden state are not
built.

The port reuses CLIP's ``model_type`` values (``clip`` / ``clip_vision_model``),
so :func:`claims` tells its configs apart from OpenAI CLIP's by the EVA-only
fields above.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor

from ..config import Preprocess, VisionConfig
from ..errors import MlcVisionError
from .weight_map import LLAVA_NON_VISION_KEYS, WeightMap
from .transforms import interpolate_position_embedding
from . import layers
from .registry import Family, OptionalPart, register

NAME = "eva_clip"
# The port saves CLIP's model types. Other EVA-CLIP ports ("eva_clip" in CogVLM,
# "evaclip_vision_model") name their keys differently and are not claimed.
MODEL_TYPES = ("clip_vision_model", "clip")
ARCHITECTURES = ("EvaCLIPVisionModel", "EvaCLIPVisionModelWithProjection", "EvaCLIPModel")

# Fields that only EVA-CLIP vision configs have (transformers' CLIPVisionConfig has none of them).
EVA_CONFIG_FIELDS = ("q_bias", "k_bias", "v_bias", "post_layernorm", "use_rms_norm")


# ---- routing ---------------------------------------------------------------------------


def _vision_part(hf: dict) -> dict:
    nested = hf.get("vision_config")
    return nested if isinstance(nested, dict) else hf


def _keys_say_eva(keys) -> bool:
    """q has a bias but k has none: EVA's attention (CLIP has all three biases)."""
    keys = list(keys)
    has = lambda suffix: any(k.endswith(suffix) for k in keys)  # noqa: E731
    return has("self_attn.q_proj.bias") and not has("self_attn.k_proj.bias")


def claims(hf_config: dict, keys) -> bool:
    """Whether a config that says ``clip`` is really InternVL's EVA-CLIP port."""
    vision = _vision_part(hf_config)
    if any(field in vision for field in EVA_CONFIG_FIELDS):
        return True
    archs = list(hf_config.get("architectures") or ()) + list(vision.get("architectures") or ())
    if any(str(a).startswith("EvaCLIP") for a in archs):
        return True
    return bool(keys) and _keys_say_eva(keys)


# ---- config ------------------------------------------------------------------------------

# What a norm flag of the port's config means for us (absent: LayerNorm).
NORM_TYPES = {False: "layer_norm", True: "rms_norm"}


def _qkv_bias(hf: dict) -> bool:
    """Our ``qkv_bias`` (EVA: q and v together). k's bias is irrelevant (see ``WEIGHTS``)."""
    q_bias, v_bias = bool(hf.get("q_bias", True)), bool(hf.get("v_bias", True))
    if q_bias != v_bias:
        raise MlcVisionError(f"EVA-CLIP config with q_bias={q_bias} but v_bias={v_bias} is not supported")
    return q_bias


def config_from_hf(hf: dict) -> VisionConfig:
    """Our config from the port's ``EvaCLIPVisionConfig`` dict (defaults are that class's)."""
    hf = _vision_part(hf)
    image_size = hf.get("image_size", 224)
    return VisionConfig(
        family=NAME,
        hidden_size=hf.get("hidden_size", 768),
        intermediate_size=hf.get("intermediate_size", 3072),
        num_hidden_layers=hf.get("num_hidden_layers", 12),
        num_attention_heads=hf.get("num_attention_heads", 12),
        image_size=image_size,
        patch_size=hf.get("patch_size", 32),
        num_channels=hf.get("num_channels", 3),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        hidden_act=hf.get("hidden_act", "gelu"),
        norm_type=NORM_TYPES[bool(hf.get("use_rms_norm", False))],
        qkv_bias=_qkv_bias(hf),
        post_norm_blocks=bool(hf.get("post_layernorm", False)),
        class_token=True,
        patch_bias=True,
        projection_dim=hf.get("projection_dim"),
        projection_bias=_projection_bias(hf),
        preprocess=Preprocess(size=image_size, crop_size=image_size),
    ).validated()


def _projection_bias(hf: dict) -> bool:
    """EvaCLIPModel's visual_projection has a bias; EvaCLIPVisionModelWithProjection's has none.

    The checkpoint's keys have the last word (see ``optional_parts``); this is
    what the config alone says.
    """
    return "EvaCLIPVisionModelWithProjection" not in (hf.get("architectures") or ())


# ---- module ---------------------------------------------------------------------------------


class EvaCLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        self.class_embedding = nn.Parameter((config.hidden_size,))
        self.patch_embedding = layers.PatchEmbedding(config, bias=True)
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        tokens = layers.prepend_class_token(self.patch_embedding(pixel_values), self.class_embedding)
        return tokens + self.position_embedding.weight


class VisionModel(nn.Module):
    """EVA-CLIP's vision transformer, built up to the selected layer (``full`` builds everything)."""

    def __init__(self, config: VisionConfig, full: bool = False):
        self.config = config
        pooled = full or config.feature == "pooled"
        self.embeddings = EvaCLIPVisionEmbeddings(config)
        # q and v carry a bias (qkv_bias), k never does: its bias would not change the softmax
        self.encoder = layers.Encoder(
            [
                layers.EncoderLayer(config, layers.SelfAttention(config, qv_bias=config.qkv_bias, k_bias=False))
                for _ in range(layers.layers_to_build(config, full))
            ]
        )
        if pooled:
            self.post_layernorm = layers.make_norm(config)
            if config.projection_dim:
                self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=config.projection_bias)

    def hidden_states(self, pixel_values: Tensor) -> list[Tensor]:
        return self.encoder.hidden_states(self.embeddings(pixel_values))

    def pooled(self, last_hidden: Tensor) -> Tensor:
        """``[b, 1, width]``: the normed class token, projected when a projection exists."""
        return layers.pooled_class_token(last_hidden, self.post_layernorm, getattr(self, "visual_projection", None))

    def forward(self, pixel_values: Tensor) -> Tensor:
        return layers.features(self.hidden_states(pixel_values), self.config, self.pooled)


# ---- weights -----------------------------------------------------------------------------------

WEIGHTS = WeightMap(
    prefixes=(
        ("vision_model.", ""),  # EvaCLIPVisionModel, EvaCLIPModel
        ("visual_projection.", "visual_projection."),  # EvaCLIPModel
        ("model.vision_tower.vision_tower.vision_model.", ""),  # InternVL's LLaVA port (whole checkpoint)
        ("vision_tower.vision_model.", ""),
    ),
    ignore=(
        r"^text_model\.",
        r"^text_projection\.",
        r"^logit_scale$",
        r"position_ids$",
        # A k bias adds q.b_k to every score of a query row, which the softmax
        # cancels: the attention output does not depend on it (port default k_bias=True).
        r"self_attn\.k_proj\.bias$",
        *LLAVA_NON_VISION_KEYS,
    ),
    # ``convert --image-size``: InternVL's port has no interpolation of its own, so the
    # rule is CLIP's (transformers' ``interpolate_pos_encoding``): the class row kept,
    # the patch rows resampled bicubic (a = -0.75), align_corners=False, no antialias.
    transforms=((r"^embeddings\.position_embedding\.weight$", interpolate_position_embedding),),
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
        # the port writes projection_dim for every vision config; only the models with
        # a projection hold visual_projection, and EvaCLIPVisionModelWithProjection's has no bias
        optional_parts={
            "projection_dim": OptionalPart(r"^visual_projection\."),
            "projection_bias": OptionalPart(r"^visual_projection\.bias$", absent=False),
        },
    )
)
