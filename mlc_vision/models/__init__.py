"""Model families and how a checkpoint's config is routed to one.

Each family is one module in this package that defines:

- ``FAMILY``: its name (``clip``, ``eva_clip``, ``intern_vit``, ``siglip``).
- ``MODEL_TYPES`` / ``ARCHITECTURES``: the ``config.json`` values it claims.
- ``claims(hf_config, keys) -> bool`` (optional): tie-breaker from the
  checkpoint's keys when the config alone is ambiguous. A port that reuses
  another family's ``model_type`` (InternVL's EVA-CLIP says ``clip``) lists
  it too and claims its own configs; when no candidate claims, the one
  candidate without ``claims`` (the model_type's owner) is chosen.
- ``config_from_hf(hf_vision_config: dict) -> VisionConfig``.
- ``VisionModel(config)``: the Relax ``nn.Module``; ``hidden_states(x)``
  returns the hidden states up to ``config.layer_index`` and ``forward(x)``
  the selected features.
- ``WEIGHTS``: a :class:`mlc_vision.weights.mapping.WeightMap` (the rename
  table from checkpoint keys to the module's parameter names).

Routing never looks at the path of the checkpoint, only at what it contains.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterable

from ..errors import MlcVisionError

FAMILY_MODULES = ("clip", "eva_clip", "intern_vit", "siglip")


def available_families() -> list[str]:
    """Family modules that exist in this installation."""
    names = []
    for name in FAMILY_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            continue
        names.append(name)
    return names


def get_family(name: str) -> ModuleType:
    if name not in FAMILY_MODULES:
        raise MlcVisionError(f"unknown model family {name!r}; supported: {', '.join(available_families())}")
    return importlib.import_module(f"{__name__}.{name}")


def route(hf_config: dict, keys: Iterable[str] | None = None) -> ModuleType:
    """Pick the family for a (vision) config dict: by model_type, then architectures, then keys."""
    keys = list(keys) if keys is not None else None
    families = [get_family(name) for name in available_families()]
    model_type = hf_config.get("model_type")
    by_type = [f for f in families if model_type in getattr(f, "MODEL_TYPES", ())]
    archs = set(hf_config.get("architectures") or ())
    by_arch = [f for f in families if archs & set(getattr(f, "ARCHITECTURES", ()))]
    candidates = by_type or by_arch
    if len(candidates) > 1 or (not candidates and keys):
        pool = candidates or families
        claimed = [f for f in pool if hasattr(f, "claims") and f.claims(hf_config, keys or [])]
        if len(claimed) == 1:
            return claimed[0]
        # A port that reuses another family's model_type (InternVL's EVA-CLIP says
        # "clip") claims its own configs; the others stay with the family that
        # owns the model_type, the one candidate that needs no claims().
        owners = [f for f in candidates if not hasattr(f, "claims")]
        if not claimed and len(owners) == 1:
            return owners[0]
    if len(candidates) == 1:
        return candidates[0]
    what = f"model_type={model_type!r}, architectures={sorted(archs)}"
    if candidates:
        raise MlcVisionError(
            f"config ({what}) matches several families ({', '.join(f.FAMILY for f in candidates)}) "
            "and the checkpoint's keys do not decide"
        )
    raise MlcVisionError(f"unsupported model ({what}); supported families: {', '.join(available_families())}")
