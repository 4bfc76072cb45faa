"""Rename tables from checkpoint keys to the Relax module's parameter names.

A family declares one :class:`WeightMap`. A checkpoint key is resolved in this
order:

1. ``ignore``: a regex over the full key that marks it deliberately unread
   (text tower, language model, logit scale, position-id buffers).
2. ``prefixes``: ``(prefix, replacement)`` pairs; the first prefix the key
   starts with is replaced (where the vision tower lives: ``vision_model.`` ->
   ``""``, LLaVA's ``model.vision_tower.vision_tower.vision_model.`` -> ``""``,
   a projector's ``model.mm_projector.`` -> ``projector.``). A key under none
   of them, and not ignored, is an unexpected key.
3. ``renames``: ``(regex, replacement)`` pairs applied in order with
   ``re.sub`` to what is left; most families need few because the modules use
   the checkpoint's own names.
4. ``transforms``: ``(regex over our name, fn(array, config) -> array)``, e.g.
   interpolating a position embedding to the compiled resolution.

The result must be a parameter of the module built for the full model (all
layers); anything else is an error that names the key and the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

Transform = Callable[[np.ndarray, object], np.ndarray]

# What a LLaVA-style checkpoint holds besides its vision tower: the language
# model and the projector (which models/projector.py maps when one is
# compiled in). Families whose towers LLaVA ships add these to ``ignore``.
LLAVA_NON_VISION_KEYS = (
    r"^(model\.)?language_model\.",
    r"^model\.layers\.",
    r"^model\.embed_tokens\.",
    r"^model\.norm\.",
    r"^lm_head\.",
    r"^(model\.)?mm_projector\.",
    r"^(model\.)?multi_modal_projector\.",
    r"^(model\.)?image_newline$",
)


@dataclass(frozen=True)
class WeightMap:
    prefixes: tuple[tuple[str, str], ...]
    renames: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    transforms: tuple[tuple[str, Transform], ...] = ()

    def is_ignored(self, key: str) -> bool:
        return any(re.search(pattern, key) for pattern in self.ignore)

    def rename(self, key: str) -> str | None:
        """Our parameter name for a checkpoint key, or None when no prefix matches."""
        for prefix, replacement in self.prefixes:
            if key.startswith(prefix):
                name = replacement + key[len(prefix) :]
                break
        else:
            return None
        for pattern, replacement in self.renames:
            name = re.sub(pattern, replacement, name)
        return name

    def transform(self, name: str, array: np.ndarray, config) -> np.ndarray:
        for pattern, fn in self.transforms:
            if re.search(pattern, name):
                array = fn(array, config)
        return array

    def merged(self, other: "WeightMap") -> "WeightMap":
        """Combine with another map (e.g. a projector's) so one pass reads both."""
        return WeightMap(
            prefixes=self.prefixes + other.prefixes,
            renames=self.renames + other.renames,
            ignore=self.ignore + other.ignore,
            transforms=self.transforms + other.transforms,
        )
