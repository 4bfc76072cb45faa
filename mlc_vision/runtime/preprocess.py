"""Images -> normalized ``pixel_values`` [batch, 3, H, W] float32, equal to transformers.

Pillow and numpy only: torch, torchvision and transformers are test-only.

What is matched, and how exactly (``tests/test_preprocess.py`` checks each):

* ``backend="torchvision"`` (default) reproduces the image processors that
  transformers 5 gives by default: ``CLIPImageProcessor(...)``,
  ``SiglipImageProcessor(...)`` and ``AutoImageProcessor.from_pretrained`` are
  the ``TorchvisionBackend`` classes whenever torchvision is installed, and
  that is what LLaVA's ``CLIPImageProcessor.from_pretrained`` and HF's
  ``LlavaProcessor`` hand out. On the CPU, torchvision resizes a uint8 image
  with ATen's integer kernel (weights as int16 fixed point, horizontal pass,
  clamp to uint8, vertical pass) and then normalizes in float32 with the
  rescale factor folded into mean and std. :func:`_resize_torch` redoes that
  integer arithmetic in numpy, so the result is **bit-exact** (max abs
  error 0). Not matched: the same processor run with ``device="cuda"``
  (torch resizes in float there; up to a few uint8 steps apart).
* ``backend="pil"`` resizes with Pillow itself, and is bit-exact to the
  transformers PIL backend (``CLIPImageProcessorPil``, ``backend="pil"``).
  torchvision transforms on a PIL image (InternVL's ``T.Resize((448, 448),
  BICUBIC), T.ToTensor(), T.Normalize``; open_clip) resize with Pillow too and
  differ from it only in float rounding (<= 1e-6).
* The two backends differ in the resize only: Pillow's fixed point has more
  bits (about 0.5% of pixels one uint8 step apart), and Pillow (13 here) runs
  the vertical pass first when that is cheaper, while ATen always starts with
  the horizontal one; the intermediate clamp to uint8 then makes images with
  strong high-frequency content differ by several steps (CLIP-normalized: 0.03
  on the test photos, up to 0.1 for InternVL at 448).

Conversion to RGB is transformers' ``convert_to_rgb``: anything with alpha
(RGBA, LA, palette with a transparent index) is composited over white, every
other mode goes through ``Image.convert("RGB")``. (LLaVA's and InternVL's own
loaders call ``.convert("RGB")``, which drops alpha instead; a uint8 HxWx4
array is composited by Pillow, where transformers composites arrays in float.)
Files are opened with Pillow and turned upright by their EXIF orientation, as
``load_image`` does.
``pad_to_square`` is LLaVA's ``expand2square``: the shorter side is padded,
centered, with ``tuple(int(x * 255) for x in mean)``, before resizing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from ..config import RESAMPLE_FILTERS, Preprocess
from ..errors import MlcVisionError

ImageLike = Union[Image.Image, np.ndarray, str, Path]

BACKENDS = ("torchvision", "pil")
RESIZE_MODES = ("shortest_edge", "exact")


def preprocess(
    images: ImageLike | Sequence[ImageLike], pre: Preprocess, *, backend: str | None = None
) -> np.ndarray:
    """One image or a list of them (any sizes) -> ``[batch, 3, H, W]`` float32."""
    backend = backend or pre.backend
    if backend not in BACKENDS:
        raise MlcVisionError(f"unknown preprocessing backend {backend!r}; known: {', '.join(BACKENDS)}")
    _check(pre, backend)
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise MlcVisionError("preprocess got an empty list of images")
    return np.stack([_one(load_rgb(item), pre, backend) for item in items])


def _one(rgb: np.ndarray, pre: Preprocess, backend: str) -> np.ndarray:
    if pre.pad_to_square:
        rgb = expand2square(rgb, tuple(int(m * 255) for m in pre.mean))
    size, crop = output_size(rgb.shape[0], rgb.shape[1], pre), pre.crop_size
    if backend == "torchvision" and crop is not None and crop <= min(size):
        # Every output pixel is computed on its own, so only the crop is computed.
        top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
        rgb = _resize_torch(rgb, size, pre.resample, slice(top, top + crop), slice(left, left + crop))
    else:
        rgb = resize(rgb, size, pre.resample, backend)
        if crop is not None:
            rgb = center_crop(rgb, crop, backend)
    return normalize(rgb, pre, backend)


def _check(pre: Preprocess, backend: str) -> None:
    if pre.resize not in RESIZE_MODES:
        raise MlcVisionError(f"preprocess resize must be one of {RESIZE_MODES}, got {pre.resize!r}")
    if pre.resize == "shortest_edge" and pre.crop_size is None:
        raise MlcVisionError("preprocess resize 'shortest_edge' needs a crop_size (the library takes a fixed size)")
    known = _FILTERS if backend == "torchvision" else _PIL_FILTERS
    if pre.resample not in known:
        raise MlcVisionError(
            f"resample {pre.resample!r} is not supported by the {backend} backend; known: {sorted(known)}"
        )


# ---- loading and RGB conversion ---------------------------------------------


def load_rgb(image: ImageLike) -> np.ndarray:
    """PIL image, path or uint8 array (HxW, HxWx3, HxWx4) -> HxWx3 uint8."""
    if isinstance(image, (str, Path)):
        image = _open(Path(image))
    elif isinstance(image, np.ndarray):
        image = _from_array(image)
    elif not isinstance(image, Image.Image):
        raise MlcVisionError(f"cannot preprocess a {type(image).__name__}: pass a PIL image, a path or a uint8 array")
    return to_rgb(image)


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).split("\n")[0]
        raise MlcVisionError(f"cannot read image {path}: {reason}") from None


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
        raise MlcVisionError(
            f"image arrays must be uint8 HxW, HxWx3 or HxWx4 (channels last); got {array.dtype} {array.shape}"
        )
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)


def to_rgb(image: Image.Image) -> np.ndarray:
    """transformers' ``convert_to_rgb``: transparency is composited over white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"))


