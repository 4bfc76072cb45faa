"""The family registry: one :class:`Family` record per model file, registered where it is defined.

A family file ends with ``FAMILY = register(Family(...))``; importing
:mod:`mlc_vision.models` imports every module of the package once, so a new
family is one new file. Routing a checkpoint's config to a family never looks
at the path of the checkpoint, only at what it contains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from ..config import VisionConfig
from ..errors import MlcVisionError
from .weight_map import WeightMap

Claims = Callable[[dict, list], bool]


@dataclass(frozen=True)
class Family:
    """Everything the rest of the package needs to know about one encoder family.

    - ``model_types`` / ``architectures``: the ``config.json`` values it claims.
    - ``claims(hf_config, keys)``: a tie-breaker from the checkpoint's config
      and keys when several families claim the same ``model_type``. A port
      that reuses another family's ``model_type`` (InternVL's EVA-CLIP says
      ``clip``) claims its own configs; when no candidate claims, the one
      candidate without ``claims`` (the model_type's owner) is chosen.
    - ``config_from_hf(hf_vision_config)``: our :class:`VisionConfig`.
    - ``module``: the Relax ``nn.Module`` class, ``module(config, full=False)``;
      ``hidden_states(x)`` returns the hidden states up to
      ``config.layer_index``, ``forward(x)`` the selected features; ``full``
      builds every parameter of the checkpoint (what convert expects).
    - ``weights``: the rename table from checkpoint keys to the module's names.
    - ``optional_parts``: ``{config field: OptionalPart}``: parts a config
      may announce that a checkpoint does not hold (CLIP's ``projection_dim``
      without ``visual_projection``, EVA's projection bias). Where the
      checkpoint's keys are known, ``checkpoint.config`` sets the field to the
      part's ``absent`` value when no key maps to it, for compile and convert
      alike.
    - ``native_resolution``: the tower takes a symbolic number of flattened
      patches and per-patch position/segment inputs instead of fixed-size
      ``pixel_values`` (``VisionModel(config).hidden_states(*inputs)``, see
      ``docs/native_resolution.md``).
    """

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    config_from_hf: Callable[[dict], VisionConfig]
    module: type
    weights: WeightMap
    claims: Claims | None = None
    optional_parts: Mapping[str, "OptionalPart"] = field(default_factory=dict)
    native_resolution: bool = False


@dataclass(frozen=True)
class OptionalPart:
    """A part of the model that a config may announce and a checkpoint may lack.

    ``pattern`` is a regex over our parameter names; ``absent`` is the value the
    config field takes when no parameter of the checkpoint matches it.
    """

    pattern: str
    absent: object = None


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family (once per name) and return it, for ``FAMILY = register(Family(...))``."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise MlcVisionError(f"model family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def families() -> tuple[Family, ...]:
    return tuple(_FAMILIES[name] for name in sorted(_FAMILIES))


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise MlcVisionError(f"unknown model family {name!r}; supported: {', '.join(family_names())}") from None


def route(hf_config: dict, keys: Iterable[str] | None = None) -> Family:
    """Pick the family for a (vision) config dict: by model_type, then architectures, then keys."""
    keys = list(keys) if keys is not None else None
    model_type = hf_config.get("model_type")
    by_type = [f for f in families() if model_type in f.model_types]
    archs = set(hf_config.get("architectures") or ())
    by_arch = [f for f in families() if archs & set(f.architectures)]
    candidates = by_type or by_arch
    if len(candidates) > 1 or (not candidates and keys):
        chosen = _by_claims(candidates or list(families()), candidates, hf_config, keys or [])
        if chosen is not None:
            return chosen
    if len(candidates) == 1:
        return candidates[0]
    what = f"model_type={model_type!r}, architectures={sorted(archs)}"
    if candidates:
        raise MlcVisionError(
            f"config ({what}) matches several families ({', '.join(f.name for f in candidates)}) "
            "and the checkpoint's keys do not decide"
        )
    raise MlcVisionError(f"unsupported model ({what}); supported families: {', '.join(family_names())}")


def _by_claims(pool: list[Family], candidates: list[Family], hf_config: dict, keys: list) -> Family | None:
    """The one family of ``pool`` that claims the config, else the one candidate that needs no claim."""
    claimed = [f for f in pool if f.claims is not None and f.claims(hf_config, keys)]
    if len(claimed) == 1:
        return claimed[0]
    owners = [f for f in candidates if f.claims is None]
    if not claimed and len(owners) == 1:
        return owners[0]
    return None
