"""Where a checkpoint is and which of its files hold weights.

``--model`` is a local directory or a hub id (``owner/name``). A hub id is
fetched in two steps so that nothing but what we read is downloaded: first
the small files (``config.json``, ``preprocessor_config.json``, the shard
index), then only the weight shards that hold keys we need. For a whole
LLaVA / InternVL-chat checkpoint that means the shards with the vision tower
and the projector: the language model's shards are never fetched nor opened.

The hub client honors ``HF_HUB_OFFLINE`` (then only the local cache is used).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import MlcVisionError

# The small files every conversion reads (fetched first for a hub id).
METADATA_PATTERNS = (
    "config.json",
    "preprocessor_config.json",
    "*.safetensors.index.json",
    "pytorch_model*.bin.index.json",
)
SAFETENSORS_INDEXES = ("model.safetensors.index.json",)
BIN_INDEXES = ("pytorch_model.bin.index.json",)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---- the source itself ---------------------------------------------------------------------------


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return constants.HF_HUB_OFFLINE or env in ("1", "true", "yes", "on")


def _hub_download(repo_id: str, patterns: list[str], revision: str | None = None) -> Path:
    """Fetch only ``patterns`` of a hub repo (or find them in the cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, local_files_only=_offline()
        )
    except Exception as err:  # network boundary: many error types, all the user's environment
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = " (HF_HUB_OFFLINE is set: only the local cache is used)" if _offline() else ""
        raise MlcVisionError(f"cannot fetch {repo_id!r} from the Hugging Face hub{offline}: {first}") from None
    return Path(path)


@dataclass(frozen=True)
class Source:
    """A resolved checkpoint: a local directory, fetched from the hub when ``repo_id`` is set."""

    spec: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        return f"hf://{self.repo_id}" if self.repo_id else str(self.path)

    def weight_files(self, wanted: Callable[[str], bool] | None = None) -> list[Path]:
        """The weight files to read, with an index only the shards that hold a wanted key.

        safetensors are preferred over ``.bin`` (see :meth:`_weight_file_names`);
        ``.bin`` needs torch (checked by the reader). For a hub id the chosen
        files are fetched now.
        """
        names = self._weight_file_names(wanted)
        if self.repo_id:
            self._fetch(names)
        paths = [self.path / name for name in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise MlcVisionError(f"weight file(s) listed by the index are missing: {', '.join(missing)}")
        return paths

    def _weight_file_names(self, wanted) -> list[str]:
        """The first kind of weight files the checkpoint has, in this order (safetensors before ``.bin``):
        ``model.safetensors.index.json``, another ``*.safetensors.index.json``, ``model.safetensors``,
        any ``*.safetensors``, ``pytorch_model.bin.index.json``, ``pytorch_model.bin``."""
        for index in self._indexes(SAFETENSORS_INDEXES, "*.safetensors.index.json"):
            return shards_from_index(index, wanted)
        if self._has("model.safetensors"):
            return ["model.safetensors"]
        singles = sorted(p.name for p in self.path.glob("*.safetensors"))
        if singles:
            return singles
        for index in self._indexes(BIN_INDEXES, "pytorch_model*.bin.index.json"):
            return shards_from_index(index, wanted)
        if self._has("pytorch_model.bin"):
            return ["pytorch_model.bin"]
        raise MlcVisionError(
            f"no weights in {self.describe()}: expected model.safetensors, sharded *.safetensors with "
            "model.safetensors.index.json, or pytorch_model*.bin"
        )

    def _indexes(self, preferred: tuple[str, ...], pattern: str) -> list[Path]:
        """Shard indexes present locally: the usual names first, then any other matching ``pattern``."""
        found = [self.path / name for name in preferred if (self.path / name).is_file()]
        return found + [p for p in sorted(self.path.glob(pattern)) if p.name not in preferred]

    def _has(self, name: str) -> bool:
        """Whether the checkpoint has the file (fetched now for a hub id)."""
        return (self.path / name).is_file() or (self.repo_id is not None and self._hub_has(name))

    def _hub_has(self, name: str) -> bool:
        try:
            self._fetch([name])
        except MlcVisionError:
            return False
        return (self.path / name).is_file()

    def _fetch(self, names: list[str]) -> None:
        fetched = _hub_download(self.repo_id, list(names), self.revision)
        if fetched != self.path:
            raise MlcVisionError(f"hub snapshot of {self.repo_id!r} moved while fetching ({fetched})")


def read_weight_map(index: Path) -> dict[str, str]:
    """An index's ``weight_map`` (tensor name -> shard file), checked: a dict of names, shards inside the checkpoint."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise MlcVisionError(f"cannot read shard index {index}: {type(err).__name__} {err}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MlcVisionError(f"shard index {index}: weight_map must map tensor names to shard file names")
    for shard in set(weight_map.values()):
        _check_shard_inside(index, shard)
    return weight_map


def shards_from_index(index: Path, wanted: Callable[[str], bool] | None) -> list[str]:
    """Shard file names of an index, in first-appearance order; with ``wanted``, only those needed."""
    shards: dict[str, bool] = {}
    for key, shard in read_weight_map(index).items():
        needed = wanted is None or wanted(key)
        shards[shard] = shards.get(shard, False) or needed
    return [shard for shard, needed in shards.items() if needed]


def _check_shard_inside(index: Path, shard: str) -> None:
    """A shard named by an index must be a path inside the checkpoint, not one out of it."""
    # Lexical, not resolve(): a hub snapshot's files are symlinks into the cache's blob store.
    normal = os.path.normpath(shard)
    if not shard or os.path.isabs(shard) or normal == ".." or normal.startswith(".." + os.sep):
        raise MlcVisionError(f"shard index {index} names {shard!r}, which is outside the checkpoint directory")


def resolve_source(spec: str | Path, revision: str | None = None) -> Source:
    """A local checkpoint directory, or a hub id fetched (config and index only, for now)."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        return Source(text, _checked_dir(path))
    if isinstance(spec, Path) or not REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise MlcVisionError(f"checkpoint directory {path} does not exist")
    try:
        snapshot = _hub_download(text, list(METADATA_PATTERNS), revision)
    except MlcVisionError as err:
        raise MlcVisionError(f"{text!r} is neither a local directory nor a reachable hub id ({err})") from None
    return Source(text, _checked_dir(snapshot), repo_id=text, revision=revision)


def _checked_dir(path: Path) -> Path:
    if not path.is_dir():
        raise MlcVisionError(f"checkpoint path {path} is not a directory")
    if not (path / "config.json").is_file():
        raise MlcVisionError(f"no config.json in checkpoint directory {path}")
    return path.resolve()
