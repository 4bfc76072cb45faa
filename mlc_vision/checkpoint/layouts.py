"""Composite checkpoints: where the vision tower sits in a bigger ``config.json``.

CLIP/SigLIP full models (with their text tower), LLaVA, LLaVA-NeXT,
LLaVA-OneVision and InternVL-chat nest the tower's config and keep what the
chat model does with it (which hidden state, which tokens, which projector)
in the outer config. :func:`load_hf_config` finds the tower's config and
:func:`outer_options` reads the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import MlcVisionError
from ..validate import check_hf_vision_config
from .projector import projector_from_hf
from .tiling import tiling_options


# ---- composite configs (a vision tower inside a bigger model) ---------------------------


@dataclass(frozen=True)
class Composite:
    """How a composite ``config.json`` nests its vision tower.

    ``vision_model_type`` fills ``model_type`` for a nested vision config that
    lacks one (transformers omits it when it equals the default); ``inherit``
    names outer fields that describe the tower and override the nested ones
    (CLIPModel's ``projection_dim`` sizes ``visual_projection``; the nested
    config carries a stale default); ``language`` lists the checkpoint keys of
    the language model, never read. ``whole``: the encoder is the whole model
    and its family reads the outer config (InternVL-14B: the nested
    ``vision_config`` is only its InternViT-6B, QLLaMA's shape is outside it).
    """

    vision_model_type: str
    vision_key: str = "vision_config"
    inherit: tuple[str, ...] = ()
    language: tuple[str, ...] = ()
    whole: bool = False


LLM_KEYS = (
    r"^(model\.)?language_model\.",
    r"^model\.(layers|embed_tokens|norm|rotary_emb)\.",  # LLaVA-1.5 original: the LLM is the root model
    r"^lm_head\.",
    r"^model\.image_newline$",
)

COMPOSITES = {
    "clip": Composite("clip_vision_model", inherit=("projection_dim",)),
    "siglip": Composite("siglip_vision_model"),
    "llava": Composite("clip_vision_model", language=LLM_KEYS),
    "llava_next": Composite("clip_vision_model", language=LLM_KEYS),
    "llava_onevision": Composite("siglip_vision_model", language=LLM_KEYS),
    "internvl_chat": Composite("intern_vit_6b", language=LLM_KEYS),
    "internvl": Composite("intern_vit_6b", language=(r"^qllama\.lm_head\.",), whole=True),  # InternVL-14B
    "qwen2_vl": Composite("qwen2_vl_vision", language=LLM_KEYS),
    "qwen2_5_vl": Composite("qwen2_5_vl_vision", language=LLM_KEYS),
}


def load_hf_config(path: str | Path) -> tuple[dict | None, dict]:
    """``(vision_config, full_config)`` from a checkpoint directory.

    For a composite model (CLIP/SigLIP with their text tower, LLaVA,
    InternVL-chat) the first is the nested vision config, with ``model_type``
    filled in when missing; the second stays whole for what lives outside the
    tower (select layer, projector). The vision part is None when the
    checkpoint only names its tower (original LLaVA: ``mm_vision_tower``).
    """
    path = Path(path) / "config.json"
    try:
        full = json.loads(path.read_text())
    except FileNotFoundError:
        raise MlcVisionError(f"no config.json in {path.parent}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MlcVisionError(f"cannot read {path}: {err}") from None
    if not isinstance(full, dict):
        raise MlcVisionError(f"{path} is not a JSON object")
    composite = COMPOSITES.get(full.get("model_type"))
    nested = full.get(composite.vision_key if composite else "vision_config")
    if composite and composite.whole and isinstance(nested, dict):
        check_hf_vision_config(nested, path)
        return dict(full), full
    if isinstance(nested, dict):
        vision = dict(nested)
        if composite:
            if not vision.get("model_type"):
                vision["model_type"] = composite.vision_model_type
            vision.update({field: full[field] for field in composite.inherit if field in full})
        check_hf_vision_config(vision, path)
        return vision, full
    if full.get("mm_vision_tower"):  # the tower is named, its config is not in this checkpoint
        return None, full
    check_hf_vision_config(full, path)
    return dict(full), full


def language_model_keys(full_config: dict) -> tuple[str, ...]:
    """Regexes of the checkpoint keys that belong to the language model, if any."""
    composite = COMPOSITES.get(full_config.get("model_type"))
    if composite:
        return composite.language
    # an original LLaVA config (model_type llava, llava_llama, ...): the LLM is the root model
    return LLM_KEYS if full_config.get("mm_vision_tower") else ()


# ---- options that live outside the vision config -----------------------------------------

# What each outer field's feature names mean; any other value is an error, as in the models that read them
# (LLaVA's CLIPVisionTower.feature_select raises on an unexpected mm_vision_select_feature).
FEATURE_NAMES = {
    "vision_feature_select_strategy": {"default": "patch", "full": "cls_patch"},  # transformers Llava
    "mm_vision_select_feature": {"patch": "patch", "cls_patch": "cls_patch"},  # original LLaVA, InternVL's fork
}


def _feature(field: str):
    names = FEATURE_NAMES[field]

    def convert(value):
        if value not in names:
            raise MlcVisionError(f"config.json has {field} {value!r}; known: {', '.join(names)}")
        return names[value]

    return convert


# (outer config field, VisionConfig option, value -> option value or None to skip)
OUTER_FIELDS = (
    ("vision_feature_layer", "select_layer", lambda v: v if isinstance(v, int) else None),
    ("mm_vision_select_layer", "select_layer", lambda v: v if isinstance(v, int) else None),
    ("select_layer", "select_layer", lambda v: v if isinstance(v, int) else None),
    ("vision_feature_select_strategy", "feature", _feature("vision_feature_select_strategy")),
    ("mm_vision_select_feature", "feature", _feature("mm_vision_select_feature")),
    ("downsample_ratio", "downsample_ratio", lambda v: float(v) if isinstance(v, (int, float)) else None),
)

def is_composite(full_config: dict) -> bool:
    """Whether the vision tower is only part of this config (CLIPModel, LLaVA, InternVL-chat, ...)."""
    return isinstance(full_config.get("vision_config"), dict) or "mm_vision_tower" in full_config


def outer_options(full_config: dict) -> dict:
    """VisionConfig options a composite config sets: select layer, feature, projector, tiling.

    Empty for a plain vision checkpoint. The projector (kind, the language
    model's width, InternVL's ``downsample_ratio``) comes from
    :func:`~mlc_vision.checkpoint.projector.projector_from_hf`, which refuses variants we cannot
    compile.
    """
    if not is_composite(full_config):
        return {}
    options = {}
    for field, option, convert in OUTER_FIELDS:
        if field in full_config and option not in options:
            value = convert(full_config[field])
            if value is not None:
                options[option] = value
    spec = projector_from_hf(full_config)
    if spec is not None:
        options.update(spec.options())
    options.update(tiling_options(full_config))
    return options
