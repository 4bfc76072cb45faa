"""Seeded mutations of a real safetensors file, each read in a forked child by our reader and by the library.

Run as ``python tests/safetensors_fuzz.py FILE CASES SEED WORKDIR``; prints a
JSON list with one ``{"case", "kind", "verdict", "detail"}`` per mutation.
The verdict is ``refused by both``, ``refused by us only`` (we may be
stricter), ``read equal by both`` (the mutation left a valid file, and we read
exactly what the ``safetensors`` library reads), or a failure: ``crashed``
(our reader raised something other than a one-line ``MlcVisionError``),
``silent success`` (we read a file the library refuses, or read it
otherwise), ``signal N`` or ``hung``. It runs in a small process of its own
(numpy, safetensors, our reader, all imported before forking; no torch, no
TVM) so that a fork costs milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import select
import signal
import struct
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from mlc_vision.errors import MlcVisionError
from mlc_vision.weights.reader import iter_safetensors

FUZZ_BYTES = b'0123456789{}[]",:- .eEINaf'
KINDS = ("bytes", "insert-drop", "length", "size", "swap-offsets", "shift-offsets", "shape-dtype")


def _random_byte(rng: np.random.Generator) -> int:
    return FUZZ_BYTES[rng.integers(len(FUZZ_BYTES))]


def _mutate_raw(kind: str, raw: bytes, n: int, rng: np.random.Generator) -> bytes:
    header, data = raw[8 : 8 + n], raw[8 + n :]
    if kind == "bytes":  # overwrite a few header bytes
        text = bytearray(header)
        for _ in range(rng.integers(1, 4)):
            text[rng.integers(len(text))] = _random_byte(rng)
        return raw[:8] + bytes(text) + data
    if kind == "insert-drop":  # one byte fewer or more, with the length field kept or fixed
        i = int(rng.integers(len(header)))
        text = header[:i] + header[i + 1 :] if rng.integers(2) else header[:i] + bytes([_random_byte(rng)]) + header[i:]
        return struct.pack("<Q", len(text) if rng.integers(2) else n) + text + data
    if kind == "length":  # header length off by a little or a lot
        delta = int(rng.choice([-8, -4, -1, 1, 4, 8, 1 << 20, 1 << 40]))
        return struct.pack("<Q", max(0, n + delta)) + header + data
    # size: truncate or extend the file
    return raw[: int(rng.integers(len(raw)))] if rng.integers(2) else raw + bytes(int(rng.integers(1, 64)))


def _mutate_records(kind: str, raw: bytes, n: int, rng: np.random.Generator) -> bytes:
    parsed = json.loads(raw[8 : 8 + n])
    names = [k for k in parsed if k != "__metadata__"]
    a, b = (names[i] for i in rng.choice(len(names), 2, replace=False))
    if kind == "swap-offsets":
        parsed[a]["data_offsets"], parsed[b]["data_offsets"] = parsed[b]["data_offsets"], parsed[a]["data_offsets"]
    elif kind == "shift-offsets":
        begin, end = parsed[a]["data_offsets"]
        shift = int(rng.choice([-4, -1, 1, 4, 16]))
        parsed[a]["data_offsets"] = [max(0, begin + shift), end + shift] if rng.integers(2) else [begin, max(0, end + shift)]
    elif rng.integers(2):  # shape-dtype: a dim off by one
        parsed[a]["shape"] = [int(d) + int(rng.choice([-1, 1])) for d in parsed[a]["shape"]] or [2]
    else:  # shape-dtype: another (or an unknown) dtype
        parsed[a]["dtype"] = str(rng.choice(["F16", "BF16", "I32", "F64", "U8", "X9"]))
    text = json.dumps(parsed).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def mutate(raw: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """``(kind, mutated file)``: one seeded corruption of the header bytes, its length, its records or the file size."""
    (n,) = struct.unpack("<Q", raw[:8])
    kind = KINDS[rng.integers(len(KINDS))]
    if kind in ("bytes", "insert-drop", "length", "size"):
        return kind, _mutate_raw(kind, raw, n, rng)
    return kind, _mutate_records(kind, raw, n, rng)


def _digest(arrays: dict) -> dict:
    return {k: (list(shape), dtype, hashlib.sha256(data).hexdigest()) for k, (shape, dtype, data) in arrays.items()}


def _ours(path: Path):
    """Our reader's tensors as digests, or the one-line error it raised (as a string)."""
    try:
        return _digest({e.key: (e.shape, e.dtype.str, e.load().tobytes()) for e in iter_safetensors(path)})
    except MlcVisionError as err:
        return str(err)


def _theirs(path: Path):
    """The safetensors library's tensors as digests, or None when it refuses the file."""
    try:
        return _digest({k: (v.shape, v.dtype.str, v.tobytes()) for k, v in load_file(path).items()})
    except Exception:  # noqa: BLE001  (the library's refusal, whatever its type)
        return None


def read_both(path: Path) -> tuple[str, str]:
    """``(verdict, detail)`` of our reader against the ``safetensors`` library on one file."""
    try:
        ours = _ours(path)
    except Exception as err:  # noqa: BLE001  (anything but our error is what the fuzzer looks for)
        return "crashed", f"{type(err).__name__}: {err}"
    theirs = _theirs(path)
    if isinstance(ours, str):
        if "\n" in ours:
            return "crashed", f"multi-line error: {ours!r}"
        return ("refused by both" if theirs is None else "refused by us only"), ours
    if theirs is None:
        return "silent success", "we read a file the safetensors library refuses"
    return ("read equal by both", "") if ours == theirs else ("silent success", "we read other tensors than the library")


def in_forked_child(fn, timeout_s: float = 60.0):
    """``fn()``'s result from a forked child, or ``("signal N", ...)`` / ``("hung", ...)``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            payload = pickle.dumps(fn())
        except BaseException as err:  # noqa: BLE001
            payload = pickle.dumps(("crashed", f"{type(err).__name__}: {err}"))
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write_fd)
    deadline = time.monotonic() + timeout_s
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        while select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = pipe.read1(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return "hung", f"no answer in {timeout_s} s"
    if os.WIFSIGNALED(done[1]):
        return f"signal {os.WTERMSIG(done[1])}", ""
    return pickle.loads(b"".join(chunks)) if chunks else ("crashed", f"exit {os.WEXITSTATUS(done[1])}, no result")


def run(source: Path, cases: int, seed: int, workdir: Path) -> list[dict]:
    raw = source.read_bytes()
    rng = np.random.default_rng(seed)
    outcomes = []
    for case in range(cases):
        kind, mutated = mutate(raw, rng)
        path = workdir / f"fuzz-{case}.safetensors"
        path.write_bytes(mutated)
        status, detail = in_forked_child(lambda: read_both(path))
        outcomes.append({"case": case, "kind": kind, "verdict": status, "detail": detail[:300]})
        path.unlink()
    return outcomes


if __name__ == "__main__":
    file, count, seed, workdir = sys.argv[1:5]
    print(json.dumps(run(Path(file), int(count), int(seed), Path(workdir))))
