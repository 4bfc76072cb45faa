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

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound
HEADER_NESTING = 3  # {name: {"shape": [...]}}: anything deeper is not a safetensors header


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
    """The JSON header (without ``__metadata__``) and the offset where data starts.

    As strict as the ``safetensors`` library: the header length fits the
    file, the header is a UTF-8 JSON object (no NaN/Infinity, no duplicate
    keys, no deeper nesting than a header has), every record has a known
    dtype, non-negative integer dims and offsets, and the records' byte ranges
    tile the data section exactly: contiguous from 0, no overlap, no gap, no
    trailing bytes. Anything else is one line naming the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"only {size} bytes")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise _corrupt(path, f"header length {header_len} does not fit in a {size}-byte file")
        raw = f.read(header_len)
    header = _parse_header_json(path, raw)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    data_start = 8 + header_len
    _check_layout(path, {key: _record(path, key, info) for key, info in header.items()}, size - data_start)
    return header, data_start


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _depth(value, limit: int) -> int:
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


def _parse_header_json(path: Path, raw: bytes) -> dict:
    if not raw.startswith(b"{"):
        raise _corrupt(path, "header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise _corrupt(path, "header is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise _corrupt(path, f"header is not JSON ({' '.join(str(err).split())})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    if _depth(header, HEADER_NESTING + 1) > HEADER_NESTING:
        raise _corrupt(path, "header is nested deeper than a safetensors header")
    return header


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


def _record(path: Path, key: str, info) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """``(dtype, shape, begin, end)`` of one header record, each field checked."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise _corrupt(path, f"bad header record for {key!r} (needs dtype, shape and data_offsets)")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype_name, str):
        raise _corrupt(path, f"tensor {key!r} has a dtype that is not a string")
    if dtype_name not in SAFETENSORS_DTYPES:
        raise MlcVisionError(f"tensor {key!r} in {path} has unsupported dtype {dtype_name}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _corrupt(path, f"tensor {key!r} has shape {shape!r}; dims must be integers >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(v) for v in offsets):
        raise _corrupt(path, f"tensor {key!r} has data_offsets {offsets!r}; need [begin, end] integers >= 0")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    begin, end = offsets
    if end < begin or end - begin != math.prod(shape) * dtype.itemsize:
        raise _corrupt(path, f"tensor {key!r} has offsets {begin}..{end} that do not match shape {list(shape)}")
    return dtype, tuple(shape), begin, end


def _check_layout(path: Path, records: dict, data_size: int) -> None:
    """The records' byte ranges must tile ``[0, data_size)``: sorted, each starts where the last ended."""
    position = 0
    for key, (_, _, begin, end) in sorted(records.items(), key=lambda item: item[1][2:]):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap at byte {position}"
            raise _corrupt(path, f"tensor {key!r} at bytes {begin}..{end} {what}")
        position = end
    if position != data_size:
        raise _corrupt(path, f"tensors cover {position} data bytes but the file holds {data_size}")


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
