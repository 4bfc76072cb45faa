"""One image of any size -> several fixed-size tiles (InternVL dynamic tiles, LLaVA-NeXT anyres).

Numpy and Pillow only (no TVM, no torch): the runtime loads under a
runtime-only TVM, and ``examples/cpp`` implements the same rules (the
contract is docs/tiling.md).

InternVL (1.5 to 3) cuts an image into a grid of ``rows x cols`` tiles of the
tower's ``image_size``, then adds a thumbnail (the whole image resized to one
tile) when the grid has more than one tile. The grid is the one whose aspect
ratio ``cols / rows`` is closest to the image's ``width / height``, among all
grids with ``min_tiles <= rows * cols <= max_tiles``, visited in the order of
transformers' ``get_all_supported_aspect_ratios`` (columns outer, rows inner,
then stably sorted by tile count). A tie (the same distance, exactly as
floats compare) goes to the later grid when the image's area is more than half
of the grid's pixel area (``height * width > 0.5 * tile^2 * rows * cols``), so
a square image of 700 px gets 2x2 tiles of 448 and one of 448 px stays 1x1.
This is transformers' ``get_optimal_tiled_canvas`` (GotOcr2 / InternVL image
processor) and InternVL's ``find_closest_aspect_ratio``; InternVL builds its
candidates from a set, whose order among grids of the same tile count can
differ from transformers' (only a tie between two grids of the same count,
which needs ``min_tiles > 1``, can tell them apart; we follow transformers).

The image is resized to ``(rows * tile, cols * tile)`` with the preprocessing's
filter and backend (bicubic; the ``torchvision`` backend is bit-exact to the
transformers processor, ``pil`` to InternVL's own Pillow resize), cut in
row-major order, and the thumbnail (a resize of the original image, not of the
canvas) comes last.

LLaVA-NeXT's ``anyres`` (transformers' ``LlavaNextImageProcessor`` and
``LlavaNextModel.pack_image_features``) picks one of the checkpoint's
``image_grid_pinpoints`` (``[height, width]``, multiples of the tile) with
``select_best_resolution``: the most image pixels kept after fitting the image
inside it (``int(side * scale)``), ties to the least wasted area, then to the
first listed. The image is resized to fit (the other side ``ceil``-ed), pasted
centered on a black canvas (the odd pixel of padding goes right and bottom),
and cut row-major; the base image (the whole image resized to one tile,
aspect ignored) comes first. After the tower and projector,
:func:`pack_anyres` puts the tiles' token grids side by side, crops the rows or
columns that only saw padding, appends the ``image_newline`` embedding to every
row of tokens, and puts the base image's tokens in front. LLaVA-OneVision
(``anyres_max_N``) first shrinks a token map bigger than about N tiles
(bilinear, as torch's ``interpolate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..config import Preprocess, check_pinpoints, check_tile_range
from ..errors import MlcVisionError
from .preprocess import resize


@dataclass(frozen=True)
class Grid:
    """A tile grid, height x width: ``rows`` tiles down, ``cols`` across."""

    rows: int
    cols: int

    @property
    def count(self) -> int:
        return self.rows * self.cols

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"


@dataclass(frozen=True)
class TiledImage:
    """The uint8 tiles of one image ``[tiles, tile, tile, 3]``.

    InternVL: the grid row-major, then the thumbnail when ``thumbnail``.
    anyres (``base``): the base image first, then the grid row-major.
    """

    tiles: np.ndarray
    grid: Grid
    thumbnail: bool = False
    base: bool = False


@lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[Grid, ...]:
    """Every grid with ``min_tiles <= rows * cols <= max_tiles``, in the order ties are decided."""
    check_tile_range(min_tiles, max_tiles)
    grids = [
        Grid(rows, cols)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= rows * cols <= max_tiles
    ]
    return tuple(sorted(grids, key=lambda g: g.count))  # stable: the column-major visit order stays


def choose_grid(height: int, width: int, tile_size: int, min_tiles: int, max_tiles: int) -> Grid:
    """The grid InternVL picks for a ``height x width`` image (ties: see the module docstring)."""
    if height < 1 or width < 1:
        raise MlcVisionError(f"cannot tile an empty image ({height}x{width})")
    aspect = width / height
    area = width * height
    best, best_diff = Grid(1, 1), float("inf")
    for grid in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - grid.cols / grid.rows)
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * grid.count:
            best = grid
    return best


def check_grid(grid: Grid, min_tiles: int, max_tiles: int) -> None:
    """A grid given by the caller must be one that the library's tile range allows."""
    if grid.rows < 1 or grid.cols < 1 or not min_tiles <= grid.count <= max_tiles:
        raise MlcVisionError(
            f"grid {grid} ({grid.count} tiles) does not match the library: it takes {min_tiles}..{max_tiles} tiles"
        )


