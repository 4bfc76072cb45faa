"""Which checkpoint keys are read, and as which of our parameters.

The tower's rename table (its family's), the projector's when one is
converted, and the keys nobody reads (the language model of a composite, a
projector left out) together decide, for every key, a parameter name, a
deliberate skip (:data:`IGNORED`) or an error (None: unexpected). Deciding
from the keys alone lets ``convert`` skip whole shards of a language model
without opening them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from ..config import IMAGE_NEWLINE_PARAM, VisionConfig
from ..models import Family
from ..models import projector as projectors
from ..models.weight_map import WeightMap
from .layouts import language_model_keys

# Checkpoint keys of projectors, ignored when the projector is not converted.
PROJECTOR_KEYS = (r"^(model\.)?mm_projector\.", r"^(model\.)?multi_modal_projector\.", r"^mlp1\.")

IGNORED = object()  # sentinel: a key the maps deliberately skip


@dataclass(frozen=True)
class KeyMapper:
    """Checkpoint key -> parameter name, :data:`IGNORED`, or None (unexpected).

    A projector's map is tried first so that its keys win over a tower map
    that ignores them (the CLIP map ignores LLaVA's projector keys, because a
    tower-only conversion must not trip on them).
    """

    tower: WeightMap
    projector: WeightMap | None = None
    text: WeightMap | None = None  # a contrastive model's text side, when converted

    def resolve(self, key: str):
        for first in (self.text, self.projector):
            if first is not None and not first.is_ignored(key):
                name = first.rename(key)
                if name is not None:
                    return name
        if self.tower.is_ignored(key):
            return IGNORED
        return self.tower.rename(key)

    def wanted(self, key: str) -> bool:
        """Whether a key must be read (used to skip the shards of a language model)."""
        return self.resolve(key) is not IGNORED

    def _maps(self) -> list[WeightMap]:
        return [m for m in (self.tower, self.projector, self.text) if m is not None]

    def transform(self, name: str, array: np.ndarray, config) -> np.ndarray:
        for weight_map in self._maps():
            array = weight_map.transform(name, array, config)
        return array

    def has_transform(self, name: str) -> bool:
        return any(re.search(pattern, name) for m in self._maps() for pattern, _ in m.transforms)


# The tower's map when only the text side is converted: every other key is skipped.
NOTHING_ELSE = WeightMap(prefixes=(), ignore=(r"",))


def key_mapper(fam: Family, config: VisionConfig, hf_config: dict, text: WeightMap | None = None,
               vision: bool = True) -> KeyMapper:
    """The mapper of a checkpoint of family ``fam`` converted for ``config`` (``text``: its text side too)."""
    if not vision:
        return KeyMapper(NOTHING_ELSE, None, text)
    ignore = language_model_keys(hf_config) + (() if config.projector else PROJECTOR_KEYS)
    tower = fam.weights.merged(WeightMap(prefixes=(), ignore=ignore))
    return KeyMapper(tower, projectors.weight_map(config) if config.projector else None, text)


# ---- what the checkpoint holds -------------------------------------------------------------


def mapped_names(mapper: KeyMapper, keys) -> set[str]:
    """Our parameter names for the checkpoint keys that map to one."""
    names = (mapper.resolve(key) for key in keys)
    return {name for name in names if isinstance(name, str)}


def settle_optional_parts(fam: Family, config: VisionConfig, hf_config: dict, keys) -> VisionConfig:
    """Set each optional part the checkpoint lacks to its ``absent`` value (keys None: keep the config).

    The one decision ``compile`` and ``convert`` share: a ``CLIPVisionModel``
    says ``projection_dim: 512`` but holds no projection, so its pooled
    output is the normed class token, ``hidden_size`` wide, in both.
    """
    if keys is None:
        return config
    names = mapped_names(key_mapper(fam, config, hf_config), keys)
    absent = {
        field: part.absent
        for field, part in fam.optional_parts.items()
        if getattr(config, field) != part.absent and not any(re.search(part.pattern, n) for n in names)
    }
    return dataclasses.replace(config, **absent) if absent else config


def expected_params(fam: Family, config: VisionConfig, dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of the full model (every layer, post-norm, heads, projector) in ``dtype``."""
    module = fam.module(config, full=True)
    module.to(dtype)
    params = {name: (tuple(int(d) for d in p.shape), str(p.dtype)) for name, p in module.named_parameters()}
    if config.projector:
        params.update(projectors.projector_params(config, dtype))
    if config.has_image_newline:
        params[IMAGE_NEWLINE_PARAM] = ((config.projector_hidden_size,), dtype)
    return params
