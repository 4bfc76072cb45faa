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
import re
from dataclasses import dataclass

from ..config import VisionConfig
from ..models import Family, get_family, route
from .keys import Shapes, checkpoint_shapes
from .layouts import language_model_keys, load_hf_config, outer_options
from .processor import read_preprocess
from .source import Source
from .tower import named_tower
from .weight_plan import settle_optional_parts


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint is: its family, our config of it, its ``config.json`` and its keys.

    ``shapes`` is ``{key: shape}`` from the weight files' headers, or None
    when they could not be listed without reading weights (then the config's
    optional parts are taken at their word until ``convert`` sees the keys).
    """

    family: Family
    config: VisionConfig
    hf_config: dict
    shapes: Shapes | None = None


def checkpoint_config(source: Source, family: str | Family | None = None, shapes: Shapes | None = None) -> Checkpoint:
    """Read a resolved checkpoint; ``family`` overrides routing; ``shapes`` (default: listed here) decide the rest.

    The checkpoint's keys route a ``model_type`` that several families claim,
    identify a tower that a LLaVA config only names, and settle the optional
    parts (a projection the config announces but the weights lack).
    """
    vision, full = load_hf_config(source.path)
    if shapes is None:
        language = [re.compile(pattern) for pattern in language_model_keys(full)]
        shapes = checkpoint_shapes(source, skip=lambda key: any(p.search(key) for p in language))
    keys = list(shapes) if shapes is not None else None
    chosen = None if family is None else _family(family)
    if vision is None:
        fam, config = named_tower(source.path, full, shapes, chosen)
    else:
        fam = chosen or route(vision, keys)
        config = fam.config_from_hf(vision)
        preprocess = read_preprocess(source.path, full)
        if preprocess is not None:
            config = dataclasses.replace(config, preprocess=preprocess)
    config = dataclasses.replace(config, **outer_options(full)).validated()
    config = settle_optional_parts(fam, config, full, keys)
    return Checkpoint(fam, config, full, shapes)


def _family(family: str | Family) -> Family:
    return get_family(family) if isinstance(family, str) else family
