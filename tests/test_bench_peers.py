"""``bench``'s peers and machine header (no timing assertions)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import numpy as np
import pytest

from mlc_vision import bench_peers
from mlc_vision.compiler.kernels.c_objects import find_c_compiler


def test_machine_header_names_cpu_isa_frequency_and_peak():
    machine = bench_peers.machine_info()
    assert machine["cores"] >= 1 and machine["ghz"] > 0 and machine["fp32_flops_per_cycle"] >= 8
    assert machine["fp32_peak_gflops"] == pytest.approx(machine["cores"] * machine["ghz"] * machine["fp32_flops_per_cycle"], rel=0.01)
    header = bench_peers.machine_header(machine)
    assert header.startswith("CPU: ") and "GHz" in header and "fp32 peak" in header and "\n" not in header


@pytest.mark.parametrize(
    ("vendor", "family", "model", "flags", "expected"),
    [
        ("AuthenticAMD", 23, 0x01, {"fma", "avx2"}, 16),  # Zen 1: two 128-bit FMA pipes
        ("AuthenticAMD", 23, 0x31, {"fma", "avx2"}, 32),  # Zen 2: two 256-bit pipes
        ("AuthenticAMD", 25, 0x11, {"fma", "avx512f"}, 32),  # Zen 4: 512-bit FMAs on two 256-bit pipes
        ("AuthenticAMD", 26, 0x02, {"fma", "avx512f"}, 64),
        ("GenuineIntel", 6, 207, {"fma", "avx512f"}, 64),
        ("GenuineIntel", 6, 60, {"fma", "avx2"}, 32),
    ],
)
def test_fp32_flops_per_cycle_knows_the_microarchitecture(vendor, family, model, flags, expected):
    assert bench_peers.fp32_flops_per_cycle(vendor, family, model, flags) == expected


def test_measured_peak_runs_on_every_core_and_is_named_in_the_header():
    machine = bench_peers.machine_info(measure_peak=True)
    measured = machine["measured_fp32_gflops"]
    if measured is None:  # off x86, no FMA or no C compiler: the nominal peak stands
        assert bench_peers.reference_peak(machine) == machine["fp32_peak_gflops"]
        return
    assert measured > 0 and machine["measured_ghz"] > 0
    assert bench_peers.reference_peak(machine) == measured
    assert "measured (FMA-only loop on every core)" in bench_peers.machine_header(machine)


@pytest.mark.parametrize("register", ["ymm", "zmm"])
def test_fma_probe_builds_for_each_register_class(register, tmp_path):
    """The probe's C is valid for both widths; it runs where this CPU has that width."""
    if find_c_compiler() is None:
        pytest.skip("no C compiler")
    library = bench_peers.build_fma_probe(register, tmp_path)
    assert library is not None
    flags = set(bench_peers.machine_info()["isa"])
    if (register == "zmm" and "avx512f" in flags) or (register == "ymm" and "fma" in flags):
        ctypes.CDLL(str(library)).fma_loop(ctypes.c_int64(1000))


def test_bench_imports_without_test_or_bench_dependencies():
    code = (
        "import sys, mlc_vision.bench; "
        "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'openvino', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_peers_run_the_torch_model():
    """ONNX Runtime and OpenVINO f32 on the ONNX export give the torch model's output."""
    if bench_peers.missing_peers():
        pytest.skip(f"bench extra not installed ({', '.join(bench_peers.missing_peers())})")
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)
    model = CLIPVisionModel(cfg).eval()
    pixels = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype("float32")
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels)).last_hidden_state.numpy()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = bench_peers.export_onnx(model, pixels, Path(tmp) / "m.onnx")
        ort = bench_peers.onnxruntime_runner(bench_peers.onnxruntime_session(path), pixels)()
        ov_f32, precision = bench_peers.openvino_model(path, "f32")
        ov = bench_peers.openvino_runner(ov_f32, pixels)()
    assert precision == "f32"
    np.testing.assert_allclose(ort, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ov, expected, atol=1e-4, rtol=1e-4)
