"""The params directory: TVM's tensor-cache format, written as a stream.

Layout (what ``tvm.contrib.tvmjs.load_tensor_cache`` and the C++ runtime's
``vm.builtin.tensor_cache.load`` read)::

    tensor-cache.json   {"metadata": {"mlc_vision": {...}},
                         "records": [{"dataPath": "params_shard_0.bin", "format": "raw-shard",
                                      "nbytes": N, "md5sum": "...",
                                      "records": [{"name", "shape", "dtype", "format": "raw",
                                                   "nbytes", "byteOffset"}, ...]}, ...]}
    params_shard_0.bin  raw little-endian tensors, back to back

Every tensor is stored ``raw`` in its own dtype: bf16 as its 2-byte words
with dtype ``bfloat16`` (TVM copies the bytes as they are). We never use
tvmjs's ``f32-to-bf16`` encoding, which would silently round fp32.

:class:`ParamsWriter` appends one tensor at a time to the current shard file,
so memory stays near the largest tensor. It builds the directory beside the
output and moves it into place only when complete: a failure leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import ml_dtypes
import numpy as np

from .. import atomic
from ..errors import MlcVisionError

CACHE_JSON = "tensor-cache.json"
SHARD_PREFIX = "params_shard"
SHARD_CAP_BYTES = 64 << 20
FORMAT_VERSION = 1

# dtype names in the cache (TVM's) -> numpy dtypes; numpy's own names agree.
NUMPY_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}


def dtype_name(dtype) -> str:
    """The cache's name of a numpy dtype (``bfloat16`` for ml_dtypes' bf16)."""
    name = np.dtype(dtype).name
    if name not in NUMPY_DTYPES:
        raise MlcVisionError(f"dtype {name} cannot be stored in a params dir; supported: {sorted(NUMPY_DTYPES)}")
    return name


# ---- writing ----------------------------------------------------------------------------------


class _Shard:
    """One open shard file and the records it holds."""

    def __init__(self, directory: Path, index: int):
        self.path = directory / f"{SHARD_PREFIX}_{index}.bin"
        self.file = open(self.path, "wb")
        self.md5 = hashlib.md5()
        self.nbytes = 0
        self.records: list[dict] = []

    def append(self, name: str, array: np.ndarray) -> None:
        raw = array.reshape(-1).view(np.uint8)
        self.records.append(
            {
                "name": name,
                "shape": [int(d) for d in array.shape],
                "dtype": dtype_name(array.dtype),
                "format": "raw",
                "nbytes": int(raw.nbytes),
                "byteOffset": self.nbytes,
            }
        )
        self.file.write(raw.data)
        self.md5.update(raw.data)
        self.nbytes += raw.nbytes

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {
            "dataPath": self.path.name,
            "format": "raw-shard",
            "nbytes": self.nbytes,
            "records": self.records,
            "md5sum": self.md5.hexdigest(),
        }


class ParamsWriter:
    """Stream tensors into a new params dir; ``output`` appears only on :meth:`finish`.

    Use as a context manager: leaving the block with an exception removes
    everything written so far.
    """

    def __init__(self, output: str | Path, shard_cap_bytes: int = SHARD_CAP_BYTES):
        self.output = Path(output).absolute()
        _check_output(self.output)
        atomic.check_writable(self.output, directory=True, what="params dir")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        atomic.recover(self.output)
        self.tmp = atomic.make_temp_dir(self.output)
        self.cap = shard_cap_bytes
        self.shards: list[dict] = []
        self.current: _Shard | None = None
        self.names: set[str] = set()

    def add(self, name: str, array: np.ndarray) -> None:
        """Append one tensor: to the current shard, a new one when full, its own when oversized."""
        if name in self.names:
            raise MlcVisionError(f"parameter {name!r} is written twice")
        self.names.add(name)
        array = np.ascontiguousarray(array)
        if self.current and self.current.nbytes and self.current.nbytes + array.nbytes > self.cap:
            self._close_shard()
        if self.current is None:
            self.current = _Shard(self.tmp, len(self.shards))
        self.current.append(name, array)
        atomic.die_point("writing")

    def add_file(self, name: str, data: bytes) -> None:
        """A file that travels with the params (the tokenizer of a text tower), replaced atomically with them."""
        if Path(name).name != name or name == CACHE_JSON or name.startswith(("params_shard_", ".")):
            raise MlcVisionError(f"cannot add {name!r} to a params dir")
        (self.tmp / name).write_bytes(data)

    def _close_shard(self) -> None:
        if self.current is not None:
            self.shards.append(self.current.close())
            self.current = None

    def finish(self, metadata: dict) -> Path:
        """Write ``tensor-cache.json`` and move the directory to ``output`` (replacing an old params dir)."""
        self._close_shard()
        with open(self.tmp / CACHE_JSON, "w") as f:
            json.dump({"metadata": metadata, "records": self.shards}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _check_output(self.output)
        atomic.replace_dir(self.tmp, self.output)
        return self.output

    def abort(self) -> None:
        """Remove everything written so far (also when closing the shard fails, e.g. on a full disk)."""
        current, self.current = self.current, None
        try:
            if current is not None:
                current.file.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ParamsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()


def _check_output(output: Path) -> None:
    """Refuse to replace anything but an empty dir or an earlier params dir."""
    if not output.exists():
        return
    if not output.is_dir():
        raise MlcVisionError(f"output {output} exists and is not a directory")
    if any(output.iterdir()) and not (output / CACHE_JSON).is_file():
        raise MlcVisionError(f"output {output} is a non-empty directory that is not a params dir; not overwriting it")


def write_params(output: str | Path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict) -> Path:
    """Write ``(name, array)`` pairs as a params dir (a convenience over :class:`ParamsWriter`)."""
    with ParamsWriter(output) as writer:
        for name, array in tensors:
            writer.add(name, array)
        return writer.finish(metadata)


# ---- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamRecord:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    offset: int
    nbytes: int

    def __getitem__(self, field: str):
        """``record["shape"]`` works too (records read like the JSON they come from)."""
        return getattr(self, field)

    def read(self) -> np.ndarray:
        """The tensor as numpy (bf16 as ``ml_dtypes.bfloat16``)."""
        out = np.empty(self.shape, dtype=NUMPY_DTYPES[self.dtype])
        buf = out.reshape(-1).view(np.uint8)
        if buf.nbytes != self.nbytes:
            raise MlcVisionError(
                f"params record {self.name!r}: {self.nbytes} bytes do not match shape {list(self.shape)} {self.dtype}"
            )
        try:
            with open(self.file, "rb") as f:
                f.seek(self.offset)
                got = f.readinto(buf)
        except OSError as err:
            raise MlcVisionError(f"cannot read {self.file}: {err.strerror or err}") from None
        if got != self.nbytes:
            raise MlcVisionError(f"params shard {self.file} is truncated (parameter {self.name!r})")
        return out


def read_params(directory: str | Path) -> tuple[dict[str, ParamRecord], dict]:
    """``({name: ParamRecord}, metadata)`` of a params dir; no tensor data is read."""
    directory = Path(directory)
    path = directory / CACHE_JSON
    if not directory.is_dir():
        raise MlcVisionError(f"params directory {directory} does not exist")
    try:
        cache = json.loads(path.read_text())
        records = {}
        for shard in cache["records"]:
            shard_path = directory / shard["dataPath"]
            for rec in shard["records"]:
                records[rec["name"]] = ParamRecord(
                    rec["name"],
                    tuple(int(d) for d in rec["shape"]),
                    rec["dtype"],
                    shard_path,
                    int(rec["byteOffset"]),
                    int(rec["nbytes"]),
                )
    except FileNotFoundError:
        raise MlcVisionError(f"{directory} is not a params dir (no {CACHE_JSON})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise MlcVisionError(f"cannot read {path}: {type(err).__name__} {err}") from None
    return records, cache.get("metadata", {})


def _wanted(spec) -> tuple[str, tuple[int, ...] | None, str | None]:
    """A name, ``(name, shape, dtype)`` or a metadata param dict -> ``(name, shape, dtype)``."""
    if isinstance(spec, str):
        return spec, None, None
    if isinstance(spec, dict):
        shape = spec.get("shape")
        return spec["name"], tuple(shape) if shape is not None else None, spec.get("dtype")
    name, shape, dtype = spec
    return name, tuple(shape) if shape is not None else None, dtype


def load_params(directory: str | Path, names: Sequence, device) -> list:
    """The named parameters as TVM tensors on ``device``, in the order asked.

    ``names`` holds names, or ``(name, shape, dtype)`` / ``{"name", "shape",
    "dtype"}`` (a library's metadata list) to have shape and dtype checked.
    """
    import tvm

    records, _ = read_params(directory)
    missing = [_wanted(spec)[0] for spec in names if _wanted(spec)[0] not in records]
    if missing:
        raise MlcVisionError(
            f"params dir {directory} has no parameter {missing[0]!r}"
            + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
        )
    tensors = []
    for spec in names:
        name, shape, dtype = _wanted(spec)
        rec = records[name]
        if shape is not None and tuple(int(d) for d in shape) != rec.shape:
            raise MlcVisionError(f"parameter {name!r}: params dir has shape {list(rec.shape)}, expected {list(shape)}")
        if dtype is not None and str(dtype) != rec.dtype:
            raise MlcVisionError(f"parameter {name!r}: params dir has dtype {rec.dtype}, expected {dtype}")
        tensors.append(tvm.runtime.tensor(rec.read(), device))
    return tensors

