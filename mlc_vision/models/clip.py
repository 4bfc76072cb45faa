"""CLIP vision tower (OpenAI ViT-B/16, ViT-L/14, ViT-L/14-336; LLaVA-1.5's encoder).

Semantics follow transformers' ``CLIPVisionModel``: ``hidden_states[0]`` is
the embeddings after ``pre_layrnorm``; ``post_layernorm`` and
``visual_projection`` apply only to the pooled class token (``feature="pooled"``).
Layers after the selected hidden state are not built.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor

from ..config import Preprocess, VisionConfig
from .weight_map import LLAVA_NON_VISION_KEYS, WeightMap
from .transforms import interpolate_position_embedding
from . import layers
from .registry import Family, OptionalPart, register

NAME = "clip"
MODEL_TYPES = ("clip_vision_model", "clip")
ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")


# ---- config ------------------------------------------------------------------------


def config_from_hf(hf: dict) -> VisionConfig:
    """Our config from a ``CLIPVisionConfig`` dict (the vision part of a CLIP/LLaVA config)."""
    return VisionConfig(
        family=NAME,
        hidden_size=hf.get("hidden_size", 768),
        intermediate_size=hf.get("intermediate_size", 3072),
        num_hidden_layers=hf.get("num_hidden_layers", 12),
        num_attention_heads=hf.get("num_attention_heads", 12),
        image_size=hf.get("image_size", 224),
        patch_size=hf.get("patch_size", 32),
        num_channels=hf.get("num_channels", 3),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        hidden_act=hf.get("hidden_act", "quick_gelu"),
        class_token=True,
        patch_bias=False,
        projection_dim=hf.get("projection_dim"),
        preprocess=Preprocess(size=hf.get("image_size", 224), crop_size=hf.get("image_size", 224)),
    ).validated()


# ---- module -------------------------------------------------------------------------


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        self.class_embedding = nn.Parameter((config.hidden_size,))
        self.patch_embedding = layers.PatchEmbedding(config, bias=False)
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embedding(pixel_values)
        tokens = layers.prepend_class_token(patches, self.class_embedding)
        return tokens + self.position_embedding.weight


class VisionModel(nn.Module):
    """CLIP's vision transformer, built up to the selected layer (``full`` builds everything)."""

    def __init__(self, config: VisionConfig, full: bool = False):
        self.config = config
        pooled = full or config.feature == "pooled"
        num_layers = layers.layers_to_build(config, full)
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = layers.Encoder(
            [layers.EncoderLayer(config, layers.SelfAttention(config)) for _ in range(num_layers)]
        )
        if pooled:
            self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            if config.projection_dim:
                self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def hidden_states(self, pixel_values: Tensor) -> list[Tensor]:
        return self.encoder.hidden_states(self.pre_layrnorm(self.embeddings(pixel_values)))

    def pooled(self, last_hidden: Tensor) -> Tensor:
        """``[b, 1, width]``: post-norm of the class token, projected when a projection exists."""
        return layers.pooled_class_token(last_hidden, self.post_layernorm, getattr(self, "visual_projection", None))

    def forward(self, pixel_values: Tensor) -> Tensor:
        return layers.features(self.hidden_states(pixel_values), self.config, self.pooled)


# ---- weights -------------------------------------------------------------------------

WEIGHTS = WeightMap(
    prefixes=(
        ("vision_model.", ""),  # CLIPModel, CLIPVisionModelWithProjection; CLIPVisionModel in transformers v4
        # CLIPVisionModel as transformers v5 saves it: no vision_model. prefix
        ("embeddings.", "embeddings."),
        ("pre_layrnorm.", "pre_layrnorm."),
        ("encoder.", "encoder."),
        ("post_layernorm.", "post_layernorm."),
        ("visual_projection.", "visual_projection."),
        ("model.vision_tower.vision_tower.vision_model.", ""),  # LLaVA-1.5 (original repo)
        ("model.vision_tower.vision_model.", ""),  # transformers Llava, v4.52+ / v5
        ("vision_tower.vision_model.", ""),  # transformers Llava, older v4
        # transformers v5 Llava: the tower is a CLIPVisionModel without vision_model.
        # (in memory under model.vision_tower., saved by save_pretrained under vision_tower.)
        ("model.vision_tower.", ""),
        ("vision_tower.", ""),
    ),
    ignore=(
        r"^text_model\.",
        r"^text_projection\.",
        r"^logit_scale$",
        r"position_ids$",
        *LLAVA_NON_VISION_KEYS,
    ),
    # ``convert --image-size``: the patch rows of the position table resampled to the
    # new grid, class row kept (transformers' ``interpolate_pos_encoding=True``)
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
        # transformers writes projection_dim for every CLIP vision config; only the
        # models with a projection hold visual_projection
        optional_parts={"projection_dim": OptionalPart(r"^visual_projection\.")},
    )
)
