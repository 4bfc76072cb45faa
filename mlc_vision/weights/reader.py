"""Lazy tensor readers: list a checkpoint's tensors without reading them.

Every reader yields :class:`TensorEntry` objects whose shape and dtype come
from the file's header, and whose data is read only when ``load()`` is
called. The converter can therefore check every key (mapped? ignored? right
shape?) before it reads a byte of data, and then hold one tensor at a time.

safetensors files are parsed here rather than through ``safe_open``: the
format is an 8-byte header length, a JSON header and raw little-endian data,
and parsing it ourselves gives bf16/fp8 as ``ml_dtypes`` arrays without torch
and turns a truncated or corrupt file into one line naming the file.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from ..errors import MlcVisionError

# safetensors dtype tag -> numpy dtype (bf16 and fp8 through ml_dtypes).
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

MAX_HEADER_BYTES = 100 << 20  # the safetensors library refuses larger headers too


@dataclass(frozen=True)
class TensorEntry:
    """One checkpoint tensor: where it is and what it is, data not yet read."""

    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# ---- safetensors ----------------------------------------------------------------------


def _corrupt(path: Path, why: str) -> MlcVisionError:
    return MlcVisionError(f"corrupt or truncated safetensors file {path}: {why}")


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header (without ``__metadata__``) and the offset where data starts."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"only {size} bytes")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise _corrupt(path, f"header length {header_len} does not fit in a {size}-byte file")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for key, info in header.items():
        _check_safetensors_record(path, key, info, size - data_start)
    return header, data_start


def _check_safetensors_record(path: Path, key: str, info, data_size: int) -> None:
    """A header record must describe bytes that exist and match its shape."""
    try:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = (int(v) for v in info["data_offsets"])
        shape = tuple(int(d) for d in info["shape"])
    except KeyError as err:
        if isinstance(info, dict) and "dtype" in info and info["dtype"] not in SAFETENSORS_DTYPES:
            raise MlcVisionError(f"tensor {key!r} in {path} has unsupported dtype {info['dtype']}") from None
        raise _corrupt(path, f"bad header record for {key!r} (missing {err})") from None
    except (TypeError, ValueError):
        raise _corrupt(path, f"bad header record for {key!r}") from None
    if end > data_size:
        raise _corrupt(path, f"tensor {key!r} ends at byte {end} but the file holds {data_size} data bytes")
    if not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
        raise _corrupt(path, f"tensor {key!r} has offsets {begin}..{end} that do not match shape {list(shape)}")


def _safetensors_loader(path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype):
    def load() -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        buf = out.reshape(-1).view(np.uint8)
        with open(path, "rb") as f:
            f.seek(offset)
            got = f.readinto(buf)
        if got != buf.nbytes:
            raise _corrupt(path, f"short read at byte {offset} ({got} of {buf.nbytes} bytes)")
        return out

    return load


def iter_safetensors(path: Path) -> Iterator[TensorEntry]:
    path = Path(path)
    header, data_start = read_safetensors_header(path)
    for key, info in header.items():
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        offset = data_start + int(info["data_offsets"][0])
        yield TensorEntry(key, path, shape, dtype, _safetensors_loader(path, offset, shape, dtype))


# ---- PyTorch .bin ---------------------------------------------------------------------------


def _torch():
    try:
        import torch
    except ImportError:
        raise MlcVisionError(
            "this checkpoint has only PyTorch .bin weights, which need torch to read: "
            "pip install torch (or convert the checkpoint to safetensors)"
        ) from None
    return torch


def _torch_to_numpy(tensor) -> np.ndarray:
    """numpy has no bf16/fp8: move those through an integer view of the same width."""
    torch = _torch()
    special = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.int8, ml_dtypes.float8_e4m3fn),
        torch.float8_e5m2: (torch.int8, ml_dtypes.float8_e5m2),
    }
    tensor = tensor.detach().contiguous()
    if tensor.dtype in special:
        int_type, np_type = special[tensor.dtype]
        return tensor.view(int_type).numpy().view(np_type)
    return tensor.numpy()


def _numpy_dtype_of(tensor) -> np.dtype:
    torch = _torch()
    empty = torch.empty(0, dtype=tensor.dtype)
    return _torch_to_numpy(empty).dtype


def iter_torch_bin(path: Path) -> Iterator[TensorEntry]:
    """Entries of a ``pytorch_model*.bin`` (memory-mapped: data is paged in on ``load()``)."""
    torch = _torch()
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise MlcVisionError(f"cannot read PyTorch checkpoint {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise MlcVisionError(f"{path} does not hold a state dict (got {type(state).__name__})")
    if isinstance(state.get("state_dict"), dict):  # Lightning-style wrapper
        state = state["state_dict"]
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        yield TensorEntry(
            key, path, tuple(tensor.shape), _numpy_dtype_of(tensor), lambda t=tensor: _torch_to_numpy(t)
        )


# ---- dispatch -------------------------------------------------------------------------------

READERS = {".safetensors": iter_safetensors, ".bin": iter_torch_bin, ".pt": iter_torch_bin, ".pth": iter_torch_bin}


def iter_tensors(files: Iterable[Path]) -> Iterator[TensorEntry]:
    """Entries of every file in order; the reader is picked by file extension."""
    for path in files:
        path = Path(path)
        reader = READERS.get(path.suffix)
        if reader is None:
            raise MlcVisionError(f"unsupported weight file {path} (expected .safetensors or .bin)")
        try:
            yield from reader(path)
        except OSError as err:
            raise MlcVisionError(f"cannot read {path}: {err.strerror or err}") from None