def expand2square(rgb: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """LLaVA's ``expand2square``: pad the shorter side, image centered (offset rounded down)."""
    height, width = rgb.shape[:2]
    side = max(height, width)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = background
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = rgb
    return out


# ---- geometry -----------------------------------------------------------------


def output_size(height: int, width: int, pre: Preprocess) -> tuple[int, int]:
    """Size after resizing, as transformers computes it (the long side is truncated, not rounded)."""
    if pre.resize == "exact":
        return pre.size, pre.size
    if width <= height:
        return int(pre.size * height / width), pre.size
    return pre.size, int(pre.size * width / height)


def center_crop(rgb: np.ndarray, crop: int, backend: str) -> np.ndarray:
    """Crop ``crop`` x ``crop`` at the center; a side shorter than that is zero-padded first.

    The padding offset is the one thing the backends do differently here:
    torchvision rounds the top/left padding down, transformers' numpy crop up.
    """
    height, width = rgb.shape[:2]
    if crop > height or crop > width:
        extra = 1 if backend == "pil" else 0
        pad_h, pad_w = max(crop - height, 0), max(crop - width, 0)
        top, left = (pad_h + extra) // 2, (pad_w + extra) // 2
        rgb = np.pad(rgb, ((top, pad_h - top), (left, pad_w - left), (0, 0)))
        height, width = rgb.shape[:2]
    top, left = (height - crop) // 2, (width - crop) // 2
    return rgb[top : top + crop, left : left + crop]


def normalize(rgb: np.ndarray, pre: Preprocess, backend: str) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32, in each backend's float32 operation order."""
    chw = rgb.transpose(2, 0, 1)
    mean = np.asarray(pre.mean, np.float32)[:, None, None]
    std = np.asarray(pre.std, np.float32)[:, None, None]
    if backend == "torchvision":
        # mean and std are scaled by 1/rescale_factor in float32; pixels are not rescaled.
        scale = np.float32(1.0 / pre.rescale_factor)
        return (chw.astype(np.float32) - mean * scale) / (std * scale)
    rescaled = (chw.astype(np.float64) * pre.rescale_factor).astype(np.float32)
    return (rescaled - mean) / std


# ---- resizing -------------------------------------------------------------------


def resize(rgb: np.ndarray, size: tuple[int, int], resample: str, backend: str) -> np.ndarray:
    """HxWx3 uint8 -> ``size`` (height, width) HxWx3 uint8, antialiased when shrinking."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    if backend == "pil":
        pil = Image.fromarray(rgb).resize((size[1], size[0]), resample=_PIL_FILTERS[resample])
        return np.asarray(pil)
    return _resize_torch(rgb, size, resample)


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic with a = -0.5 (Pillow's), written as ATen writes it."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


# name -> (filter, interp_size): the filter's support is interp_size / 2 input pixels.
_FILTERS = {"bicubic": (_bicubic, 4), "bilinear": (_triangle, 2)}
_PIL_FILTERS = {name: getattr(Image.Resampling, name.upper()) for name in RESAMPLE_FILTERS}


def _int16_weights(in_size: int, out_size: int, resample: str) -> tuple[np.ndarray, np.ndarray, int]:
    """ATen's antialiased weights for uint8 (``_compute_index_ranges_int16_weights``).

    Returns (first input index [out], int weights [out, taps], precision bits).
    Weights are computed in float64 like Pillow, normalized to sum 1, then
    scaled by 2**precision and rounded half away from zero; the precision is
    the largest that keeps the biggest weight below 2**15.
    """
    filter_fn, interp_size = _FILTERS[resample]
    scale = in_size / out_size
    support = interp_size * 0.5 * scale if scale >= 1.0 else interp_size * 0.5
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(math.ceil(support)) * 2 + 1
    center = scale * (np.arange(out_size) + 0.5)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C++ casts truncate toward zero
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    offsets = np.arange(taps)
    x = ((offsets[None, :] + first[:, None]) - center[:, None] + 0.5) * invscale
    weights = np.where(offsets[None, :] < count[:, None], filter_fn(x), 0.0)
    total = np.zeros(out_size)
    for j in range(taps):  # sequential sum, as in C++
        total += weights[:, j]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    w_max = weights.max()
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    ints = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    return first, ints, precision


def _resize_axis(image: np.ndarray, out_size: int, axis: int, resample: str, keep: slice) -> np.ndarray:
    """One separable pass along ``axis`` (0: rows, 1: columns) in ATen's integer arithmetic.

    Only the outputs ``keep`` are computed.
    """
    in_size = image.shape[axis]
    if in_size == out_size:
        return image[(slice(None),) * axis + (keep,)]
    first, weights, precision = _int16_weights(in_size, out_size, resample)
    first, weights = first[keep], weights[keep]
    shape = [1, 1, 1]
    shape[axis] = len(first)
    acc = np.full(image.shape[:axis] + (len(first),) + image.shape[axis + 1 :], 1 << (precision - 1), np.int32)
    for j in range(weights.shape[1]):
        index = np.minimum(first + j, in_size - 1)  # padding taps have weight 0
        acc += np.take(image, index, axis=axis).astype(np.int32) * weights[:, j].reshape(shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def _resize_torch(
    rgb: np.ndarray, size: tuple[int, int], resample: str, rows: slice = slice(None), cols: slice = slice(None)
) -> np.ndarray:
    """torchvision's CPU resize of a uint8 image: horizontal pass, clamp to uint8, vertical pass.

    ``rows`` and ``cols`` select the part of the output to compute (a crop).
    """
    return _resize_axis(_resize_axis(rgb, size[1], 1, resample, cols), size[0], 0, resample, rows)


# ---- configs ----------------------------------------------------------------------
