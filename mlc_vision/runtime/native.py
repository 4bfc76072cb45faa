"""Native-resolution preprocessing and attention geometry (Qwen2-VL / Qwen2.5-VL vision towers).

The contract a runtime follows (docs/native_resolution.md), numpy and Pillow only:

1. :func:`smart_resize`: each image is resized so that both sides are
   multiples of ``factor = patch_size * merge_size`` and its area is within
   ``[min_pixels, max_pixels]`` (an image over the token budget is resized
   down), as transformers' ``Qwen2VLImageProcessor`` does;
2. :func:`flatten_patches`: the normalized image, repeated to
   ``temporal_patch_size`` frames, cut into patches in merge-group order
   (``grid_h/merge, grid_w/merge, merge, merge``), each patch flattened as
   ``[C, temporal, patch, patch]``; ``grid_thw = (1, grid_h, grid_w)``;
3. :func:`attention_inputs`: for the images of one call, concatenated,
   the per-patch ``position_ids``, ``image_ids``, and with windows
   ``window_ids`` and ``window_index`` (transformers' ``get_vision_window_index``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import Preprocess
from ..errors import MlcVisionError
from .preprocess import load_rgb, normalize, resize

MAX_ASPECT = 200  # the processor refuses more elongated images


@dataclass(frozen=True)
class NativeGeometry:
    """The numbers of a native-resolution library's metadata that the runtime needs."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    window_size: int = 0

    @classmethod
    def from_metadata(cls, native: dict) -> "NativeGeometry":
        return cls(native["patch_size"], native["temporal_patch_size"], native["merge_size"], native["window_size"])

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``(height, width)`` multiples of ``factor`` with the area in ``[min_pixels, max_pixels]``, aspect kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise MlcVisionError(
            f"image {width}x{height}: aspect ratio {max(height, width) / min(height, width):.1f} exceeds {MAX_ASPECT}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def check_grid(grid_h: int, grid_w: int, merge: int) -> None:
    """A patch grid the library can take: whole merge groups (one line otherwise)."""
    if grid_h < 1 or grid_w < 1 or grid_h % merge or grid_w % merge:
        raise MlcVisionError(f"patch grid {grid_h}x{grid_w} is not a multiple of the merge size {merge} on both sides")


def flatten_patches(pixels: np.ndarray, geometry: NativeGeometry) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalized ``[C, H, W]`` -> ``([grid_h * grid_w, C*t*p*p], (1, grid_h, grid_w))`` in the processor's order."""
    channels, height, width = pixels.shape
    p, m, t = geometry.patch_size, geometry.merge_size, geometry.temporal_patch_size
    if height % p or width % p:
        raise MlcVisionError(f"image {width}x{height} is not a multiple of the patch size {p}")
    grid_h, grid_w = height // p, width // p
    check_grid(grid_h, grid_w, m)
    frames = np.broadcast_to(pixels[None], (t, channels, height, width))
    x = frames.reshape(t, channels, grid_h // m, m, p, grid_w // m, m, p)
    x = x.transpose(2, 5, 3, 6, 1, 0, 4, 7)  # gh, gw, mh, mw, C, t, p, p
    return np.ascontiguousarray(x.reshape(grid_h * grid_w, channels * t * p * p)), (1, grid_h, grid_w)


def preprocess_native(images, pre: Preprocess, geometry: NativeGeometry) -> tuple[list[np.ndarray], list[tuple]]:
    """Images -> flattened patches and ``grid_thw`` per image (``Qwen2VLImageProcessor`` with the torchvision backend)."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise MlcVisionError("no images to encode")
    patches, grids = [], []
    for item in items:
        rgb = load_rgb(item)
        size = smart_resize(rgb.shape[0], rgb.shape[1], geometry.factor, pre.min_pixels, pre.max_pixels)
        pixels = normalize(resize(rgb, size, pre.resample, pre.backend), pre, pre.backend)
        flat, grid = flatten_patches(pixels, geometry)
        patches.append(flat)
        grids.append(grid)
    return patches, grids


def position_ids(grid_h: int, grid_w: int, merge: int) -> np.ndarray:
    """``[grid_h * grid_w, 2]`` int32 (row, col) in merge-group order."""
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    shape = (grid_h // merge, merge, grid_w // merge, merge)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).ravel()
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).ravel()
    return np.stack([rows, cols], axis=-1).astype(np.int32)


def window_groups(grid_h: int, grid_w: int, merge: int, groups_per_window: int) -> tuple[np.ndarray, np.ndarray]:
    """One image's merge groups in window order, and the window of each group in the processor's order.

    Windows are ``groups_per_window`` merge groups square, tiled from the
    top-left; the last row and column of windows may be partial (the padding
    of transformers' ``get_vision_window_index``, which never holds a patch).
    """
    llm_h, llm_w = grid_h // merge, grid_w // merge
    index = np.arange(llm_h * llm_w).reshape(llm_h, llm_w)
    win_rows, win_cols = index // llm_w // groups_per_window, index % llm_w // groups_per_window
    windows_w = -(-llm_w // groups_per_window)
    window = (win_rows * windows_w + win_cols).ravel()
    order = np.argsort(window, kind="stable")  # window by window, row-major inside each
    return order, window


def attention_inputs(grids: Sequence[tuple[int, int, int]], geometry: NativeGeometry) -> dict[str, np.ndarray]:
    """The per-patch int32 inputs of ``encode`` for images concatenated in ``grids`` order."""
    m = geometry.merge_size
    group = m * m
    groups_per_window = geometry.window_size // geometry.factor if geometry.window_size else 0
    pos, images, windows, window_index = [], [], [], []
    group_base, window_base = 0, 0
    for image, (t, grid_h, grid_w) in enumerate(grids):
        check_grid(grid_h, grid_w, m)
        if t != 1:
            raise MlcVisionError(f"grid_thw temporal size {t}: only still images (t = 1) are supported")
        pos.append(position_ids(grid_h, grid_w, m))
        images.append(np.full(grid_h * grid_w, image, np.int32))
        if groups_per_window:
            order, window = window_groups(grid_h, grid_w, m, groups_per_window)
            windows.append(np.repeat(window + window_base, group).astype(np.int32))  # per patch, processor order
            window_index.append(order + group_base)
            window_base += int(window.max()) + 1
        group_base += grid_h * grid_w // group
    out = {"position_ids": np.concatenate(pos), "image_ids": np.concatenate(images)}
    if groups_per_window:
        out["window_ids"] = np.concatenate(windows)
        out["window_index"] = np.concatenate(window_index).astype(np.int32)
    return out

