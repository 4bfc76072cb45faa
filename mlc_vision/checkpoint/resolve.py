"""``--model`` -> VisionConfig: a preset name, a checkpoint directory or a hub id.

A checkpoint is read by :func:`.config.checkpoint_config`, exactly as
``convert`` reads it, so a library and the params converted from the same
checkpoint agree. Compile options given by the user are applied last.
"""

from __future__ import annotations

import dataclasses

from ..config import VisionConfig, list_presets, load_preset, with_options
from ..errors import MlcVisionError
from .config import checkpoint_config
from .source import resolve_source


def is_preset(model: str) -> bool:
    return str(model) in list_presets()


def resolve_config(model: str, **options) -> VisionConfig:
    """Preset, checkpoint dir or hub id -> config, with compile options (``None`` = default) applied."""
    if is_preset(model):
        config = load_preset(model)
    else:
        try:
            source = resolve_source(model)
        except MlcVisionError as err:
            if "does not exist" in str(err) and "/" not in str(model):
                raise MlcVisionError(
                    f"{model!r} is neither a preset ({', '.join(list_presets())}) nor a checkpoint directory"
                ) from None
            raise
        config = checkpoint_config(source).config
    if options.get("projector") == "none":
        options["projector"] = None
        config = dataclasses.replace(config, projector=None)
    return with_options(config, **options)


def resolve_text_config(model: str):
    """The text tower of a whole CLIP / SigLIP / EVA-CLIP checkpoint (presets describe vision towers only)."""
    from ..models.text import text_config_from_hf

    if is_preset(model):
        raise MlcVisionError(
            f"preset {model!r} describes a vision tower only; give the whole checkpoint (directory or hub id) "
            "for its text tower"
        )
    checkpoint = checkpoint_config(resolve_source(model))
    return text_config_from_hf(checkpoint.family.name, checkpoint.hf_config)
