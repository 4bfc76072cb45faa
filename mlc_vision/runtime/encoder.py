"""VisionEncoder: a compiled library + its params dir, called on images.

It mirrors what LLaVA's ``CLIPVisionTower`` offers (``hidden_size``,
``num_patches``, ``image_size``, ``dtype``, ``device``, ``dummy_feature``), so a
Python chat runtime can swap it in. Everything it needs to know about the
library comes from the library's own ``_metadata()``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine  # not tvm.relax: the runtime must load without TVM's compiler library

from ..errors import MlcVisionError
from ..weights.params import load_params, read_params
from ..cpu_features import check_cpu_library
from .preprocess import preprocess

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


class VisionEncoder:
    """Images (or preprocessed pixel arrays) -> features, with a compiled mlc-vision library.

    ``params`` may be left out (or ``load_params=False`` given): the encoder is
    then config-only, as LLaVA's ``CLIPVisionTower(delay_load=True)``, with the
    metadata, ``hidden_size``, ``num_patches`` and ``dummy_feature`` at hand; the
    params are loaded on the first call or by :meth:`load_params` (with a params
    dir given then, if none was given here).
    """

    def __init__(self, lib: str | Path, params: str | Path | None = None, device: str = "cpu", load_params: bool = True):
        self.lib_path = Path(lib)
        self.params_dir = Path(params) if params is not None else None
        self._device_name = str(device)
        self.tvm_device = parse_device(device)
        self._vm = VirtualMachine(load_library(self.lib_path), self.tvm_device)
        self.metadata = read_metadata(self._vm, self.lib_path)
        check_cpu_library(self.metadata, self.lib_path)  # before any of its code runs
        if "encode" not in self.metadata.get("entries", {"encode": None}):
            raise MlcVisionError(
                f"library {self.lib_path} has no image entry (compiled with --part text); "
                "compile with --part vision or both"
            )
        self._params = None
        if load_params and self.params_dir is not None:
            self.load_params()

    @property
    def is_loaded(self) -> bool:
        return self._params is not None

    def load_params(self, params: str | Path | None = None) -> None:
        """Load (or reload from ``params``) the weights; checked against the library first."""
        if params is not None:
            self.params_dir = Path(params)
        if self.params_dir is None:
            raise MlcVisionError(f"no params dir for {self.lib_path}: pass params to VisionEncoder or load_params()")
        check_params_match(self.metadata, self.params_dir)
        self._params = load_params(self.params_dir, self.metadata["params"], self.tvm_device)

    def _loaded_params(self):
        if self._params is None:
            self.load_params()
        return self._params

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
        """``zeros(1, hidden_size)`` in the library's dtype (LLaVA's placeholder for text-only batches)."""
        return np.zeros((1, self.hidden_size), dtype=_numpy_dtype(self.dtype))

    # ---- calling -----------------------------------------------------------------
    def preprocess(self, images) -> np.ndarray:
        from ..config import Preprocess

        return preprocess(images, Preprocess.from_dict(self.metadata["preprocess"]))

    def encode_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """``[batch, 3, H, W]`` normalized pixels -> ``[batch, tokens, width]``."""
        expected = (self.metadata["config"]["num_channels"], self.image_size, self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise MlcVisionError(
                f"pixel_values has shape {list(pixel_values.shape)}; the library takes [batch, {', '.join(map(str, expected))}]"
            )
        array = np.ascontiguousarray(pixel_values.astype(_numpy_dtype(self.dtype)))
        out = self._vm["encode"](tvm.runtime.tensor(array, self.tvm_device), self._loaded_params())
        return out.numpy()

    def encode_rgb8(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``[batch, H, W, 3]`` (already resized/cropped) -> features; normalization runs in the library."""
        expected = (self.image_size, self.image_size, 3)
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise MlcVisionError(
                f"encode_rgb8 takes uint8 [batch, {self.image_size}, {self.image_size}, 3], "
                f"got {pixels.dtype} {list(pixels.shape)}"
            )
        out = self._vm["encode_rgb8"](tvm.runtime.tensor(np.ascontiguousarray(pixels), self.tvm_device), self._loaded_params())
        return out.numpy()

    def __call__(self, images, match_input_dtype: bool = False):
        """Features of a PIL image, a path, a float ``[batch,3,H,W]`` array, or a list of those or of ``(3,H,W)`` arrays.

        Images (PIL, paths) of any sizes are preprocessed to the library's size
        and encoded as one batch. A list of float ``(C, H, W)`` arrays (already
        preprocessed, as LLaVA's tower takes them) is one batch when they share
        a shape, and otherwise is encoded array by array and returned as a
        list of ``[1, tokens, width]`` features, since their outputs may differ
        in shape. ``match_input_dtype`` returns features in the float dtype of
        the input arrays (LLaVA casts back to ``images.dtype``); images give
        float32.
        """
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            return _as_dtype(self.encode_pixels(images), images.dtype, match_input_dtype)
        if isinstance(images, (list, tuple)) and images and all(_is_chw(x) for x in images):
            return self._encode_chw_list(list(images), match_input_dtype)
        return self.encode_pixels(self.preprocess(images))

    def _encode_chw_list(self, arrays: list[np.ndarray], match_input_dtype: bool):
        if len({a.shape for a in arrays}) == 1 and len({a.dtype for a in arrays}) == 1:
            return _as_dtype(self.encode_pixels(np.stack(arrays)), arrays[0].dtype, match_input_dtype)
        return [_as_dtype(self.encode_pixels(a[None]), a.dtype, match_input_dtype) for a in arrays]

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"VisionEncoder({m['family']}, preset={m['preset']}, {m['image_size']}px -> "
            f"[batch, {m['num_tokens']}, {m['output_width']}] {m['dtype']} on {self.device})"
        )


def _is_chw(x) -> bool:
    return isinstance(x, np.ndarray) and x.ndim == 3 and x.dtype.kind == "f"


def _as_dtype(features: np.ndarray, input_dtype: np.dtype, match: bool) -> np.ndarray:
    return features.astype(input_dtype, copy=False) if match else features


def _numpy_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)
