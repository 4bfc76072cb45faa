"""One image of any size -> several fixed-size tiles (InternVL dynamic tiles).

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
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..config import Preprocess, check_tile_range
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
    """The uint8 tiles of one image ``[tiles, tile, tile, 3]``: the grid row-major, then the thumbnail."""

    tiles: np.ndarray
    grid: Grid
    thumbnail: bool


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
