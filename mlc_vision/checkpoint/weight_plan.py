"""Which checkpoint keys are read, and as which of our parameters.

The tower's rename table (its family's), the projector's when one is
converted, and the keys nobody reads (the language model of a composite, a
projector left out) together decide, for every key, a parameter name, a
deliberate skip (:data:`IGNORED`) or an error (None: unexpected). Deciding
from the keys alone lets ``convert`` skip whole shards of a language model
without opening them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..config import VisionConfig
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

    def resolve(self, key: str):
        if self.projector is not None and not self.projector.is_ignored(key):
            name = self.projector.rename(key)
            if name is not None:
                return name
        if self.tower.is_ignored(key):
            return IGNORED
        return self.tower.rename(key)

    def wanted(self, key: str) -> bool:
        """Whether a key must be read (used to skip the shards of a language model)."""
        return self.resolve(key) is not IGNORED

    def _maps(self) -> list[WeightMap]:
        return [self.tower] + ([self.projector] if self.projector else [])

    def transform(self, name: str, array: np.ndarray, config) -> np.ndarray:
        for weight_map in self._maps():
            array = weight_map.transform(name, array, config)
        return array

    def has_transform(self, name: str) -> bool:
        return any(re.search(pattern, name) for m in self._maps() for pattern, _ in m.transforms)


def key_mapper(fam: Family, config: VisionConfig, hf_config: dict) -> KeyMapper:
    """The mapper of a checkpoint of family ``fam`` converted for ``config``."""
    ignore = language_model_keys(hf_config) + (() if config.projector else PROJECTOR_KEYS)
    tower = fam.weights.merged(WeightMap(prefixes=(), ignore=ignore))
    return KeyMapper(tower, projectors.weight_map(config) if config.projector else None)
