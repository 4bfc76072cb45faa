"""Is a params dir whole? Shard sizes always, shard checksums on request.

``tensor-cache.json`` records each shard's ``nbytes`` and ``md5sum``.
Comparing sizes costs one ``stat`` per shard and catches truncated or
appended shards; it runs on every load. Checksums read every byte (about
1 s per GB), so they run when asked (``VisionEncoder(verify=True)``,
``mlc-vision run --verify``) and whenever a size disagrees, so that the
error can say whether the content is damaged too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import MlcVisionError
from .params import CACHE_JSON

CHUNK_BYTES = 8 << 20


def _shards(directory: Path) -> list[dict]:
    path = directory / CACHE_JSON
    try:
        shards = json.loads(path.read_text())["records"]
        return [s for s in shards if isinstance(s["dataPath"], str)]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise MlcVisionError(f"cannot read {path}: {type(err).__name__} {err}") from None


def _shard_path(directory: Path, shard: dict) -> Path:
    path = (directory / shard["dataPath"]).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise MlcVisionError(f"params shard {shard['dataPath']!r} in {directory / CACHE_JSON} is outside the params dir")
    return path


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_params_files(directory: str | Path, verify: bool = False) -> None:
    """Raise one line naming the first shard that is missing, of the wrong size, or (``verify``) damaged."""
    directory = Path(directory)
    for shard in _shards(directory):
        path = _shard_path(directory, shard)
        try:
            size = path.stat().st_size
        except OSError as err:
            raise MlcVisionError(f"params shard {path} cannot be read: {err.strerror or err}") from None
        size_ok = size == shard.get("nbytes")
        if size_ok and not verify:
            continue
        expected = shard.get("md5sum")
        damaged = expected is not None and md5_of(path) != expected
        if not size_ok:
            also = " and its checksum differs" if damaged else ""
            raise MlcVisionError(
                f"params shard {path} holds {size} bytes but {CACHE_JSON} records {shard.get('nbytes')}{also}; "
                "convert again"
            )
        if damaged:
            raise MlcVisionError(f"params shard {path} is corrupted: its md5 differs from {CACHE_JSON}; convert again")
        if expected is None:
            raise MlcVisionError(f"params shard {path} has no md5sum in {CACHE_JSON} to verify against")
