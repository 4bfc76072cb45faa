"""VisionEncoder: a compiled library + its params dir, called on images.

It mirrors what LLaVA's ``CLIPVisionTower`` offers (``hidden_size``,
``num_patches``, ``image_size``, ``dtype``, ``device``, ``dummy_feature``), so a
Python chat runtime can swap it in. Everything it needs to know about the
library comes from the library's own ``_metadata()``.
"""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine  # not tvm.relax: the runtime must load without TVM's compiler library

from ..errors import MlcVisionError
from ..weights.integrity import check_params_files
from ..weights.params import load_params, read_params
from ..cpu_features import check_cpu_library
from .libcheck import check_library_file
from .preprocess import preprocess

RUNNABLE_SUFFIXES = (".so", ".dylib", ".dll")

#: Device kinds ``--device`` takes (``kind`` or ``kind:index``).
DEVICE_KINDS = ("cpu", "cuda", "rocm", "metal", "vulkan", "opencl", "webgpu")

#: Config fields a library and its params may disagree on: what to return
#: (layer, feature, final norm), the input (size, preprocessing) and names.
#: Position-embedding sizes and optional heads are covered by the shape check
#: of every parameter; the projector's fields are compared when the library has one.
SELECTION_FIELDS = frozenset(
    {"select_layer", "feature", "post_norm_tokens", "image_size", "checkpoint_image_size", "preprocess", "preset",
     "projection_dim", "use_head"}
)
PROJECTOR_FIELDS = frozenset({"projector", "projector_hidden_size", "downsample_ratio"})


def parse_device(device: str) -> tvm.runtime.Device:
    """``cpu``, ``cuda``, ``cuda:1``, ``metal``, ``vulkan``, ``opencl`` -> a TVM device."""
    kind, _, index = str(device).partition(":")
    if kind not in DEVICE_KINDS:
        raise MlcVisionError(f"unknown device {device!r}; use one of {', '.join(DEVICE_KINDS)} (optionally :index)")
    if index and not index.isdigit():
        raise MlcVisionError(f"device index in {device!r} must be a non-negative integer")
    if kind == "cpu" and int(index or 0) != 0:
        raise MlcVisionError(f"device {device!r} does not exist: the CPU is one device, cpu (or cpu:0)")
    dev = tvm.device(kind, int(index or 0))
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
    check_library_file(lib)  # a truncated or foreign file would crash dlopen
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


def architecture_difference(lib_config: dict, params_config: dict) -> str | None:
    """The first field (sorted) on which the two configs describe different weights, as text; None if none."""
    skip = SELECTION_FIELDS | (PROJECTOR_FIELDS if not lib_config.get("projector") else frozenset())
    for field in sorted((set(lib_config) | set(params_config)) - skip):
        if lib_config.get(field) != params_config.get(field):
            return f"{field} is {params_config.get(field)!r} in the params but {lib_config.get(field)!r} in the library"
    return None


def check_params_match(metadata: dict, params_dir: Path) -> None:
    """Refuse params made for another model or dtype, naming the field (names and shapes: load_params)."""
    records, params_meta = read_params(params_dir)
    ours = params_meta.get("mlc_vision") if isinstance(params_meta, dict) else None
    if not isinstance(ours, dict) or not isinstance(ours.get("config"), dict):
        raise MlcVisionError(
            f"params {params_dir} have no mlc_vision metadata in tensor-cache.json, so nothing says which model "
            "they are for; make them with mlc-vision convert"
        )
    _check_records(metadata["params"], records, params_dir)
    if ours.get("family") != metadata["family"]:
        raise MlcVisionError(f"params {params_dir} are for family {ours.get('family')!r} but the library is {metadata['family']!r}")
    difference = architecture_difference(metadata["config"], ours["config"])
    if difference:
        raise MlcVisionError(f"params {params_dir} do not match the library: {difference}")


