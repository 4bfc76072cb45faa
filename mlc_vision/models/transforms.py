"""Convert-time weight transforms shared by the families (``WeightMap.transforms``).

A transform is ``fn(array, config) -> array`` and runs once, when a checkpoint
is converted, so the compiled library never carries the work (nor torch: these
are numpy only).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import MlcVisionError

CUBIC_A = -0.75  # torch's (and PIL's) bicubic convolution constant


def cubic_weights(t: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 from ``floor(x)``.

    ``t`` is the fractional part of the source coordinate; returns ``[..., 4]``.
    """
    t = np.asarray(t, dtype=np.float64)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out_size, in_size]`` matrix of 1-D bicubic resampling, as torch defines it.

    Equal to ``F.interpolate(mode="bicubic", align_corners=False)`` given a target
    size: the source coordinate of output ``i`` is ``(i + 0.5) * in/out - 0.5``
    (not clamped), the 4 taps around it use Keys' kernel with ``a = -0.75``, and
    taps outside the input read the border sample (index clamp). No antialiasing
    when shrinking, like torch's default.
    """
    # The coordinate is computed in float32 as torch does: with float64 the
    # fractional parts of non-integer ratios (448/14 -> 23) differ by ~1e-6.
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = (np.arange(out_size, dtype=f32) + f32(0.5)) * scale - f32(0.5)
    base = np.floor(src)
    weights = cubic_weights((src - base).astype(f32))  # [out, 4]
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix


def resize_bicubic(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize ``[h, w, channels]`` to ``[out_h, out_w, channels]`` (separable bicubic, float32)."""
    rows = bicubic_matrix(grid.shape[0], out_h).astype(np.float32)
    cols = bicubic_matrix(grid.shape[1], out_w).astype(np.float32)
    grid = np.asarray(grid, dtype=np.float32)
    tmp = np.einsum("oh,hwc->owc", rows, grid)
    return np.einsum("pw,owc->opc", cols, tmp)


def interpolate_position_embedding(array: np.ndarray, config) -> np.ndarray:
    """A learned position embedding resampled to the grid of ``config.image_size``.

    The token axis is the second to last (``[1, tokens, d]`` as InternViT stores
    it, ``[tokens, d]`` as CLIP does); the class-token row, when the family has
    one, is kept as is and the patch rows are resized to the config's grid with
    bicubic interpolation (``align_corners=False``), in float32, then cast back
    to the checkpoint's dtype. This is what InternViT does at every forward pass
    (``_get_pos_embed``) and what transformers' ``interpolate_pos_encoding``
    does; doing it once here lets a library compiled at another resolution use
    the checkpoint. The checkpoint's grid comes from the array itself; a
    ``config.checkpoint_image_size`` that disagrees with it is an error.
    """
    prefix = config.tokens.class_tokens  # register tokens have no position
    tokens, dim = array.shape[-2], array.shape[-1]
    old_grid = math.isqrt(tokens - prefix)
    if old_grid * old_grid != tokens - prefix:
        raise MlcVisionError(
            f"position embedding {tuple(array.shape)}: {tokens - prefix} patch positions do not form a square grid"
        )
    ckpt_size = config.checkpoint_image_size
    if ckpt_size is not None and ckpt_size // config.patch_size != old_grid:
        raise MlcVisionError(
            f"position embedding {tuple(array.shape)} has a {old_grid}x{old_grid} grid, but "
            f"checkpoint_image_size {ckpt_size} / patch {config.patch_size} gives {ckpt_size // config.patch_size}"
        )
    rows, cols = config.tokens.grid
    if (rows, cols) == (old_grid, old_grid):
        return array
    lead = array.shape[:-2]
    flat = np.asarray(array, dtype=np.float32).reshape(-1, tokens, dim)
    out = []
    for table in flat:  # one per leading index (there is one in every checkpoint we know)
        patches = resize_bicubic(table[prefix:].reshape(old_grid, old_grid, dim), rows, cols)
        out.append(np.concatenate([table[:prefix], patches.reshape(rows * cols, dim)], axis=0))
    resized = np.stack(out).reshape(*lead, prefix + rows * cols, dim)
    return resized.astype(array.dtype)
