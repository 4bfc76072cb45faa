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
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from .. import __version__
from ..checkpoint.config import checkpoint_config
from ..checkpoint.source import resolve_source
from ..checkpoint.weight_plan import IGNORED, KeyMapper, key_mapper
from ..config import DTYPES, VisionConfig, with_options
from ..errors import MlcVisionError
from ..models import Family
from ..models import projector as projectors
from .params import NUMPY_DTYPES, ParamsWriter
from .reader import TensorEntry, iter_tensors

PARAM_DTYPES = DTYPES

# Casts that lose nothing, allowed without being asked (a module may keep some params wider).
LOSSLESS = {("float16", "float32"), ("bfloat16", "float32")}

# ---- the expected parameters --------------------------------------------------------------


def expected_params(fam: Family, config: VisionConfig, dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of the full model (every layer, post-norm, heads, projector) in ``dtype``."""
    module = fam.module(config, full=True)
    module.to(dtype)
    params = {name: (tuple(int(d) for d in p.shape), str(p.dtype)) for name, p in module.named_parameters()}
    if config.projector:
        params.update(projectors.projector_params(config, dtype))
    return params


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


def drop_absent_parts(fam: Family, config: VisionConfig, names: set[str]) -> VisionConfig:
    """Clear the config fields of the family's optional parts that the checkpoint lacks."""
    absent = {
        field: None
        for field, pattern in fam.optional_parts.items()
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
    family: str | Family | None = None,
    image_size: int | None = None,
    projector: bool = True,
    revision: str | None = None,
) -> Path:
    """Convert a checkpoint (directory or hub id) into a params dir at ``output``; return its path.

    ``family`` overrides routing (a name, or a :class:`Family`); ``image_size``
    converts for another resolution (position embeddings interpolated by the
    family's transforms); ``projector=False`` converts a LLaVA/InternVL
    checkpoint's vision tower alone, ignoring its projector.
    """
    if dtype is not None and dtype not in PARAM_DTYPES:
        raise MlcVisionError(f"dtype must be one of {PARAM_DTYPES}, got {dtype!r}")
    src = resolve_source(source, revision)
    checkpoint = checkpoint_config(src, family)
    fam, config, full = checkpoint.family, checkpoint.config, checkpoint.hf_config
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
            "family": fam.name,
            "config": config.to_dict(),
            "dtype": params_dtype,
            "source": src.describe(),
        }
    }
    with ParamsWriter(output) as writer:
        stream(planned, mapper, config, expected, writer, asked=dtype is not None)
        return writer.finish(metadata)
