"""Checkpoint -> params dir, one tensor at a time.

The conversion runs in two passes over the checkpoint:

1. **Plan** (headers only, no tensor data): every key is mapped to a
   parameter of the full model or explicitly ignored; unexpected, duplicate
   and missing keys, shape mismatches and mixed dtypes are reported here,
   before anything is written.
2. **Stream**: each mapped tensor is read, transformed (e.g. position
   embedding interpolation), cast only where allowed, and appended to the
   params dir. Peak memory stays near the largest tensor.

Dtype policy (DESIGN: no silent lossy casts): without ``dtype`` the params
keep the checkpoint's dtype, and a checkpoint with several float dtypes is
refused; with ``dtype`` every float tensor is cast to it, refusing values that
overflow the target (bf16/fp32 -> fp16).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import ml_dtypes
import numpy as np

from .. import __version__
from ..config import DTYPES, IMAGE_NEWLINE_PARAM, VisionConfig, list_presets, load_preset, preset_info, with_options
from ..errors import MlcVisionError
from ..models import get_family, route
from .mapping import WeightMap
from .params import NUMPY_DTYPES, ParamsWriter
from .reader import TensorEntry, iter_tensors
from .source import Source, language_model_keys, load_hf_config, outer_options, resolve_source

PARAM_DTYPES = DTYPES

# Casts that lose nothing, allowed without being asked (a module may keep some params wider).
LOSSLESS = {("float16", "float32"), ("bfloat16", "float32")}

# Checkpoint keys of projectors, ignored when the projector is not converted.
PROJECTOR_KEYS = (r"^(model\.)?mm_projector\.", r"^(model\.)?multi_modal_projector\.", r"^mlp1\.")

IGNORED = object()  # sentinel: a key the maps deliberately skip

# Parts a config may announce that a checkpoint does not have: ``{config field:
# regex over our names}``. transformers writes ``projection_dim`` for every CLIP
# vision config, but only CLIPModel / CLIPVisionModelWithProjection hold
# ``visual_projection`` (CLIPVisionModel and LLaVA's tower do not). When no
# checkpoint key maps to the part, the field is cleared and the part is not
# expected. A family overrides this with its own ``OPTIONAL_PARTS``.
OPTIONAL_PARTS = {"projection_dim": r"^visual_projection\."}


# ---- config --------------------------------------------------------------------------------


def _preset_for_tower(tower: str) -> str:
    """The preset whose ``hf_repo`` is the tower an original LLaVA config names."""
    for name in list_presets():
        if preset_info(name).get("hf_repo") == tower:
            return name
    raise MlcVisionError(
        f"config.json names vision tower {tower!r} without its config, and no preset has that hf_repo"
    )


def _preprocess_options(path: Path, full: dict) -> dict:
    """Preprocessing from ``preprocessor_config.json`` (recorded, so runtime and compile agree)."""
    pre_path = path / "preprocessor_config.json"
    if not pre_path.is_file():
        return {}
    from ..runtime.preprocess import preprocess_config_from_hf

    try:
        data = json.loads(pre_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MlcVisionError(f"cannot read {pre_path}: {err}") from None
    return {"preprocess": preprocess_config_from_hf(data, pad_to_square=full.get("image_aspect_ratio") == "pad")}


def checkpoint_config(
    source: Source, family: str | ModuleType | None = None, keys=None
) -> tuple[ModuleType, VisionConfig, dict]:
    """``(family module, VisionConfig, full config.json)`` of a resolved checkpoint."""
    vision, full = load_hf_config(source.path)
    if vision is None:
        config = load_preset(_preset_for_tower(full["mm_vision_tower"]))
        fam = get_family(config.family) if family is None else _family_module(family)
    else:
        fam = route(vision, keys) if family is None else _family_module(family)
        config = fam.config_from_hf(vision)
        config = dataclasses.replace(config, **_preprocess_options(source.path, full))
    return fam, dataclasses.replace(config, **outer_options(full)).validated(), full


def _family_module(family: str | ModuleType) -> ModuleType:
    return get_family(family) if isinstance(family, str) else family


# ---- the expected parameters --------------------------------------------------------------


def expected_params(fam: ModuleType, config: VisionConfig, dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of the full model (every layer, post-norm, heads, projector) in ``dtype``."""
    if "full" in inspect.signature(fam.VisionModel).parameters:
        module = fam.VisionModel(config, full=True)
    else:
        module = fam.VisionModel(dataclasses.replace(config, select_layer=-1))
    module.to(dtype)
    params = {name: (tuple(int(d) for d in p.shape), str(p.dtype)) for name, p in module.named_parameters()}
    if config.projector and not any(name.startswith("projector.") for name in params):
        params.update(_projector_module(config).projector_params(config, dtype))
    if config.has_image_newline:
        params[IMAGE_NEWLINE_PARAM] = ((config.projector_hidden_size,), dtype)
    return params


