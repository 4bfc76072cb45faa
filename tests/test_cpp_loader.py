"""The C++ loader in examples/cpp, linked only against the TVM runtime, gives
the same features as the Python runtime for the same library and params."""

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
from mlc_vision.runtime.encoder import VisionEncoder
from parity import assert_close, randomize_all

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
