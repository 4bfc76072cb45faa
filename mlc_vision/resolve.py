"""``--model`` -> VisionConfig: a preset name, a checkpoint directory or a hub id.

For a checkpoint the family is routed from its ``config.json`` (never from
its path), the architecture comes from the family's ``config_from_hf``, the
selection and projector defaults from the outer (LLaVA / InternVL-chat)
config, and the preprocessing from ``preprocessor_config.json`` when present.
Compile options given by the user are applied last.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .config import VisionConfig, list_presets, load_preset, with_options
from .errors import MlcVisionError
from .models import get_family, route


def is_preset(model: str) -> bool:
    return str(model) in list_presets()


def config_from_checkpoint_dir(path: Path, keys=None) -> VisionConfig:
    """The config of the checkpoint in ``path`` (config.json, preprocessor_config.json)."""
    from .runtime.preprocess import preprocess_config_from_hf
    from .weights.source import load_hf_config, outer_options

    vision, full = load_hf_config(path)
    if vision is None:
        raise MlcVisionError(
            f"{path}/config.json names its vision tower ({full.get('mm_vision_tower')!r}) without its config; "
            "pass --model with that tower's preset or checkpoint"
        )
    family = route(vision, keys)
    config = family.config_from_hf(vision)
    options = outer_options(full)
    pre_path = Path(path) / "preprocessor_config.json"
    if pre_path.is_file():
        try:
            pre = preprocess_config_from_hf(json.loads(pre_path.read_text()))
        except json.JSONDecodeError as err:
            raise MlcVisionError(f"cannot read {pre_path}: {err}") from None
        if full.get("image_aspect_ratio") == "pad":  # LLaVA-1.5 pads images to a square first
            pre = dataclasses.replace(pre, pad_to_square=True)
        options["preprocess"] = pre
    return dataclasses.replace(config, **options).validated()


def resolve_config(model: str, **options) -> VisionConfig:
    """Preset, checkpoint dir or hub id -> config, with compile options (``None`` = default) applied."""
    if is_preset(model):
        config = load_preset(model)
    else:
        from .weights.source import resolve_source

        try:
            source = resolve_source(model)
        except MlcVisionError as err:
            if "does not exist" in str(err) and "/" not in str(model):
                raise MlcVisionError(
                    f"{model!r} is neither a preset ({', '.join(list_presets())}) nor a checkpoint directory"
                ) from None
            raise
        config = config_from_checkpoint_dir(source.path)
    projector = options.get("projector")
    if projector == "none":
        options["projector"] = None
        config = dataclasses.replace(config, projector=None)
    return with_options(config, **options)


def family_of(config: VisionConfig):
    return get_family(config.family)