# ---- key resolution -----------------------------------------------------------------------


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

    def transform(self, name: str, array: np.ndarray, config) -> np.ndarray:
        maps = [self.tower] + ([self.projector] if self.projector else [])
        for weight_map in maps:
            array = weight_map.transform(name, array, config)
        return array

    def has_transform(self, name: str) -> bool:
        maps = [self.tower] + ([self.projector] if self.projector else [])
        return any(re.search(pattern, name) for m in maps for pattern, _ in m.transforms)


def _projector_module(config: VisionConfig) -> ModuleType:
    try:
        return importlib.import_module("mlc_vision.models.projector")
    except ModuleNotFoundError as err:
        if err.name != "mlc_vision.models.projector":
            raise
        raise MlcVisionError(
            f"this checkpoint has a {config.projector} projector, which this installation cannot convert "
            "(no mlc_vision.models.projector); convert the vision tower alone with projector=False (--no-projector)"
        ) from None


def _projector_map(config: VisionConfig) -> WeightMap:
    module = _projector_module(config)
    weight_map = getattr(module, "weight_map", None)
    return weight_map(config) if callable(weight_map) else module.WEIGHTS


def key_mapper(fam: ModuleType, config: VisionConfig, full: dict) -> KeyMapper:
    ignore = language_model_keys(full) + (() if config.projector else PROJECTOR_KEYS)
    tower = fam.WEIGHTS.merged(WeightMap(prefixes=(), ignore=ignore))
    return KeyMapper(tower, _projector_map(config) if config.projector else None)


# ---- plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    entry: TensorEntry
    name: str


def _first_few(items, n: int = 5) -> str:
    items = list(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def plan(entries: list[TensorEntry], mapper: KeyMapper, expected: dict) -> list[Planned]:
    """Map every key; raise on the first unexpected key, duplicate, shape mismatch, or missing params."""
    planned: list[Planned] = []
    seen: dict[str, TensorEntry] = {}
    for entry in entries:
        name = mapper.resolve(entry.key)
        if name is IGNORED:
            continue
        if name is None or name not in expected:
            as_name = f" (maps to {name!r}, not a parameter of the model)" if name else ""
            raise MlcVisionError(f"unexpected key {entry.key!r} in {entry.file.name}{as_name}")
        if name in seen:
            other = seen[name]
            raise MlcVisionError(
                f"keys {other.key!r} ({other.file.name}) and {entry.key!r} ({entry.file.name}) both map to {name!r}"
            )
        if not mapper.has_transform(name) and entry.shape != expected[name][0]:
            raise _shape_error(entry, name, expected[name][0], entry.shape)
        seen[name] = entry
        planned.append(Planned(entry, name))
    missing = [name for name in expected if name not in seen]
    if missing:
        raise MlcVisionError(f"checkpoint lacks {len(missing)} parameter(s) of the model: {_first_few(missing)}")
    return planned


def _shape_error(entry: TensorEntry, name: str, want, got) -> MlcVisionError:
    renamed = f" (parameter {name!r})" if name != entry.key else ""
    return MlcVisionError(
        f"shape mismatch for key {entry.key!r} in {entry.file.name}{renamed}: expected {list(want)}, got {list(got)}"
    )


def drop_absent_parts(fam: ModuleType, config: VisionConfig, names: set[str]) -> VisionConfig:
    """Clear the config fields of optional parts (see :data:`OPTIONAL_PARTS`) the checkpoint lacks."""
    absent = {
        field: None
        for field, pattern in getattr(fam, "OPTIONAL_PARTS", OPTIONAL_PARTS).items()
        if getattr(config, field, None) and not any(re.search(pattern, name) for name in names)
    }
    return dataclasses.replace(config, **absent) if absent else config


def checkpoint_dtype(planned: list[Planned]) -> str:
    """The one float dtype of the mapped tensors; several is an error (ask for ``dtype``)."""
    by_dtype: dict[str, list[str]] = {}
    for item in planned:
        if item.entry.dtype.kind == "f" or item.entry.dtype == ml_dtypes.bfloat16:
            by_dtype.setdefault(item.entry.dtype.name, []).append(item.entry.key)
    if len(by_dtype) > 1:
        parts = [f"{d} ({len(keys)} keys, e.g. {keys[0]!r})" for d, keys in sorted(by_dtype.items())]
        raise MlcVisionError(f"checkpoint mixes dtypes {', '.join(parts)}; pass dtype (--dtype) to cast to one")
    found = next(iter(by_dtype), "float32")
    if found not in PARAM_DTYPES:
        raise MlcVisionError(f"checkpoint dtype {found} is not one we store; pass dtype (--dtype) from {PARAM_DTYPES}")
    return found


# ---- stream ----------------------------------------------------------------------------------


def cast(array: np.ndarray, want: str, asked: bool, entry: TensorEntry) -> np.ndarray:
    """Cast ``array`` to ``want`` when asked or lossless; refuse overflow to inf."""
    have = array.dtype.name
    if have == want:
        return array
    if not asked and (have, want) not in LOSSLESS:
        raise MlcVisionError(
            f"key {entry.key!r} in {entry.file.name} is {have} but the model wants {want}; "
            f"pass dtype={want!r} (--dtype {want}) to cast"
        )
    with np.errstate(over="ignore"):  # overflow is checked (and named) just below
        out = array.astype(NUMPY_DTYPES[want])
    if want == "float16" and not np.isfinite(out).all() and np.isfinite(array).all():
        raise MlcVisionError(f"key {entry.key!r} in {entry.file.name} overflows float16; convert to bfloat16 or float32")
    return out


def _progress(total_bytes: int):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="convert", disable=not sys.stderr.isatty())