def cut_tiles(canvas: np.ndarray, grid: Grid, tile_size: int) -> np.ndarray:
    """``[rows * tile, cols * tile, 3]`` -> ``[rows * cols, tile, tile, 3]``, row-major."""
    expected = (grid.rows * tile_size, grid.cols * tile_size)
    if canvas.shape[:2] != expected:
        raise MlcVisionError(f"canvas {canvas.shape[:2]} does not fit grid {grid} of {tile_size} px tiles")
    blocks = canvas.reshape(grid.rows, tile_size, grid.cols, tile_size, canvas.shape[2])
    return np.ascontiguousarray(blocks.transpose(0, 2, 1, 3, 4).reshape(grid.count, tile_size, tile_size, -1))


def internvl_tiles(
    rgb: np.ndarray,
    tile_size: int,
    pre: Preprocess,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    thumbnail: bool = True,
    grid: Grid | None = None,
) -> TiledImage:
    """An HxWx3 uint8 image -> its InternVL tiles (``grid`` overrides the choice, within the range)."""
    if grid is None:
        grid = choose_grid(rgb.shape[0], rgb.shape[1], tile_size, min_tiles, max_tiles)
    else:
        check_grid(grid, min_tiles, max_tiles)
    canvas = resize(rgb, (grid.rows * tile_size, grid.cols * tile_size), pre.resample, pre.backend)
    tiles = cut_tiles(canvas, grid, tile_size)
    with_thumbnail = thumbnail and grid.count > 1
    if with_thumbnail:
        small = resize(rgb, (tile_size, tile_size), pre.resample, pre.backend)
        tiles = np.concatenate([tiles, small[None]], axis=0)
    return TiledImage(tiles=tiles, grid=grid, thumbnail=with_thumbnail)


def tile_count(grid: Grid, thumbnail: bool) -> int:
    """Tiles the tower runs on for one image (the thumbnail only joins a grid of several tiles)."""
    return grid.count + (1 if thumbnail and grid.count > 1 else 0)


# ---- LLaVA-NeXT anyres ------------------------------------------------------------------------


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The ``(height, width)`` pinpoint that keeps the most of the image and wastes the least."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        fitted_w, fitted_h = int(width * scale), int(height * scale)
        effective = min(fitted_w * fitted_h, width * height)
        wasted = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pin_h, pin_w), effective, wasted
    if best is None:
        raise MlcVisionError("the library has no grid pinpoints to choose from")
    return best


def fitted_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The image's size inside ``target`` keeping its aspect (the scaled side rounded up)."""
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def check_pinpoint(grid: Grid, tile_size: int, pinpoints) -> None:
    """A grid given by the caller must be one of the library's pinpoints."""
    if (grid.rows * tile_size, grid.cols * tile_size) not in {tuple(p) for p in pinpoints}:
        allowed = ", ".join(f"{h // tile_size}x{w // tile_size}" for h, w in pinpoints)
        raise MlcVisionError(f"grid {grid} does not match the library: its anyres grids are {allowed}")


