"""A checkpoint's tensor names and shapes, read from headers only (no tensor data, no torch).

``compile`` needs to know what a checkpoint holds without converting it: which
family its keys belong to (InternVL's EVA-CLIP port says ``clip``), and
whether the optional parts a config announces (a ``visual_projection``, its
bias) are really there. ``convert`` decides the same things from the same
listing, so a library and its params agree.

Sources, in order: the local safetensors files (their JSON headers), a shard
index (names only, shapes where the shard is present), or, for a hub id with
no local weights, the hub's safetensors metadata (headers fetched by range
request). PyTorch ``.bin`` files are listed through torch (memory-mapped,
no data read) when torch is installed; without it they give None (unknown)
and callers keep what the config says (``convert`` cannot read them either).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .source import Source, read_weight_map

Shapes = dict[str, "tuple[int, ...] | None"]


def checkpoint_shapes(source: Source, skip: Callable[[str], bool] = lambda key: False) -> Shapes | None:
    """``{key: shape}`` of every tensor (shape None when only an index names it), or None if unknown.

    A shard whose keys are all ``skip``-ped (a language model's) is never
    opened: its keys come from the index alone.
    """
    local = _local_shapes(source.path, skip)
    if local is not None:
        return local
    if source.repo_id:
        return _hub_shapes(source.repo_id, source.revision)
    return None


def _local_shapes(path: Path, skip: Callable[[str], bool]) -> Shapes | None:
    from ..weights.reader import read_safetensors_header  # header parser only: no tensor is read

    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        return _index_shapes(indexes[0], read_safetensors_header, skip)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return _bin_shapes(path)
    shapes: Shapes = {}
    for file in files:
        header, _ = read_safetensors_header(file)
        shapes.update({key: tuple(int(d) for d in info["shape"]) for key, info in header.items()})
    return shapes


def _bin_shapes(path: Path) -> Shapes | None:
    import importlib.util

    files = sorted(path.glob("pytorch_model*.bin"))
    if not files or importlib.util.find_spec("torch") is None:
        return None
    from ..weights.reader import iter_torch_bin

    return {entry.key: entry.shape for file in files for entry in iter_torch_bin(file)}


def _index_shapes(index: Path, read_header, skip: Callable[[str], bool]) -> Shapes:
    weight_map = read_weight_map(index)
    shapes: Shapes = {key: None for key in weight_map}
    needed = {shard for key, shard in weight_map.items() if not skip(key)}
    for shard in sorted(needed):
        file = index.parent / shard
        if file.is_file():
            header, _ = read_header(file)
            shapes.update({key: tuple(int(d) for d in info["shape"]) for key, info in header.items()})
    return shapes


def _hub_shapes(repo_id: str, revision: str | None) -> Shapes | None:
    """Shapes from the hub's safetensors headers; None offline or when the hub cannot tell."""
    from .source import _offline

    if _offline():
        return None
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(repo_id, revision=revision)
    except Exception:  # network boundary: no metadata means "unknown", never an error here
        return None
    shapes: Shapes = {}
    for file_meta in meta.files_metadata.values():
        shapes.update({key: tuple(info.shape) for key, info in file_meta.tensors.items()})
    return shapes