def stream(planned: list[Planned], mapper: KeyMapper, config, expected: dict, writer: ParamsWriter, asked: bool):
    with _progress(sum(item.entry.nbytes for item in planned)) as bar:
        for item in planned:
            entry, name = item.entry, item.name
            array = mapper.transform(name, entry.load(), config)
            want_shape, want_dtype = expected[name]
            if tuple(array.shape) != want_shape:
                raise _shape_error(entry, name, want_shape, array.shape)
            writer.add(name, cast(array, want_dtype, asked, entry))
            del array
            bar.update(entry.nbytes)


# ---- entry point ---------------------------------------------------------------------------


def convert(
    source: str | Path,
    output: str | Path,
    *,
    dtype: str | None = None,
    family: str | ModuleType | None = None,
    image_size: int | None = None,
    projector: bool = True,
    revision: str | None = None,
) -> Path:
    """Convert a checkpoint (directory or hub id) into a params dir at ``output``; return its path.

    ``family`` overrides routing (a name, or a family module); ``image_size``
    converts for another resolution (position embeddings interpolated by the
    family's transforms); ``projector=False`` converts a LLaVA/InternVL
    checkpoint's vision tower alone, ignoring its projector.
    """
    if dtype is not None and dtype not in PARAM_DTYPES:
        raise MlcVisionError(f"dtype must be one of {PARAM_DTYPES}, got {dtype!r}")
    src = resolve_source(source, revision)
    fam, config, full = checkpoint_config(src, family)
    if not projector:
        config = dataclasses.replace(config, projector=None, projector_hidden_size=None)
    config = with_options(config, image_size=image_size)
    mapper = key_mapper(fam, config, full)
    entries = list(iter_tensors(src.weight_files(mapper.wanted)))
    wanted = [Planned(e, mapper.resolve(e.key)) for e in entries if mapper.wanted(e.key)]
    config = drop_absent_parts(fam, config, {item.name for item in wanted if item.name})
    params_dtype = dtype or checkpoint_dtype(wanted)
    expected = expected_params(fam, config, params_dtype)
    planned = plan(entries, mapper, expected)
    metadata = {
        "mlc_vision": {
            "version": __version__,
            "family": fam.FAMILY,
            "config": config.to_dict(),
            "dtype": params_dtype,
            "source": src.describe(),
        }
    }
    with ParamsWriter(output) as writer:
        stream(planned, mapper, config, expected, writer, asked=dtype is not None)
        return writer.finish(metadata)
