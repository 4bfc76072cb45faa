"""VisionEncoder: a compiled library + its params dir, called on images.

It mirrors what LLaVA's ``CLIPVisionTower`` offers (``hidden_size``,
``num_patches``, ``image_size``, ``dtype``, ``device``, ``dummy_feature``), so a
Python chat runtime can swap it in. Everything it needs to know about the
library comes from the library's own ``_metadata()``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine  # not tvm.relax: the runtime must load without TVM's compiler library

from ..config import Preprocess, check_tile_range
from ..errors import MlcVisionError
from ..weights.params import load_params, read_params
from ..cpu_features import check_cpu_library
from .preprocess import load_rgb, normalize, preprocess
from .tiling import Grid, anyres_tiles, internvl_tiles, pack_anyres

RUNNABLE_SUFFIXES = (".so", ".dylib", ".dll")


def parse_device(device: str) -> tvm.runtime.Device:
    """``cpu``, ``cuda``, ``cuda:1``, ``metal``, ``vulkan``, ``opencl`` -> a TVM device."""
    kind, _, index = str(device).partition(":")
    try:
        dev = tvm.device(kind, int(index or 0))
    except (ValueError, tvm.TVMError) as err:
        raise MlcVisionError(f"unknown device {device!r}: {err}") from None
    if not dev.exist:
        raise MlcVisionError(f"device {device!r} is not available on this machine")
    return dev


def load_library(lib: str | Path) -> tvm.runtime.Module:
    lib = Path(lib)
    if not lib.is_file():
        raise MlcVisionError(f"library {lib} does not exist")
    if lib.suffix not in RUNNABLE_SUFFIXES:
        raise MlcVisionError(
            f"library {lib} is a {lib.suffix or 'suffix-less'} file: only {', '.join(RUNNABLE_SUFFIXES)} "
            "libraries load in this process (a Metal .tar is linked into an app on macOS/iOS)"
        )
    try:
        return tvm.runtime.load_module(str(lib))
    except Exception as err:  # TVM raises its own error types
        raise MlcVisionError(f"cannot load library {lib}: {str(err).splitlines()[0]}") from None


def read_metadata(vm: VirtualMachine, lib: Path) -> dict:
    """The library's own ``_metadata()`` JSON (a function of its Relax VM)."""
    try:
        return json.loads(vm["_metadata"]())
    except Exception:
        raise MlcVisionError(f"library {lib} has no mlc-vision _metadata(); was it built by mlc-vision compile?") from None


def check_params_match(metadata: dict, params_dir: Path) -> None:
    """Refuse params made for another family or dtype, saying which (names and shapes: load_params)."""
    records, params_meta = read_params(params_dir)
    family = (params_meta or {}).get("mlc_vision", {}).get("family")
    if family and family != metadata["family"]:
        raise MlcVisionError(f"params {params_dir} are for family {family!r} but the library is {metadata['family']!r}")
    for spec in metadata["params"]:
        record = records.get(spec["name"])
        if record is not None and record.dtype != spec["dtype"]:
            raise MlcVisionError(
                f"dtype mismatch: params {params_dir} hold {record.dtype} ({spec['name']!r}) but the library was "
                f"compiled for {spec['dtype']}; convert with --dtype {spec['dtype']}"
            )


@dataclass(frozen=True)
class TiledFeatures:
    """The features of one tiled image.

    ``features``: ``[tiles, tokens, width]`` in the library's tile order
    (InternVL: the grid row-major, then the thumbnail; anyres: the base image,
    then the grid row-major). ``packed``: anyres only, the sequence the
    language model consumes ``[tokens, width]`` (unpadded, ``image_newline``
    after every row, base image first); None for InternVL, whose LLM reads the
    tiles' tokens in order.
    """

    features: np.ndarray
    grid: Grid
    thumbnail: bool = False
    base: bool = False
    packed: np.ndarray | None = None


