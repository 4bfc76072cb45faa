"""A resolved checkpoint -> its family, our :class:`VisionConfig` and its whole ``config.json``.

The one place where a Hugging Face checkpoint becomes a config: ``compile``
(through :mod:`.resolve`) and ``convert`` both call :func:`checkpoint_config`,
so a library and the params converted from the same checkpoint agree. The
family is routed from what ``config.json`` (and, when that is ambiguous, the
checkpoint's keys) says, never from the path; selection and projector
defaults come from a composite's outer config; preprocessing from
``preprocessor_config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import VisionConfig, list_presets, load_preset, preset_info
from ..errors import MlcVisionError
from ..models import Family, get_family, route
from .layouts import load_hf_config, outer_options
from .processor import read_preprocess
from .source import Source


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint is: its family, our config of it, and its ``config.json`` as read."""

    family: Family
    config: VisionConfig
    hf_config: dict


def _preset_for_tower(tower: str) -> str:
    """The preset whose ``hf_repo`` is the tower an original LLaVA config names."""
    for name in list_presets():
        if preset_info(name).get("hf_repo") == tower:
            return name
    raise MlcVisionError(
        f"config.json names vision tower {tower!r} without its config, and no preset has that hf_repo"
    )


def checkpoint_config(source: Source, family: str | Family | None = None, keys=None) -> Checkpoint:
    """Read a resolved checkpoint; ``family`` overrides routing, ``keys`` break routing ties."""
    vision, full = load_hf_config(source.path)
    if vision is None:
        config = load_preset(_preset_for_tower(full["mm_vision_tower"]))
        fam = get_family(config.family) if family is None else _family(family)
    else:
        fam = route(vision, keys) if family is None else _family(family)
        config = fam.config_from_hf(vision)
        preprocess = read_preprocess(source.path, full)
        if preprocess is not None:
            config = dataclasses.replace(config, preprocess=preprocess)
    return Checkpoint(fam, dataclasses.replace(config, **outer_options(full)).validated(), full)


def _family(family: str | Family) -> Family:
    return get_family(family) if isinstance(family, str) else family
