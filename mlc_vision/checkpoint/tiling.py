"""How a composite checkpoint says its images are tiled (the runtime contract: docs/tiling.md).

InternVL-chat records its dynamic tiles (``max_dynamic_patch``, ...; read by
the InternViT family, whose fields they are); LLaVA-NeXT records
``image_grid_pinpoints`` for anyres, LLaVA-OneVision those and
``vision_aspect_ratio`` (``anyres_max_9``). Other composites leave the tower's own
tiling (none, or InternVL's defaults for an InternViT saved alone).
"""

from __future__ import annotations

import dataclasses
import re

from ..config import DEFAULT_GRID_PINPOINTS, Tiling
from ..errors import MlcVisionError
from ..models.intern_vit import tiling_from_hf as internvl_tiling


# transformers' LlavaOnevisionConfig default: 1..6 tiles of 384 a side
ONEVISION_GRID_PINPOINTS = tuple((384 * r, 384 * c) for r in range(1, 7) for c in range(1, 7))


def anyres_tiling(full_config: dict) -> Tiling:
    """LLaVA-NeXT's ``image_grid_pinpoints`` (transformers' default when absent)."""
    pinpoints = full_config.get("image_grid_pinpoints", DEFAULT_GRID_PINPOINTS)
    if not isinstance(pinpoints, (list, tuple)) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in pinpoints
    ):
        raise MlcVisionError(f"config.json image_grid_pinpoints must be a list of [height, width], got {pinpoints!r}")
    return Tiling(mode="anyres", grid_pinpoints=tuple(tuple(p) for p in pinpoints)).validated()


ANYRES_MAX = re.compile(r"^anyres_max_(\d+)$")


def onevision_tiling(full_config: dict) -> Tiling:
    """LLaVA-OneVision: anyres plus ``vision_aspect_ratio`` ``anyres_max_N`` (transformers' defaults when absent)."""
    pinpoints = full_config.get("image_grid_pinpoints") or ONEVISION_GRID_PINPOINTS
    aspect = full_config.get("vision_aspect_ratio", "anyres_max_9")
    match = ANYRES_MAX.match(str(aspect))
    if match is None and aspect != "anyres":
        raise MlcVisionError(f"config.json vision_aspect_ratio {aspect!r} is not 'anyres' or 'anyres_max_N'")
    tiling = anyres_tiling({"image_grid_pinpoints": pinpoints})
    return dataclasses.replace(tiling, anyres_max=int(match.group(1)) if match else None).validated()


# composite model_type -> its tiling, read from the whole config.json
TILING_READERS = {"internvl_chat": internvl_tiling, "llava_next": anyres_tiling, "llava_onevision": onevision_tiling}


def tiling_options(full_config: dict) -> dict:
    """``{"tiling": ...}`` when the composite config records how images are tiled, else nothing."""
    reader = TILING_READERS.get(full_config.get("model_type"))
    return {} if reader is None else {"tiling": reader(full_config)}
