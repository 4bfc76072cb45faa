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
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine  # not tvm.relax: the runtime must load without TVM's compiler library

from ..config import Preprocess, check_tile_range
from ..errors import MlcVisionError
from ..weights.integrity import check_params_files
from ..weights.params import NUMPY_DTYPES, load_params, read_params
from ..cpu_features import check_cpu_library
from .libcheck import check_library_file
from .memory import prepack_fits
from .native import NativeGeometry, attention_inputs, check_grid, preprocess_native
from .preprocess import load_rgb, normalize, preprocess
from .tiling import Grid, anyres_tiles, internvl_tiles, pack_anyres

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
    # The family first: params of another family miss names too, and the family says why.
    if ours.get("family") != metadata["family"]:
        raise MlcVisionError(f"params {params_dir} are for family {ours.get('family')!r} but the library is {metadata['family']!r}")
    _check_records(metadata["params"], records, params_dir)
    difference = architecture_difference(metadata["config"], ours["config"])
    if difference:
        raise MlcVisionError(f"params {params_dir} do not match the library: {difference}")


def prepacked_params(vm, metadata: dict, params):
    """``params`` as the library's entries are called with (:func:`entry_function`): packed once by the
    library's ``prepack_params`` where its metadata names one (fp32 CPU libraries: their linear layers
    then pack no weights per call), else as they are."""
    prepack = metadata.get("prepack")
    return vm[prepack["function"]](params) if prepack else params


class EntryParams(NamedTuple):
    """A library's loaded weights as its entries take them, and whether they are the packed ones
    (then the entries are the ``_prepacked`` twins, :func:`entry_function`)."""

    tensors: object
    packed: bool


def entry_params(vm, metadata: dict, params, prepack: bool = True) -> EntryParams:
    """``params`` as loaded, packed once (:func:`prepacked_params`) where ``prepack`` asks, the library
    packs its weights and a packed copy fits in the memory left (``memory.prepack_fits``, which
    warns where it does not)."""
    packed = prepack and prepack_fits(metadata)
    return EntryParams(prepacked_params(vm, metadata, params) if packed else params, packed)


def entry_function(metadata: dict, entry: str, prepacked: bool = True) -> str:
    """The library function that computes ``entry`` (``encode``, ``encode_rgb8``, ``hidden_states``) on
    the params of :func:`prepacked_params` (``prepacked``; else on the params as loaded)."""
    prepack = metadata.get("prepack")
    return prepack["entries"].get(entry, entry) if prepack and prepacked else entry


def param_names(metadata: dict) -> list[str]:
    """The library's parameter names in call order (shapes and dtypes: checked by ``check_params_match``)."""
    return [spec["name"] for spec in metadata["params"]]


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


class PerThreadVM:
    """One Relax VM per calling thread over one loaded library, made on the thread's first call.

    A Relax VM keeps per-call state (registers, frames), so threads must not
    share one; one VM per thread measured faster than a lock around one VM
    (docs/reliability.md, "Threads"). Each VM holds the activations of its
    own call; the params passed in are shared. ``vms["encode"]`` is the
    calling thread's function.
    """

    def __init__(self, module: tvm.runtime.Module, device: tvm.runtime.Device):
        self.module, self.device = module, device
        self.first = VirtualMachine(module, device)
        self._local = threading.local()
        self._local.vm = self.first
        self._new_vm = threading.Lock()

    def get(self) -> VirtualMachine:
        vm = getattr(self._local, "vm", None)
        if vm is None:
            with self._new_vm:
                vm = self._local.vm = VirtualMachine(self.module, self.device)
        return vm

    def __getitem__(self, function: str):
        return self.get()[function]


def warn_if_not_finite(pixel_values: np.ndarray) -> None:
    """NaN or Inf inputs give NaN features; say so instead of passing them silently."""
    if pixel_values.dtype.kind == "f" and not np.isfinite(pixel_values).all():
        bad = int(np.size(pixel_values) - np.isfinite(pixel_values).sum())
        warnings.warn(f"pixel values hold {bad} NaN or Inf value(s); the features will not be meaningful", stacklevel=3)


class FeaturesAndQueries(NamedTuple):
    """InternVL-14B's two outputs, in the order its LLaVA tower returns them (``[features, query_outputs]``).

    ``features``: ``[batch, tokens, width]``, the tower's selected hidden state;
    ``query_outputs``: ``[batch, num_query_tokens, qllama width]``, QLLaMA's
    last hidden state. It unpacks and indexes like the tower's list.
    """

    features: np.ndarray
    query_outputs: np.ndarray


#: ``entries.encode.outputs`` names -> the Python type of a library's several outputs.
OUTPUT_TUPLES = {("features", "query_outputs"): FeaturesAndQueries}


def encode_output_names(metadata: dict) -> tuple[str, ...]:
    """The names of what ``encode`` returns (libraries that predate ``outputs`` return the features only)."""
    outputs = metadata.get("entries", {}).get("encode", {}).get("outputs")
    return tuple(o["name"] for o in outputs) if outputs else ("features",)


