"""The C++ loader in examples/cpp, linked only against the TVM runtime, gives
the same features as the Python runtime for the same library and params, and
its tiling (examples/cpp/tiling.h: grid choice, resize, cut, anyres packing)
gives the same tiles and features as the Python runtime's for the same images."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from mlc_vision.cli import main as cli_main
from mlc_vision.config import Preprocess
from mlc_vision.runtime.encoder import VisionEncoder
from mlc_vision.runtime.tiling import anyres_tiles, internvl_tiles, pack_anyres
from parity import assert_close, assert_fp32_close, randomize_all
from test_anyres import anyres_library, onevision, reference_model  # noqa: F401  (fixtures of the tiled tests)
from test_internvl14b import tiny, tiny_fp32  # noqa: F401  (InternVL-14B: a library with two outputs)
from test_tiling import image, tiled_tower  # noqa: F401

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cpp"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def cpp_encode(tmp_path_factory):
    if not shutil.which("make") or not shutil.which("c++"):
        pytest.skip("no C++ toolchain (make, c++) on this machine")
    build = tmp_path_factory.mktemp("cpp-build")
    proc = subprocess.run(
        ["make", "-C", str(EXAMPLE), f"PYTHON={sys.executable}", f"BUILD={build}"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return build / "encode"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpp-ckpt")
    model = randomize_all(CLIPVisionModel(CLIPVisionConfig(**TINY)), seed=0)
    model.save_pretrained(root)
    return model, root


def compile_and_convert(ckpt, root, dtype: str):
    """The tiny checkpoint compiled and converted through the CLI in ``dtype``."""
    lib, params = root / f"clip-{dtype}.so", root / f"params-{dtype}"
    assert cli_main(["compile", "--model", str(ckpt), "--target", "cpu", "--select-layer", "-2", "--dtype", dtype,
                     "-o", str(lib)]) == 0
    assert cli_main(["convert", "--model", str(ckpt), "--dtype", dtype, "-o", str(params)]) == 0
    return lib, params


@pytest.fixture(scope="module")
def library(checkpoint, tmp_path_factory):
    return compile_and_convert(checkpoint[1], tmp_path_factory.mktemp("cpp-lib"), "float32")


def run_cpp(binary: Path, lib: Path, params: Path, input_path: Path, out: Path, *extra: str) -> np.ndarray:
    proc = subprocess.run([str(binary), str(lib), str(params), str(input_path), str(out), *extra], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return np.load(out)


def test_cpp_matches_python_runtime(cpp_encode, library, tmp_path):
    lib, params = library
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype("float32")
    np.save(tmp_path / "pixels.npy", pixels)
    ours_cpp = run_cpp(cpp_encode, lib, params, tmp_path / "pixels.npy", tmp_path / "cpp.npy")
    ours_py = VisionEncoder(lib, params)(pixels)
    assert ours_cpp.shape == (3, 16, 64)
    np.testing.assert_array_equal(ours_cpp, ours_py)


def test_cpp_writes_both_outputs_of_internvl_14b(cpp_encode, tiny, tiny_fp32, tmp_path):
    """encode returns a tuple: the features go to OUT.npy, the query outputs to OUT.query_outputs.npy."""
    params = tiny[2]
    pixels = np.random.default_rng(6).standard_normal((2, 3, 56, 56)).astype("float32")
    np.save(tmp_path / "pixels.npy", pixels)
    features = run_cpp(cpp_encode, tiny_fp32.path, params, tmp_path / "pixels.npy", tmp_path / "cpp.npy")
    ours_py = VisionEncoder(tiny_fp32.path, params)(pixels)
    np.testing.assert_array_equal(features, ours_py.features)
    np.testing.assert_array_equal(np.load(tmp_path / "cpp.query_outputs.npy"), ours_py.query_outputs)


def test_cpp_reads_raw_float32(cpp_encode, library, tmp_path):
    lib, params = library
    pixels = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype("float32")
    pixels.tofile(tmp_path / "pixels.f32")
    ours_cpp = run_cpp(cpp_encode, lib, params, tmp_path / "pixels.f32", tmp_path / "cpp.npy")
    np.testing.assert_array_equal(ours_cpp, VisionEncoder(lib, params)(pixels))


def test_cpp_refuses_wrong_shape(cpp_encode, library, tmp_path):
    lib, params = library
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 31, 32), dtype="float32"))
    proc = subprocess.run([str(cpp_encode), str(lib), str(params), str(tmp_path / "bad.npy"), str(tmp_path / "o.npy")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "shape does not match" in proc.stderr
    assert not (tmp_path / "o.npy").exists()


def test_cpp_encode_rgb8_matches_python(cpp_encode, library, tmp_path):
    lib, params = library
    rgb = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "rgb.npy", rgb)
    ours_cpp = run_cpp(cpp_encode, lib, params, tmp_path / "rgb.npy", tmp_path / "cpp.npy", "--entry", "encode_rgb8")
    np.testing.assert_array_equal(ours_cpp, VisionEncoder(lib, params).encode_rgb8(rgb))


def test_cpp_runs_a_bf16_library(cpp_encode, checkpoint, tmp_path):
    """A bf16 CPU library (its GEMM is C code linked into the .so) loads and runs from C++ alone."""
    lib, params = compile_and_convert(checkpoint[1], tmp_path, "bfloat16")
    pixels = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype("float32")
    np.save(tmp_path / "pixels.npy", pixels)
    ours_cpp = run_cpp(cpp_encode, lib, params, tmp_path / "pixels.npy", tmp_path / "cpp.npy")
    ours_py = VisionEncoder(lib, params)(pixels)
    np.testing.assert_array_equal(ours_cpp, ours_py.view(np.uint16))  # the loader writes bf16 as raw uint16


def test_cpp_fp16_library(cpp_encode, checkpoint, tmp_path):
    """An fp16 library from C++: float32 input converted on the host, fp16 features out, equal to
    the Python runtime's and within the fp16 bounds of transformers' fp32 output."""
    model, ckpt = checkpoint
    lib, params = compile_and_convert(ckpt, tmp_path, "float16")
    pixels = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype("float32")
    np.save(tmp_path / "pixels.npy", pixels)
    ours_cpp = run_cpp(cpp_encode, lib, params, tmp_path / "pixels.npy", tmp_path / "cpp.npy")
    assert ours_cpp.dtype == np.float16
    np.testing.assert_array_equal(ours_cpp, VisionEncoder(lib, params)(pixels))
    with torch.no_grad():
        ref = model(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
    assert_close(ours_cpp.astype(np.float32), ref, "C++ example, fp16 library", "float16")


# ---- the tiling contract in C++ (examples/cpp/tiling.h) -------------------------------------------

def run_cpp_tiles(binary: Path, lib: Path, params: Path, rgb: np.ndarray, workdir: Path, *extra: str):
    np.save(workdir / "image.npy", rgb)
    args = [str(binary), str(lib), str(params), str(workdir / "image.npy"), str(workdir / "out.npy"), "--tiles",
            "--tiles-out", str(workdir / "tiles.npy"), *extra]
    proc = subprocess.run(args, capture_output=True, text=True)
    return proc, workdir


# InternVL grids of 1x12-like, 2x3, near-tie and square shapes at the tiny tower's 56 px tiles
INTERNVL_CASES = [((40, 500), ()), ((120, 170), ()), ((101, 143), ("--max-tiles", "6")), ((90, 90), ("--no-thumbnail",)),
                  ((70, 30), ("--min-tiles", "2", "--max-tiles", "4"))]


@pytest.mark.parametrize("shape, extra", INTERNVL_CASES)
def test_cpp_internvl_tiles_equal_python(cpp_encode, tiled_tower, tmp_path, shape, extra):
    _, lib, params = tiled_tower
    encoder = VisionEncoder(lib, params)
    rgb = image(shape, seed=shape[0])
    proc, _ = run_cpp_tiles(cpp_encode, lib, params, rgb, tmp_path, *extra)
    assert proc.returncode == 0, proc.stderr
    options = dict(zip(extra[::2], extra[1::2])) if "--no-thumbnail" not in extra else {}
    tiling = encoder.tiling
    tiled = internvl_tiles(
        rgb, encoder.image_size, Preprocess.from_dict(encoder.metadata["preprocess"]),
        min_tiles=int(options.get("--min-tiles", tiling["min_tiles"])),
        max_tiles=int(options.get("--max-tiles", tiling["max_tiles"])),
        thumbnail="--no-thumbnail" not in extra,
    )
    np.testing.assert_array_equal(np.load(tmp_path / "tiles.npy"), tiled.tiles)
    features = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(features, encoder.encode_rgb8(tiled.tiles))
    assert f"grid {tiled.grid}" in proc.stdout
    # and the Python runtime's own path (encode after its normalization) agrees to float rounding
    python = encoder.encode_tiles(rgb, **{k.strip("-").replace("-", "_"): int(v) for k, v in options.items()},
                                  thumbnail="--no-thumbnail" not in extra)
    assert_fp32_close(features, python.features, f"{shape} C++ vs Python runtime")


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (50, 50), (20, 200), (70, 45), (33, 31)])
def test_cpp_anyres_packing_equals_python(cpp_encode, anyres_library, tmp_path, shape):
    lib, params = anyres_library
    encoder = VisionEncoder(lib, params)
    rgb = image(shape, seed=shape[1])
    proc, _ = run_cpp_tiles(cpp_encode, lib, params, rgb, tmp_path)
    assert proc.returncode == 0, proc.stderr
    pinpoints = [tuple(p) for p in encoder.tiling["grid_pinpoints"]]
    tiled = anyres_tiles(rgb, encoder.image_size, Preprocess.from_dict(encoder.metadata["preprocess"]), pinpoints)
    np.testing.assert_array_equal(np.load(tmp_path / "tiles.npy"), tiled.tiles)
    packed = pack_anyres(encoder.encode_rgb8(tiled.tiles), tiled.grid, shape, encoder._image_newline)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), packed)
    assert f"-> {len(packed)} packed tokens" in proc.stdout
    assert_fp32_close(np.load(tmp_path / "out.npy"), encoder.encode_tiles(rgb).packed, f"{shape} C++ vs Python runtime")


@pytest.mark.parametrize("shape", [(40, 90), (96, 96), (90, 33), (30, 30)])
def test_cpp_onevision_shrink_equals_python(cpp_encode, onevision, tmp_path, shape):
    """OneVision's anyres_max_2: three of these token maps are shrunk (bilinear), one is kept."""
    _, lib, params = onevision
    encoder = VisionEncoder(lib, params)
    rgb = image(shape, seed=shape[0])
    proc, _ = run_cpp_tiles(cpp_encode, lib, params, rgb, tmp_path)
    assert proc.returncode == 0, proc.stderr
    tiling = encoder.tiling
    tiled = anyres_tiles(rgb, encoder.image_size, Preprocess.from_dict(encoder.metadata["preprocess"]),
                         [tuple(p) for p in tiling["grid_pinpoints"]])
    np.testing.assert_array_equal(np.load(tmp_path / "tiles.npy"), tiled.tiles)
    packed = pack_anyres(encoder.encode_rgb8(tiled.tiles), tiled.grid, shape, encoder._image_newline, tiling["anyres_max"])
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), packed)


def test_cpp_tile_errors_are_one_line(cpp_encode, tiled_tower, anyres_library, library, tmp_path):
    _, lib, params = tiled_tower
    proc, _ = run_cpp_tiles(cpp_encode, lib, params, image((40, 60)), tmp_path, "--min-tiles", "0")
    assert proc.returncode == 1 and "tile counts out of range" in proc.stderr and proc.stderr.count("\n") == 1
    anyres_lib, anyres_params = anyres_library
    proc, _ = run_cpp_tiles(cpp_encode, anyres_lib, anyres_params, image((40, 60)), tmp_path, "--max-tiles", "3")
    assert proc.returncode == 1 and "InternVL options" in proc.stderr
    clip_lib, clip_params = library
    proc, _ = run_cpp_tiles(cpp_encode, clip_lib, clip_params, image((40, 60)), tmp_path)
    assert proc.returncode == 1 and "no tiling contract" in proc.stderr
