"""Targets and library export, on a tiny Relax model (fast: no checkpoint, no GPU).

What each target must produce here (see docs/targets.md):
cpu -> a .so that runs; cuda -> a .so with an nvcc fatbin (no CUDA source);
metal -> a .tar of Mach-O arm64 objects with the Metal source; webgpu -> a
.tar of wasm objects; opencl -> a .so; vulkan -> one clean line saying what
to install (the PyPI wheel has no SPIR-V codegen).
"""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

import tvm
from tvm import relax, te
from tvm.relax.frontend import nn

from mlc_vision.compiler import export as B
from mlc_vision.compiler.cuda_fatbin import fatbin_entries
from mlc_vision.compiler import targets as T
from mlc_vision.errors import MlcVisionError

DIM, HIDDEN, SEQ = 128, 256, 128  # every matmul extent > 64: dlight may use tensor cores
METADATA = {"family": "tiny", "dtype": "float16", "note": "test"}


HEADS = 2
SCALE = 0.1  # explicit scale, as the families pass it (checks the attention legalization path)


class Tiny(nn.Module):
    """Linear + LayerNorm + softmax + attention with an explicit scale + a bias-free Linear."""

    def __init__(self, dtype):
        self.fc1 = nn.Linear(DIM, HIDDEN, dtype=dtype)
        self.norm = nn.LayerNorm(HIDDEN, dtype=dtype)
        self.fc2 = nn.Linear(HIDDEN, DIM, dtype=dtype)
        self.proj = nn.Linear(DIM, DIM, bias=False, dtype=dtype)

    def forward(self, x):
        h = nn.op.softmax(self.norm(self.fc1(x)), axis=-1)
        h = self.fc2(h)
        batch = x.shape[0]
        q = nn.op.reshape(h, [batch, SEQ, HEADS, DIM // HEADS])
        h = nn.op.scaled_dot_product_attention(q, q, q, scale=SCALE)
        return self.proj(nn.op.reshape(h, [batch, SEQ, DIM]))


def tiny_module(dtype="float32"):
    """IRModule with ``forward(x[batch, SEQ, DIM], packed_params)`` and ``_metadata()``."""
    spec = {"forward": {"x": nn.spec.Tensor(["batch", SEQ, DIM], dtype), "$": {"param_mode": "packed"}}}
    mod, params = Tiny(dtype).export_tvm(spec)
    builder = relax.BlockBuilder(mod)
    with builder.function("_metadata", params=[]):
        builder.emit_func_output(tvm.ir.StringImm(json.dumps(METADATA)))
    return builder.finalize(), params


def reference(x, w):
    h = x @ w["fc1.weight"].T + w["fc1.bias"]
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mean) / np.sqrt(var + 1e-5) * w["norm.weight"] + w["norm.bias"]
    h = np.exp(h - h.max(-1, keepdims=True))
    h = h / h.sum(-1, keepdims=True)
    h = h @ w["fc2.weight"].T + w["fc2.bias"]
    q = h.reshape(h.shape[0], SEQ, HEADS, DIM // HEADS).transpose(0, 2, 1, 3)
    scores = q @ q.transpose(0, 1, 3, 2) * SCALE
    p = np.exp(scores - scores.max(-1, keepdims=True))
    h = (p / p.sum(-1, keepdims=True)) @ q
    h = h.transpose(0, 2, 1, 3).reshape(h.shape[0], SEQ, DIM)
    return h @ w["proj.weight"].T


def needs(name):
    ok, reason = T._probe(name)
    return pytest.mark.skipif(not ok, reason=f"{name}: {reason}")


# ---------------------------------------------------------------------------
# Target names
# ---------------------------------------------------------------------------


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(MlcVisionError) as err:
        T.make_target("rocm")
    message = str(err.value)
    assert "\n" not in message and "rocm" in message
    assert all(name in message for name in T.TARGETS)


def test_availability_is_honest():
    infos = T.availability()
    assert [i.name for i in infos] == list(T.TARGETS)
    for name, ok, reason, suffix in infos:
        assert reason and "\n" not in reason
        assert suffix == (".tar" if name in ("metal", "webgpu") else ".so")
    assert {i.name: i for i in infos}["cpu"].buildable


def _tvm_codegen_builds(target: str) -> bool:
    """Whether TVM itself (none of our code) turns a one-kernel GPU function into code for ``target``."""
    a = te.placeholder((64,), name="a")
    b = te.compute((64,), lambda i: a[i] + 1, name="b")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    (loop,) = sch.get_loops(sch.get_sblock("b"))
    sch.bind(loop, "threadIdx.x")
    try:
        tvm.compile(sch.mod, target=target)
    except Exception as err:  # TVM raises its own error types; only a missing codegen is a "no"
        if "target.build." in str(err):
            return False
        raise
    return True


@pytest.mark.parametrize("name", ["vulkan", "opencl"])
def test_availability_agrees_with_tvm_codegen(name):
    """What ``targets`` says about a codegen-only target is what TVM can actually build."""
    info = {i.name: i for i in T.availability()}[name]
    assert info.buildable == _tvm_codegen_builds(name), info.reason


def B_has(func_name):
    return T._has_global_func(func_name)


@pytest.mark.parametrize(
    "arch, expected",
    [
        (None, ["sm_80", "sm_90"]),
        ("sm_80,sm_90", ["sm_80", "sm_90"]),
        ("90,80", ["sm_80", "sm_90"]),
        ("sm_86", ["sm_86"]),
        ("sm_90a", ["sm_90a"]),
    ],
)
def test_parse_cuda_archs(arch, expected):
    assert T.parse_cuda_archs(arch) == expected


@pytest.mark.parametrize("arch", ["ampere", "sm_60", ","])
def test_bad_cuda_arch_is_one_line(arch):
    with pytest.raises(MlcVisionError, match="arch") as err:
        T.parse_cuda_archs(arch)
    assert "\n" not in str(err.value)


@needs("cuda")
def test_cuda_target_uses_lowest_arch_and_generic_host():
    target = T.make_target("cuda", arch="90,80")
    assert target.kind.name == "cuda" and str(target.attrs["arch"]) == "sm_80"
    assert target.host.kind.name == "llvm" and "mcpu" not in target.host.attrs


@needs("metal")
@pytest.mark.parametrize("host, triple", [(None, "arm64-apple-macos"), ("ios", "arm64-apple-ios")])
def test_metal_host(host, triple):
    target = T.make_target("metal", host=host)
    assert target.kind.name == "metal" and str(target.host.attrs["mtriple"]) == triple


def test_options_for_other_targets_are_refused():
    with pytest.raises(MlcVisionError, match="--arch"):
        T.make_target("cpu", arch="sm_80")
    with pytest.raises(MlcVisionError, match="--host"):
        T.make_target("cpu", host="ios")


@pytest.mark.skipif(B_has("target.build.vulkan"), reason="this TVM has Vulkan codegen")
def test_vulkan_is_a_clean_one_line_error(tmp_path):
    mod, _ = tiny_module()
    with pytest.raises(MlcVisionError) as err:
        B.build_library(mod, "vulkan", tmp_path / "x.so", metadata={})
    message = str(err.value)
    assert "\n" not in message and "Vulkan" in message and "USE_VULKAN=ON" in message
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# Builds
# ---------------------------------------------------------------------------


def test_cpu_library_runs_and_matches_numpy(tmp_path):
    mod, params = tiny_module("float32")
    out = B.build_library(mod, "cpu", tmp_path / "tiny.so", metadata=METADATA)
    assert out == tmp_path / "tiny.so"
    assert json.loads((tmp_path / "tiny.so.json").read_text()) == METADATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.so", "tiny.so.json"]

    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(p.shape).astype("float32") * 0.1 for name, p in params}
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out)), dev)
    packed = [tvm.runtime.tensor(weights[name], dev) for name, _ in params]
    assert json.loads(vm["_metadata"]()) == METADATA
    for batch in (1, 3):  # one library for every batch size
        x = rng.standard_normal((batch, SEQ, DIM)).astype("float32")
        got = vm["forward"](tvm.runtime.tensor(x, dev), packed).numpy()
        np.testing.assert_allclose(got, reference(x, weights), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def cuda_executable():
    if not T._probe("cuda")[0]:
        pytest.skip(T._probe("cuda")[1])
    mod, _ = tiny_module("float16")
    return B.compile_module(mod, "cuda", attention="split", arch="sm_80,sm_90")


def test_cuda_fp16_matmuls_use_tensor_cores(cuda_executable):
    source = B.generated_source(cuda_executable)
    assert "__global__" in source
    assert "wmma::mma_sync" in source or "mma.sync" in source or "wgmma" in source


def test_cuda_library_embeds_a_fatbin_not_source(cuda_executable, tmp_path):
    out = B.export_executable(cuda_executable, "cuda", tmp_path / "tiny.so", arch="sm_80,sm_90", metadata=METADATA)
    data = out.read_bytes()
    entries = fatbin_entries(data)
    assert ("sass", "sm_80") in entries and ("sass", "sm_90") in entries
    assert ("ptx", "sm_90") in entries  # forward compatibility with newer GPUs
    # No CUDA C left for the runtime to compile (that would need NVRTC/nvcc + Python).
    assert b"__global__" not in data and b"extern \"C\"" not in data
    assert json.loads((tmp_path / "tiny.so.json").read_text()) == METADATA


def test_failed_export_leaves_nothing(cuda_executable, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "find_nvcc", lambda: "/bin/false")
    with pytest.raises(RuntimeError, match="nvcc failed"):
        B.export_executable(cuda_executable, "cuda", tmp_path / "tiny.so", metadata=METADATA)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_no_partial_file(tmp_path):
    class Broken:
        def export_library(self, path, **_):
            with open(path, "wb") as f:
                f.write(b"half a library")
            raise OSError("disk full")

    with pytest.raises(OSError):
        B.export_executable(Broken(), "cpu", tmp_path / "tiny.so", metadata=METADATA)
    assert list(tmp_path.iterdir()) == []


@needs("metal")
def test_metal_tar_of_macho_objects_with_metal_source(tmp_path):
    mod, _ = tiny_module("float16")
    out = B.build_library(mod, "metal", tmp_path / "tiny.tar", metadata=METADATA)
    with tarfile.open(out) as tar:
        members = [tar.extractfile(m).read() for m in tar.getmembers()]
    assert members
    for blob in members:  # MH_MAGIC_64, CPU_TYPE_ARM64
        assert blob[:4] == b"\xcf\xfa\xed\xfe" and blob[4:8] == b"\x0c\x00\x00\x01"
    assert any(b"kernel void" in blob and b"#include <metal_stdlib>" in blob for blob in members)
    assert (tmp_path / "tiny.tar.json").exists()


@needs("metal")
def test_metal_refuses_so_output(tmp_path):
    mod, _ = tiny_module()
    with pytest.raises(MlcVisionError, match=r"\.tar") as err:
        B.build_library(mod, "metal", tmp_path / "tiny.so", metadata={})
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


@needs("webgpu")
def test_webgpu_tar_of_wasm_objects(tmp_path):
    mod, _ = tiny_module("float32")
    out = B.build_library(mod, "webgpu", tmp_path / "tiny.tar", metadata=METADATA)
    with tarfile.open(out) as tar:
        members = [tar.extractfile(m).read() for m in tar.getmembers()]
    assert members and all(blob[:4] == b"\x00asm" for blob in members)
    assert any(b"@compute" in blob for blob in members)  # WGSL entry points


@needs("opencl")
def test_opencl_shared_library(tmp_path):
    mod, _ = tiny_module("float32")
    out = B.build_library(mod, "opencl", tmp_path / "tiny.so", metadata=METADATA)
    data = out.read_bytes()
    assert data[:4] == b"\x7fELF" and b"__kernel" in data