def _check_records(specs: list[dict], records: dict, params_dir: Path) -> None:
    """Every parameter the library takes is in the params dir with its shape and dtype (no data read)."""
    for spec in specs:
        record = records.get(spec["name"])
        if record is None:
            raise MlcVisionError(f"params dir {params_dir} has no parameter {spec['name']!r}")
        if record.shape != tuple(spec["shape"]):
            raise MlcVisionError(
                f"parameter {spec['name']!r}: params dir has shape {list(record.shape)}, expected {list(spec['shape'])}"
            )
        if record.dtype != spec["dtype"]:
            raise MlcVisionError(
                f"dtype mismatch: params {params_dir} hold {record.dtype} ({spec['name']!r}) but the library was "
                f"compiled for {spec['dtype']}; convert with --dtype {spec['dtype']}"
            )


def warn_if_not_finite(pixel_values: np.ndarray) -> None:
    """NaN or Inf inputs give NaN features; say so instead of passing them silently."""
    if pixel_values.dtype.kind == "f" and not np.isfinite(pixel_values).all():
        bad = int(np.size(pixel_values) - np.isfinite(pixel_values).sum())
        warnings.warn(f"pixel values hold {bad} NaN or Inf value(s); the features will not be meaningful", stacklevel=3)


class VisionEncoder:
    """Images (or preprocessed pixel arrays) -> features, with a compiled mlc-vision library."""

    def __init__(self, lib: str | Path, params: str | Path, device: str = "cpu", verify: bool = False):
        """Load ``lib`` and ``params`` on ``device``; ``verify`` checks the params' checksums first.

        Shard sizes are always checked; with ``verify`` every byte is hashed
        (see ``weights/integrity.py``). The encoder may be called from several
        threads: each gets its own VM over the same library and params.
        """
        self.lib_path = Path(lib)
        self.params_dir = Path(params)
        self._device_name = str(device)
        self.tvm_device = parse_device(device)
        self._module = load_library(self.lib_path)
        self._vm = VirtualMachine(self._module, self.tvm_device)
        self._thread = threading.local()  # each calling thread's own VM (see _thread_vm)
        self._thread.vm = self._vm
        self._new_vm_lock = threading.Lock()
        self.metadata = read_metadata(self._vm, self.lib_path)
        check_cpu_library(self.metadata, self.lib_path)  # before any of its code runs
        check_params_match(self.metadata, self.params_dir)
        check_params_files(self.params_dir, verify=verify)
        self._params = load_params(self.params_dir, self.metadata["params"], self.tvm_device)

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
        from ..config import Preprocess

        return preprocess(images, Preprocess.from_dict(self.metadata["preprocess"]))

    def encode_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """``[batch, 3, H, W]`` normalized pixels -> ``[batch, tokens, width]``."""
        expected = (self.metadata["config"]["num_channels"], self.image_size, self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise MlcVisionError(
                f"pixel_values has shape {list(pixel_values.shape)}; the library takes [batch, {', '.join(map(str, expected))}]"
            )
        warn_if_not_finite(pixel_values)
        array = np.ascontiguousarray(pixel_values.astype(_numpy_dtype(self.dtype)))
        return self._call("encode", array)

    def encode_rgb8(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``[batch, H, W, 3]`` (already resized/cropped) -> features; normalization runs in the library."""
        expected = (self.image_size, self.image_size, 3)
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise MlcVisionError(
                f"encode_rgb8 takes uint8 [batch, {self.image_size}, {self.image_size}, 3], "
                f"got {pixels.dtype} {list(pixels.shape)}"
            )
        return self._call("encode_rgb8", np.ascontiguousarray(pixels))

    def _thread_vm(self) -> VirtualMachine:
        """This thread's VM over the shared library and params, made on its first call.

        A Relax VM keeps per-call state (registers, frames), so threads must
        not share one; one VM per thread measured faster than a lock around
        one VM (docs/reliability.md, "Threads"). Each VM holds its own
        activations; the params are shared.
        """
        vm = getattr(self._thread, "vm", None)
        if vm is None:
            with self._new_vm_lock:
                vm = self._thread.vm = VirtualMachine(self._module, self.tvm_device)
        return vm

    def _call(self, function: str, array: np.ndarray) -> np.ndarray:
        tensor = tvm.runtime.tensor(array, self.tvm_device)
        return self._thread_vm()[function](tensor, self._params).numpy()

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