def _to_numpy(result, names: tuple[str, ...]):
    """One tensor -> an array; a tuple -> the named tuple of its outputs (arrays in the metadata's order)."""
    if isinstance(result, tvm.runtime.Tensor):
        return result.numpy()
    arrays = tuple(item.numpy() for item in result)
    if len(arrays) != len(names):
        raise MlcVisionError(f"the library returned {len(arrays)} outputs; its metadata lists {list(names)}")
    kind = OUTPUT_TUPLES.get(names)
    return kind(*arrays) if kind is not None else arrays


@dataclass(frozen=True)
class NativeFeatures:
    """The features of images encoded at their own resolution (Qwen2-VL / Qwen2.5-VL).

    ``features``: ``[tokens, width]``, the images' tokens one after the other
    (what the language model consumes); ``grid_thw``: ``(t, grid_h, grid_w)``
    per image in patches, as transformers' processor returns ``image_grid_thw``;
    image ``i`` has ``grid_h * grid_w / merge**2`` tokens (``tokens_per_image``).
    """

    features: np.ndarray
    grid_thw: tuple[tuple[int, int, int], ...]
    tokens_per_image: tuple[int, ...]

    def per_image(self) -> list[np.ndarray]:
        return np.split(self.features, np.cumsum(self.tokens_per_image)[:-1])


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
    """Images (or preprocessed pixel arrays) -> features, with a compiled mlc-vision library.

    ``params`` may be left out (or ``load_params=False`` given): the encoder is
    then config-only, as LLaVA's ``CLIPVisionTower(delay_load=True)``, with the
    metadata, ``hidden_size``, ``num_patches`` and ``dummy_feature`` at hand; the
    params are loaded on the first call or by :meth:`load_params` (with a params
    dir given then, if none was given here).

    Shard sizes are always checked; ``verify`` also hashes every byte (see
    ``weights/integrity.py``). The encoder may be called from several threads:
    each gets its own VM over the same library and params (docs/reliability.md,
    "Threads", says why).

    ``prepack``: an fp32 CPU library's weights are packed once, when they are
    loaded, into the layout its GEMM reads (``metadata["prepack"]``), instead of
    in every call; while they are packed its linear layers' weights are held
    twice, so where that would not fit in the memory left they are kept as
    loaded, with a warning (``runtime/memory.py``). ``prepack=False`` keeps them
    as loaded.
    """

    def __init__(
        self,
        lib: str | Path,
        params: str | Path | None = None,
        device: str = "cpu",
        load_params: bool = True,
        verify: bool = False,
        prepack: bool = True,
    ):
        self._verify = verify
        self._prepack = prepack
        self._newline = None  # read on first use (anyres packing)
        self.lib_path = Path(lib)
        self.params_dir = Path(params) if params is not None else None
        self._device_name = str(device)
        self.tvm_device = parse_device(device)
        self._vms = PerThreadVM(load_library(self.lib_path), self.tvm_device)
        self._vm = self._vms.first
        self._params_lock = threading.Lock()  # lazy params: loaded once, by the first caller
        self.metadata = read_metadata(self._vm, self.lib_path)
        check_cpu_library(self.metadata, self.lib_path)  # before any of its code runs
        if "encode" not in self.metadata.get("entries", {"encode": None}):
            raise MlcVisionError(
                f"library {self.lib_path} has no image entry (compiled with --part text); "
                "compile with --part vision or both"
            )
        self._pre = Preprocess.from_dict(self.metadata["preprocess"])  # read once: tiling normalizes per tile
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
        check_params_files(self.params_dir, verify=self._verify)
        params = load_params(self.params_dir, param_names(self.metadata), self.tvm_device)
        self._params = entry_params(self._vm, self.metadata, params, self._prepack)
        self._newline = None

    def _loaded_params(self):
        if self._params is None:
            with self._params_lock:
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
        self._fixed_size_only("image_size")
        return self.metadata["image_size"]

    @property
    def tokens(self) -> dict:
        """The library's token layout (prefix tokens, patch grid, merge, output count)."""
        self._fixed_size_only("tokens")
        return self.metadata["tokens"]

    def _fixed_size_only(self, what: str) -> None:
        if self.metadata.get("native_resolution") is not None:
            raise MlcVisionError(
                f"{what}: library {self.lib_path} encodes images at their own size; the tokens of each image "
                "come with its grid_thw (encode_native)"
            )

    @property
    def num_patches_per_side(self) -> int:
        """Patches per side of the square grid (LLaVA's name; a non-square grid has no one side)."""
        rows, cols = self.tokens["grid"]
        if rows != cols:
            raise MlcVisionError(f"the patch grid is {rows}x{cols}, not square: read tokens['grid']")
        return rows

    @property
    def num_patches(self) -> int:
        """Tokens per image in the output (576 for LLaVA-1.5's CLIP-L/336).

        With several outputs, their tokens together, as InternVL's LLaVA tower
        counts InternVL-14B's (patches + 96 query tokens).
        """
        outputs = self.metadata["entries"]["encode"].get("outputs")
        if not outputs:
            return self.tokens["output"]
        return sum(int(o["shape"][1]) for o in outputs)

    @property
    def dummy_feature(self) -> np.ndarray:
        """``zeros(1, hidden_size)`` in the library's dtype (LLaVA's placeholder for text-only batches)."""
        return np.zeros((1, self.hidden_size), dtype=NUMPY_DTYPES[self.dtype])

    # ---- calling -----------------------------------------------------------------
    def preprocess(self, images) -> np.ndarray:
        return preprocess(images, self._pre)

    def encode_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """``[batch, 3, H, W]`` normalized pixels -> ``[batch, tokens, width]``."""
        expected = (self.metadata["config"]["num_channels"], self.image_size, self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise MlcVisionError(
                f"pixel_values has shape {list(pixel_values.shape)}; the library takes [batch, {', '.join(map(str, expected))}]"
            )
        warn_if_not_finite(pixel_values)
        array = np.ascontiguousarray(pixel_values.astype(NUMPY_DTYPES[self.dtype]))
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

    def _call(self, function: str, *arrays: np.ndarray):
        """The entry's result as numpy: one array, or (several outputs) their tuple, see :data:`OUTPUT_TUPLES`."""
        params = self._loaded_params()
        tensors = [tvm.runtime.tensor(array, self.tvm_device) for array in arrays]
        entry = entry_function(self.metadata, function, params.packed)
        return _to_numpy(self._vms[entry](*tensors, params.tensors), self.output_names)

    @property
    def output_names(self) -> tuple[str, ...]:
        """What ``encode`` returns, in order: ``("features",)``, or InternVL-14B's ``("features", "query_outputs")``."""
        return encode_output_names(self.metadata)

    # ---- native resolution (Qwen2-VL / Qwen2.5-VL) ----------------------------------
    @property
    def native_resolution(self) -> dict | None:
        """The native-resolution contract (``metadata["native_resolution"]``), None for fixed-size libraries."""
        return self.metadata.get("native_resolution")

    def _native_geometry(self) -> NativeGeometry:
        native = self.native_resolution
        if native is None:
            raise MlcVisionError(
                f"library {self.lib_path} ({self.metadata['family']}) takes fixed-size images, not patches at native resolution"
            )
        return NativeGeometry.from_metadata(native)

    def encode_native(self, images) -> NativeFeatures:
        """Images of any sizes (one call; each attends only within itself) -> their tokens and ``grid_thw``.

        Each image is resized as ``Qwen2VLImageProcessor`` does (``smart_resize``:
        sides multiples of patch x merge, area within the library's
        ``min_pixels`` / ``max_pixels``; a larger image is resized down).
        """
        patches, grids = preprocess_native(images, self._pre, self._native_geometry())
        return self.encode_patches(np.concatenate(patches), grids)

    def encode_patches(self, patches: np.ndarray, grid_thw) -> NativeFeatures:
        """Flattened normalized patches ``[n, C*t*p*p]`` (the processor's ``pixel_values``) and their ``grid_thw``."""
        geometry = self._native_geometry()
        grids = tuple(tuple(int(v) for v in g) for g in grid_thw)
        for _, grid_h, grid_w in grids:
            check_grid(grid_h, grid_w, geometry.merge_size)
        width = self.native_resolution["inputs"][0]["shape"][1]
        count = sum(t * h * w for t, h, w in grids)
        if patches.ndim != 2 or patches.shape != (count, width):
            raise MlcVisionError(f"patches have shape {list(patches.shape)}; grid_thw {list(grids)} needs [{count}, {width}]")
        warn_if_not_finite(patches)
        arrays = {"patches": np.ascontiguousarray(patches.astype(NUMPY_DTYPES[self.dtype])),
                  **attention_inputs(grids, geometry)}  # fmt: skip
        ordered = [arrays[spec["name"]] for spec in self.native_resolution["inputs"]]
        group = geometry.merge_size**2
        features = self._call("encode", *ordered)
        return NativeFeatures(features, grids, tuple(t * h * w // group for t, h, w in grids))

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
        if self.native_resolution is not None:
            return self.encode_native(images)
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
        if self.native_resolution is not None:
            return (
                f"VisionEncoder({m['family']}, preset={m['preset']}, native resolution -> "
                f"[tokens, {m['output_width']}] {m['dtype']} on {self.device})"
            )
        return (
            f"VisionEncoder({m['family']}, preset={m['preset']}, {m['image_size']}px -> "
            f"[batch, {m['num_tokens']}, {m['output_width']}] {m['dtype']} on {self.device})"
        )


def _is_chw(x) -> bool:
    return isinstance(x, np.ndarray) and x.ndim == 3 and x.dtype.kind == "f"


def _as_dtype(features, input_dtype: np.dtype, match: bool):
    """Cast the output (each of several outputs) back to the input's dtype when asked."""
    if not match:
        return features
    if isinstance(features, tuple):
        cast = [f.astype(input_dtype, copy=False) for f in features]
        return type(features)._make(cast) if hasattr(features, "_make") else tuple(cast)
    return features.astype(input_dtype, copy=False)