class VisionEncoder:
    """Images (or preprocessed pixel arrays) -> features, with a compiled mlc-vision library."""

    def __init__(self, lib: str | Path, params: str | Path, device: str = "cpu"):
        self.lib_path = Path(lib)
        self.params_dir = Path(params)
        self._device_name = str(device)
        self.tvm_device = parse_device(device)
        self._vm = VirtualMachine(load_library(self.lib_path), self.tvm_device)
        self.metadata = read_metadata(self._vm, self.lib_path)
        check_cpu_library(self.metadata, self.lib_path)  # before any of its code runs
        check_params_match(self.metadata, self.params_dir)
        self._params = load_params(self.params_dir, self.metadata["params"], self.tvm_device)
        self._newline = None  # read on first use (anyres packing)

    # ---- what LLaVA's CLIPVisionTower exposes ------------------------------------
    @property
    def config(self) -> dict:
        return self.metadata["config"]

    @property
    def dtype(self) -> str:
        return self.metadata["dtype"]

    @property
    def device(self) -> str:
        return self._device_name

    @property
    def hidden_size(self) -> int:
        """Width of each output feature (the projector's width when one is compiled in)."""
        return self.metadata["output_width"]

    @property
    def image_size(self) -> int:
        return self.metadata["image_size"]

    @property
    def tokens(self) -> dict:
        """The library's token layout (prefix tokens, patch grid, merge, output count)."""
        return self.metadata["tokens"]

    @property
    def num_patches_per_side(self) -> int:
        """Patches per side of the square grid (LLaVA's name; a non-square grid has no one side)."""
        rows, cols = self.tokens["grid"]
        if rows != cols:
            raise MlcVisionError(f"the patch grid is {rows}x{cols}, not square: read tokens['grid']")
        return rows

    @property
    def num_patches(self) -> int:
        """Tokens per image in the output (576 for LLaVA-1.5's CLIP-L/336)."""
        return self.tokens["output"]

    @property
    def dummy_feature(self) -> np.ndarray:
        return np.zeros((1, self.hidden_size), dtype=np.float32)

    # ---- calling -----------------------------------------------------------------
    def preprocess(self, images) -> np.ndarray:
        return preprocess(images, self._preprocess_config())

    def encode_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """``[batch, 3, H, W]`` normalized pixels -> ``[batch, tokens, width]``."""
        expected = (self.metadata["config"]["num_channels"], self.image_size, self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise MlcVisionError(
                f"pixel_values has shape {list(pixel_values.shape)}; the library takes [batch, {', '.join(map(str, expected))}]"
            )
        array = np.ascontiguousarray(pixel_values.astype(_numpy_dtype(self.dtype)))
        out = self._vm["encode"](tvm.runtime.tensor(array, self.tvm_device), self._params)
        return out.numpy()

    def encode_rgb8(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``[batch, H, W, 3]`` (already resized/cropped) -> features; normalization runs in the library."""
        expected = (self.image_size, self.image_size, 3)
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise MlcVisionError(
                f"encode_rgb8 takes uint8 [batch, {self.image_size}, {self.image_size}, 3], "
                f"got {pixels.dtype} {list(pixels.shape)}"
            )
        out = self._vm["encode_rgb8"](tvm.runtime.tensor(np.ascontiguousarray(pixels), self.tvm_device), self._params)
        return out.numpy()

    @property
    def tiling(self) -> dict | None:
        """The library's tiling contract (``metadata["tiling"]``), None for one input per image."""
        return self.metadata.get("tiling")

    def encode_tiles(
        self,
        images,
        *,
        max_tiles: int | None = None,
        min_tiles: int | None = None,
        thumbnail: bool | None = None,
        grid: tuple[int, int] | None = None,
    ) -> TiledFeatures | list[TiledFeatures]:
        """Images of any size -> tiles (the library's tiling contract) -> features per image, with the grid.

        InternVL dynamic tiles: ``max_tiles``, ``min_tiles`` and ``thumbnail``
        default to the library's (the checkpoint's ``max_dynamic_patch`` /
        ``min_dynamic_patch`` / ``use_thumbnail``). LLaVA-NeXT anyres: the grid
        is one of the library's pinpoints and the result is packed as well.
        ``grid`` ``(rows, cols)`` skips the grid choice (it must be one the
        library allows). One image gives one :class:`TiledFeatures`, a list a list.
        """
        tiling = self._tiling_contract()
        chosen = None if grid is None else Grid(*grid)
        if tiling["mode"] == "internvl":
            cut = self._internvl_cutter(tiling, min_tiles, max_tiles, thumbnail, chosen)
        else:
            if any(v is not None for v in (min_tiles, max_tiles, thumbnail)):
                raise MlcVisionError(
                    "min/max tiles and the thumbnail are InternVL options; this library tiles with anyres pinpoints"
                )
            pinpoints = [tuple(p) for p in tiling["grid_pinpoints"]]
            cut = lambda rgb: anyres_tiles(rgb, self.image_size, self._pre, pinpoints, grid=chosen)  # noqa: E731
        single = not isinstance(images, (list, tuple))
        results = [self._encode_tiled(load_rgb(image), cut) for image in ([images] if single else images)]
        return results[0] if single else results

    def _internvl_cutter(self, tiling: dict, min_tiles, max_tiles, thumbnail, grid):
        min_tiles = tiling["min_tiles"] if min_tiles is None else int(min_tiles)
        max_tiles = tiling["max_tiles"] if max_tiles is None else int(max_tiles)
        thumbnail = tiling["thumbnail"] if thumbnail is None else bool(thumbnail)
        check_tile_range(min_tiles, max_tiles)
        return lambda rgb: internvl_tiles(
            rgb, self.image_size, self._pre, min_tiles=min_tiles, max_tiles=max_tiles, thumbnail=thumbnail, grid=grid
        )

    def _encode_tiled(self, rgb: np.ndarray, cut) -> TiledFeatures:
        tiled = cut(rgb)
        pixels = np.stack([normalize(tile, self._pre, self._pre.backend) for tile in tiled.tiles])
        features = self.encode_pixels(pixels)
        packed = None
        if tiled.base and self._image_newline is not None:
            packed = pack_anyres(
                features, tiled.grid, rgb.shape[:2], self._image_newline, self.tiling.get("anyres_max")
            )
        return TiledFeatures(features, tiled.grid, tiled.thumbnail, tiled.base, packed)

    def _tiling_contract(self) -> dict:
        tiling = self.tiling
        if tiling is None:
            raise MlcVisionError(
                f"library {self.lib_path} ({self.metadata['family']}) has no tiling contract; "
                "compile it from a checkpoint or preset that records one (InternVL-chat, LLaVA-NeXT, InternViT)"
            )
        return tiling

    @property
    def _pre(self):
        return self._preprocess_config()

    @property
    def _image_newline(self) -> np.ndarray | None:
        """LLaVA-NeXT's row separator from the params dir (None when the library has none)."""
        spec = (self.tiling or {}).get("image_newline")
        if spec is None:
            return None
        if self._newline is None:
            records, _ = read_params(self.params_dir)
            if spec["param"] not in records:
                raise MlcVisionError(f"params {self.params_dir} have no {spec['param']!r}, which the library's packing needs")
            self._newline = records[spec["param"]].read().astype(np.float32)
        return self._newline

    def _preprocess_config(self) -> Preprocess:
        return Preprocess.from_dict(self.metadata["preprocess"])

    def __call__(self, images) -> np.ndarray:
        """A PIL image, a path, a list of them (any sizes), or a float ``[batch,3,H,W]`` array."""
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            return self.encode_pixels(images)
        return self.encode_pixels(self.preprocess(images))

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"VisionEncoder({m['family']}, preset={m['preset']}, {m['image_size']}px -> "
            f"[batch, {m['num_tokens']}, {m['output_width']}] {m['dtype']} on {self.device})"
        )


def _numpy_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)
