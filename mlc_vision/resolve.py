"""``--model`` -> VisionConfig: a preset name, a checkpoint directory or a hub id.

For a checkpoint, :func:`mlc_vision.weights.convert.checkpoint_config` reads
it exactly as ``convert`` does (family routed from ``config.json``, never from
the path; selection and projector defaults from a LLaVA / InternVL-chat outer
config; preprocessing from ``preprocessor_config.json``), so a library and
the params converted from the same checkpoint agree. Compile options given
by the user are applied last.
"""

from __future__ import annotations

import dataclasses

from .config import VisionConfig, list_presets, load_preset, with_options
from .errors import MlcVisionError
from .models import get_family


def is_preset(model: str) -> bool:
    return str(model) in list_presets()


def resolve_config(model: str, **options) -> VisionConfig:
    """Preset, checkpoint dir or hub id -> config, with compile options (``None`` = default) applied."""
    if is_preset(model):
        config = load_preset(model)
    else:
        from .weights.convert import checkpoint_config
        from .weights.source import resolve_source

        try:
            source = resolve_source(model)
        except MlcVisionError as err:
            if "does not exist" in str(err) and "/" not in str(model):
                raise MlcVisionError(
                    f"{model!r} is neither a preset ({', '.join(list_presets())}) nor a checkpoint directory"
                ) from None
            raise
        _, config, _ = checkpoint_config(source)
    projector = options.get("projector")
    if projector == "none":
        options["projector"] = None
        config = dataclasses.replace(config, projector=None)
    return with_options(config, **options)


def family_of(config: VisionConfig):
    return get_family(config.family)
