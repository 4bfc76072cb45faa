"""Entries and metadata of a native-resolution library (Qwen2-VL / Qwen2.5-VL vision towers).

The patch count is symbolic: one library serves every image size. ``encode``
takes per-patch inputs in the processor's order (docs/native_resolution.md):

- ``patches [num_patches, C*t*p*p]`` in the compiled dtype, normalized;
- ``position_ids [num_patches, 2]`` int32: (row, col) of the patch in its image's grid;
- ``image_ids [num_patches]`` int32: the image a patch belongs to (attention never crosses it);
- with window attention (Qwen2.5) also ``window_ids [num_patches]`` int32 (the window of the
  patch; windows never span two images) and ``window_index [num_tokens]`` int32
  (transformers' window order of the merge groups);
- in the order the blocks see the patches (window order), the ids are
  non-decreasing: every image and window is one run (the CPU's segmented
  attention kernel refuses other orders);

and returns ``[num_tokens, merger_hidden_size]`` with ``num_tokens = num_patches / merge**2``,
in the processor's order. The runtime computes the inputs from each image's grid
(``mlc_vision/runtime/native.py``).
"""

from __future__ import annotations

from tvm.relax.frontend import nn

from ..config import VisionConfig
from ..models.qwen2_vl import patch_width

PATCHES = "num_patches"
TOKENS = "num_tokens"


def native_inputs(config: VisionConfig, dtype: str) -> list[dict]:
    """The inputs of ``encode`` in order: name, shape (symbolic names as strings), dtype, meaning."""
    inputs = [
        {"name": "patches", "shape": [PATCHES, patch_width(config)], "dtype": dtype,
         "layout": "flattened patches [C, temporal, patch, patch] in the processor's order, normalized"},
        {"name": "position_ids", "shape": [PATCHES, 2], "dtype": "int32",
         "layout": "(row, col) of each patch in its image's patch grid"},
        {"name": "image_ids", "shape": [PATCHES], "dtype": "int32",
         "layout": "image of each patch (0, 1, ... in call order: non-decreasing)"},
    ]  # fmt: skip
    if config.window_size:
        inputs += [
            {"name": "window_ids", "shape": [PATCHES], "dtype": "int32",
             "layout": "attention window of each patch (non-decreasing in window order)"},
            {"name": "window_index", "shape": [TOKENS], "dtype": "int32",
             "layout": "merge groups in window order (transformers' window_index)"},
        ]  # fmt: skip
    return inputs


def native_spec(config: VisionConfig, dtype: str, options: dict) -> dict:
    """The ``export_tvm`` method spec of ``encode`` (and of ``hidden_states``)."""
    spec = {i["name"]: nn.spec.Tensor(i["shape"], i["dtype"]) for i in native_inputs(config, dtype)}
    spec["$"] = options
    return spec


def native_metadata(config: VisionConfig, dtype: str) -> dict:
    """The contract a runtime follows for a native-resolution library (``native_resolution`` in the metadata)."""
    merge = config.spatial_merge_size
    pre = config.preprocess
    return {
        "patch_size": config.patch_size,
        "temporal_patch_size": config.temporal_patch_size,
        "merge_size": merge,
        "factor": config.patch_size * merge,
        "min_pixels": pre.min_pixels,
        "max_pixels": pre.max_pixels,
        "window_size": config.window_size,
        "window_merge_groups": config.window_size // (config.patch_size * merge) if config.window_size else None,
        "fullatt_block_indexes": list(config.fullatt_block_indexes),
        "tokens": "per image (grid_h / merge) * (grid_w / merge); grid = resized size / patch_size",
        "output_width": config.merger_hidden_size,
        "inputs": native_inputs(config, dtype),
    }