def anyres_tiles(rgb: np.ndarray, tile_size: int, pre: Preprocess, pinpoints, *, grid: Grid | None = None) -> TiledImage:
    """An HxWx3 uint8 image -> the base image then the tiles of its best pinpoint (``grid`` overrides)."""
    check_pinpoints(pinpoints, tile_size)
    height, width = rgb.shape[:2]
    if grid is None:
        target = select_best_resolution(height, width, pinpoints)
        grid = Grid(target[0] // tile_size, target[1] // tile_size)
    else:
        check_pinpoint(grid, tile_size, pinpoints)
        target = (grid.rows * tile_size, grid.cols * tile_size)
    new_h, new_w = fitted_size(height, width, target)
    canvas = np.zeros((*target, rgb.shape[2]), np.uint8)
    top, left = (target[0] - new_h) // 2, (target[1] - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resize(rgb, (new_h, new_w), pre.resample, pre.backend)
    base = resize(rgb, (tile_size, tile_size), pre.resample, pre.backend)
    tiles = np.concatenate([base[None], cut_tiles(canvas, grid, tile_size)], axis=0)
    return TiledImage(tiles=tiles, grid=grid, base=True)


def unpadded_extent(rows: int, cols: int, height: int, width: int) -> tuple[slice, slice]:
    """The token rows and columns of a ``rows x cols`` token map that cover the image, not its padding.

    transformers' ``unpad_image``: the scaled side is rounded to 7 decimals then
    truncated, and the padding removed is ``(current - new) // 2`` on both ends.
    """
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        pad = (rows - new_rows) // 2
        return slice(pad, rows - pad), slice(0, cols)
    new_cols = int(round(width * (rows / height), 7))
    pad = (cols - new_cols) // 2
    return slice(0, rows), slice(pad, cols - pad)


def onevision_shrunk_size(rows: int, cols: int, side: int, anyres_max: int | None) -> tuple[int, int] | None:
    """OneVision's ``anyres_max_N``: the size an unpadded token map is shrunk to, None when it is kept.

    ``ratio = sqrt(rows * cols / (N * side^2))``; above 1.1 the map becomes
    ``int(rows // ratio) x int(cols // ratio)``.
    """
    if anyres_max is None:
        return None
    ratio = math.sqrt(rows * cols / (anyres_max * side**2))
    if ratio <= 1.1:
        return None
    return int(rows // ratio), int(cols // ratio)


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's bilinear source taps (align_corners=False) in float32: first, second, their weights."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
    first = src.astype(np.int64)
    second = first + (first < in_size - 1)
    lam1 = np.clip(src - first.astype(f32), f32(0), f32(1)).astype(f32)
    return first, second, (f32(1) - lam1).astype(f32), lam1


def shrink_bilinear(token_map: np.ndarray, out_rows: int, out_cols: int) -> np.ndarray:
    """``[rows, cols, channels]`` -> ``[out_rows, out_cols, channels]`` as torch's bilinear, in float32.

    Each output is ``(x00 * w0 + x01 * w1) * h0 + (x10 * w0 + x11 * w1) * h1``. torch's CPU
    kernel agrees to float rounding (a few 1e-7 relative), not bit for bit; the C++
    example computes exactly this.
    """
    x = token_map.astype(np.float32)
    r0, r1, h0, h1 = _linear_taps(x.shape[0], out_rows)
    c0, c1, w0, w1 = _linear_taps(x.shape[1], out_cols)
    w0, w1 = w0[None, :, None], w1[None, :, None]
    top = x[r0][:, c0] * w0 + x[r0][:, c1] * w1
    bottom = x[r1][:, c0] * w0 + x[r1][:, c1] * w1
    return top * h0[:, None, None] + bottom * h1[:, None, None]


def pack_anyres(
    features: np.ndarray,
    grid: Grid,
    image_size: tuple[int, int],
    newline: np.ndarray | None,
    anyres_max: int | None = None,
) -> np.ndarray:
    """``[1 + tiles, side * side, width]`` (base first) -> the LLM's image sequence ``[tokens, width]``.

    The tiles' token maps are joined into one ``(rows * side) x (cols * side)``
    map, cropped to the image (:func:`unpadded_extent`), shrunk when OneVision's
    ``anyres_max`` says so (:func:`onevision_shrunk_size`), each token row gets
    ``newline`` appended (when given), and the base image's tokens go first.
    """
    count, tokens, channels = features.shape
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise MlcVisionError(
            f"anyres packing needs a square token grid per tile, got {tokens} tokens "
            "(compile with feature 'patch' so the class token is dropped)"
        )
    if count != grid.count + 1:
        raise MlcVisionError(f"grid {grid} needs {grid.count + 1} tiles (base first), got {count}")
    tiles = features[1:].reshape(grid.rows, grid.cols, side, side, channels)
    token_map = tiles.transpose(0, 2, 1, 3, 4).reshape(grid.rows * side, grid.cols * side, channels)
    rows, cols = unpadded_extent(token_map.shape[0], token_map.shape[1], *image_size)
    token_map = token_map[rows, cols]
    shrunk = onevision_shrunk_size(token_map.shape[0], token_map.shape[1], side, anyres_max)
    if shrunk is not None:
        token_map = shrink_bilinear(token_map, *shrunk).astype(features.dtype)
    if newline is not None:
        column = np.broadcast_to(newline.astype(token_map.dtype), (token_map.shape[0], 1, channels))
        token_map = np.concatenate([token_map, column], axis=1)
    return np.concatenate([features[0], token_map.reshape(-1, channels)], axis=0)


def anyres_token_count(
    grid: Grid, tokens_per_tile: int, image_size: tuple[int, int], newline: bool, anyres_max: int | None = None
) -> int:
    """Tokens :func:`pack_anyres` returns for an image of ``image_size`` (height, width) on ``grid``."""
    side = math.isqrt(tokens_per_tile)
    rows, cols = unpadded_extent(grid.rows * side, grid.cols * side, *image_size)
    kept = (rows.stop - rows.start, cols.stop - cols.start)
    kept = onevision_shrunk_size(*kept, side, anyres_max) or kept
    return tokens_per_tile + kept[0] * (kept[1] + (1 if newline else 0))
