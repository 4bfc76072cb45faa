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
import sys
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from .. import __version__
from ..checkpoint.config import checkpoint_config
from ..checkpoint.source import resolve_source
from ..checkpoint.weight_plan import IGNORED, KeyMapper, expected_params, key_mapper, settle_optional_parts
from ..config import DTYPES, with_options
from ..errors import MlcVisionError
from ..models import Family
from ..models.text import text_config_from_hf, text_params, text_weight_map
from .params import NUMPY_DTYPES, ParamsWriter
from .reader import TensorEntry, iter_tensors

PARAM_DTYPES = DTYPES
PARTS = ("vision", "text", "both")

# Casts that lose nothing, allowed without being asked (a module may keep some params wider).
LOSSLESS = {("float16", "float32"), ("bfloat16", "float32")}

# Float dtypes numpy knows only through ml_dtypes (their dtype.kind is "V").
ML_FLOATS = (np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))

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


def check_finite(array: np.ndarray, entry: TensorEntry) -> np.ndarray:
    """A NaN or Inf weight poisons every feature: refuse the checkpoint, naming the key."""
    if (array.dtype.kind == "f" or array.dtype in ML_FLOATS) and not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise MlcVisionError(f"key {entry.key!r} in {entry.file.name} holds {bad} NaN or Inf value(s); the checkpoint is damaged")
    return array


def _progress(total_bytes: int):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="convert", disable=not sys.stderr.isatty())


def stream(planned: list[Planned], mapper: KeyMapper, config, expected: dict, writer: ParamsWriter, asked: bool):
    with _progress(sum(item.entry.nbytes for item in planned)) as bar:
        for item in planned:
            entry, name = item.entry, item.name
            array = check_finite(entry.load(), entry)
            array = mapper.transform(name, array, config)
            want_shape, want_dtype = expected[name]
            if tuple(array.shape) != want_shape:
                raise _shape_error(entry, name, want_shape, array.shape)
            writer.add(name, cast(array, want_dtype, asked, entry))
            del array
            bar.update(entry.nbytes)


# ---- entry point ---------------------------------------------------------------------------


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def convert(
    source: str | Path,
    output: str | Path,
    *,
    dtype: str | None = None,
    family: str | Family | None = None,
    image_size: int | None = None,
    projector: bool = True,
    revision: str | None = None,
    part: str = "vision",
) -> Path:
    """Convert a checkpoint (directory or hub id) into a params dir at ``output``; return its path.

    ``family`` overrides routing (a name, or a :class:`Family`); ``image_size``
    converts for another resolution (position embeddings interpolated by the
    family's transforms); ``projector=False`` converts a LLaVA/InternVL
    checkpoint's vision tower alone, ignoring its projector. ``part`` is
    ``vision`` (the tower, as a vision-language model uses it), ``text`` (a
    contrastive model's text tower, its projection and logit scalars) or
    ``both``; with a text side the checkpoint's tokenizer files are copied in.
    """
    if dtype is not None and dtype not in PARAM_DTYPES:
        raise MlcVisionError(f"dtype must be one of {PARAM_DTYPES}, got {dtype!r}")
    if part not in PARTS:
        raise MlcVisionError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    src = resolve_source(source, revision)
    checkpoint = checkpoint_config(src, family)
    fam, config, full = checkpoint.family, checkpoint.config, checkpoint.hf_config
    if not projector or part != "vision":
        config = dataclasses.replace(config, projector=None, projector_hidden_size=None)
    config = with_options(config, image_size=image_size)
    text = text_config_from_hf(fam.name, full) if part != "vision" else None
    text_map = text_weight_map(text) if text else None
    mapper = key_mapper(fam, config, full, text=text_map, vision=part != "text")
    entries = list(iter_tensors(src.weight_files(mapper.wanted)))
    if checkpoint.shapes is None:  # keys listed only now (a hub checkpoint fetched offline-first)
        config = settle_optional_parts(fam, config, full, [e.key for e in entries])
    wanted = [Planned(e, mapper.resolve(e.key)) for e in entries if mapper.wanted(e.key)]
    params_dtype = dtype or checkpoint_dtype(wanted)
    expected = expected_params(fam, config, params_dtype) if part != "text" else {}
    if text:
        expected.update(text_params(text, params_dtype))
    planned = plan(entries, mapper, expected)
    metadata = {
        "mlc_vision": {
            "version": __version__,
            "family": fam.name,
            "config": config.to_dict(),
            "dtype": params_dtype,
            "source": src.describe(),
            "part": part,
            "text": text.to_dict() if text else None,
        }
    }
    with ParamsWriter(output) as writer:
        stream(planned, mapper, config, expected, writer, asked=dtype is not None)
        if text:
            copy_tokenizer(src, writer)
        return writer.finish(metadata)


def copy_tokenizer(src, writer: ParamsWriter) -> None:
    """The checkpoint's tokenizer files, so that the params dir alone can tokenize (``similarity``)."""
    if src.repo_id:
        try:
            src._fetch(list(TOKENIZER_FILES))
        except MlcVisionError:  # a hub checkpoint without a tokenizer: similarity then asks for --tokenizer
            pass
    for name in TOKENIZER_FILES:
        path = src.path / name
        if path.is_file():
            writer.add_file(name, path.read_bytes())
