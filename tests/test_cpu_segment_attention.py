"""Segmented attention (attention within runs of equal ids): the CPU C kernel
(kernels/cpu_segment_attention.c) against numpy, and both lowerings of the
model's segmented-attention call (passes/segment_attention.py) compiled for the CPU.

The kernel is compiled alone and called through ctypes on every path this CPU
runs, and in an emulated build on every path whatever the CPU (tests/kernel_builds.py), on random segment layouts: segments of one token, segments shorter and
longer than a key block (64) and a query block (32) and not multiples of
either, several head dims (including ones that are not a multiple of 16). The
reference is float64 numpy softmax attention per segment. No timing assertions.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest

from mlc_vision.compiler.kernels import cpu_segment_attention
from mlc_vision.models.qwen2_vl import SEGMENT_ATTENTION

from kernel_builds import BUILDS, kernel_library

#: (segment lengths, heads, head_dim)
LAYOUTS = [
    ([1], 1, 1),
    ([1, 5, 64, 65, 33, 1, 130], 3, 80),
    ([200], 2, 16),
    ([7, 96, 31], 4, 72),
    ([300, 2], 2, 128),
    ([1, 1, 1, 2], 2, 40),
]


def random_layout(rng, count: int) -> list[int]:
    """``count`` segment lengths between 1 and 150 (one-token segments are likely)."""
    return [int(x) for x in rng.choice([1, 2, 31, 32, 33, 63, 64, 65, 97, 150], size=count)]


def reference(q, k, v, segments):
    """float64 softmax(q k^T / sqrt(d)) v within each segment (any ids, sorted or not)."""
    out = np.zeros(q.shape, np.float64)
    scale = 1.0 / math.sqrt(q.shape[-1])
    for s in np.unique(segments):
        idx = np.flatnonzero(segments == s)
        scores = np.einsum("ihd,jhd->hij", q[idx].astype(np.float64), k[idx].astype(np.float64)) * scale
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[idx] = np.einsum("hij,jhd->ihd", p / p.sum(-1, keepdims=True), v[idx].astype(np.float64))
    return out


def inputs(rng, lengths, heads, head_dim, dtype=np.float32):
    segments = np.repeat(np.arange(len(lengths)) * 2, lengths).astype(np.int32)  # sorted, with gaps in the ids
    q, k, v = (2 * rng.standard_normal((len(segments), heads, head_dim)).astype(dtype) for _ in range(3))
    return q, k, v, segments


@pytest.fixture(scope="module", params=BUILDS)
def kernel(request, tmp_path_factory):
    """The kernel by ctypes, as a library links it (``native``) and with every path reported and
    compiled for the baseline CPU (``emulated``, tests/kernel_builds.py)."""
    lib = kernel_library(cpu_segment_attention, request.param, tmp_path_factory.mktemp(f"segment-{request.param}"))
    lib.mlcv_segment_attention_path.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [
        ctypes.c_float
    ]
    return lib


def _run(lib, path, q, k, v, segments):
    out = np.full(q.shape, np.nan, np.float32)
    n, heads, head_dim = q.shape
    pointers = [a.ctypes.data for a in (q, k, v, segments, out)]
    status = lib.mlcv_segment_attention_path(path, *pointers, n, heads, head_dim, 1.0 / math.sqrt(head_dim))
    return status, out


def _supported(lib, path):
    if not lib.mlcv_segment_attention_path_supported(path):
        pytest.skip(f"this CPU has no {cpu_segment_attention.PATHS[path]}")


@pytest.mark.parametrize("path", sorted(cpu_segment_attention.PATHS), ids=list(cpu_segment_attention.PATHS.values()))
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{len(x[0])}seg-h{x[1]}-d{x[2]}")
def test_kernel_matches_numpy(kernel, path, layout):
    _supported(kernel, path)
    rng = np.random.default_rng(sum(layout[0]) + 7 * layout[2])
    q, k, v, segments = inputs(rng, *layout)
    status, out = _run(kernel, path, q, k, v, segments)
    assert status == 0
    np.testing.assert_allclose(out, reference(q, k, v, segments), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("path", sorted(cpu_segment_attention.PATHS), ids=list(cpu_segment_attention.PATHS.values()))
def test_kernel_random_layouts(kernel, path):
    _supported(kernel, path)
    rng = np.random.default_rng(12)
    for _ in range(4):
        q, k, v, segments = inputs(rng, random_layout(rng, int(rng.integers(1, 8))), 2, 24)
        status, out = _run(kernel, path, q, k, v, segments)
        assert status == 0
        np.testing.assert_allclose(out, reference(q, k, v, segments), rtol=1e-5, atol=2e-5)


def test_large_scores_stay_finite(kernel):
    """Scores of a few hundred (the online softmax rescales by 2^(old max - new max)) and a growing max."""
    rng = np.random.default_rng(3)
    q, k, v, segments = inputs(rng, [150, 70], 2, 32)
    k *= np.linspace(1, 30, len(segments), dtype=np.float32)[:, None, None]  # the max grows block by block
    status, out = _run(kernel, kernel.mlcv_segment_attention_best_path(), q, k, v, segments)
    assert status == 0 and np.isfinite(out).all()
    np.testing.assert_allclose(out, reference(q, k, v, segments), rtol=1e-4, atol=1e-4)


def test_unsorted_segments_and_bad_head_dim_are_refused(kernel):
    best = kernel.mlcv_segment_attention_best_path()
    ones = np.ones((4, 1, 8), np.float32)
    status, _ = _run(kernel, best, ones, ones, ones, np.array([0, 0, 1, 0], np.int32))
    assert cpu_segment_attention.ERRORS[status].startswith("segment ids must be non-decreasing")
    wide = np.ones((2, 1, cpu_segment_attention.MAX_HEAD_DIM + 1), np.float32)
    status, _ = _run(kernel, best, wide, wide, wide, np.zeros(2, np.int32))
    assert cpu_segment_attention.ERRORS[status].startswith("head_dim must be")


def test_best_path_is_supported(kernel):
    best = kernel.mlcv_segment_attention_best_path()
    assert best in cpu_segment_attention.PATHS and kernel.mlcv_segment_attention_path_supported(best)


# ---- the lowerings of the model's call, compiled ---------------------------------------------


def segment_attention_module(heads: int, head_dim: int, dtype: str):
    """``main(q, k, v, segments)``: one segmented-attention call as models/qwen2_vl.py emits it, n symbolic."""
    from tvm import relax, tirx

    n = tirx.Var("n", "int64")
    ty = relax.TensorType([n, heads, head_dim], dtype)
    q, k, v = (relax.Var(name, ty) for name in "qkv")
    segments = relax.Var("segments", relax.TensorType([n], "int32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [q, k, v, segments]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.call_dps_packed(SEGMENT_ATTENTION, [q, k, v, segments], ty)))
        bb.emit_func_output(out)
    return bb.get()


def compile_and_load(mod, tmp_path):
    import tvm
    from tvm import relax

    from mlc_vision.compiler.export import compile_module

    executable = compile_module(mod, "cpu", attention="fused")
    path = tmp_path / "attention.so"
    executable.export_library(str(path), addons=[str(cpu_segment_attention.compile_object(tmp_path))])
    return relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())


def call(vm, *arrays):
    import tvm

    return vm["main"](*(tvm.runtime.tensor(a, tvm.cpu()) for a in arrays)).numpy()


def called_globals(mod) -> set[str]:
    return {gv.name_hint for gv, _ in mod.functions_items()}


def test_cpu_lowering_calls_the_kernel_and_keeps_wide_heads_masked():
    from mlc_vision.compiler.passes.segment_attention import (
        lower_segment_attention_cpu,
        lower_segment_attention_masked,
    )

    lowered = lower_segment_attention_cpu(segment_attention_module(2, 16, "float16"))
    assert "segment_attention_h2_d16" in called_globals(lowered)
    assert SEGMENT_ATTENTION not in lowered.script()
    wide = lower_segment_attention_cpu(segment_attention_module(1, cpu_segment_attention.MAX_HEAD_DIM + 8, "float32"))
    assert SEGMENT_ATTENTION in wide.script()  # left for the mask lowering
    assert SEGMENT_ATTENTION not in lower_segment_attention_masked(wide).script()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cpu_kernel_in_a_library(dtype, tmp_path):
    """fp32 and fp16 libraries: one library, several sequence lengths and layouts (the softmax in fp32 in both)."""
    vm = compile_and_load(segment_attention_module(3, 40, dtype), tmp_path)
    rng = np.random.default_rng(5)
    for lengths in ([1], [64, 64, 3], [33, 1, 100]):
        q, k, v, segments = inputs(rng, lengths, 3, 40, np.dtype(dtype))
        out = call(vm, q, k, v, segments)
        assert out.dtype == np.dtype(dtype)
        tol = 2e-5 if dtype == "float32" else 2e-3
        np.testing.assert_allclose(out.astype(np.float64), reference(q, k, v, segments), rtol=tol, atol=tol)


def test_a_bad_segment_order_is_one_error(tmp_path):
    vm = compile_and_load(segment_attention_module(1, 8, "float32"), tmp_path)
    ones = np.ones((3, 1, 8), np.float32)
    with pytest.raises(Exception, match="segment ids must be non-decreasing"):
        call(vm, ones, ones, ones, np.array([1, 0, 1], np.int32))


def test_masked_lowering_in_a_library(tmp_path):
    """The mask lowering (every target without a kernel) on the CPU: any ids, runs or not."""
    from mlc_vision.compiler.passes.segment_attention import lower_segment_attention_masked

    vm = compile_and_load(lower_segment_attention_masked(segment_attention_module(2, 16, "float32")), tmp_path)
    rng = np.random.default_rng(9)
    q, k, v, _ = inputs(rng, [20], 2, 16)
    segments = rng.integers(0, 3, size=20).astype(np.int32)  # interleaved
    np.testing.assert_allclose(call(vm, q, k, v, segments), reference(q, k, v, segments), rtol=1e-5, atol=2e-5)


def test_runtime_ids_are_runs_in_window_order():
    """What the kernel relies on: the runtime's ids, in the order the blocks see the patches, never decrease
    (several images, partial windows)."""
    from mlc_vision.runtime.native import NativeGeometry, attention_inputs

    geometry = NativeGeometry(patch_size=14, temporal_patch_size=2, merge_size=2, window_size=112)
    grids = [(1, 20, 12), (1, 4, 4), (1, 18, 34)]
    ids = attention_inputs(grids, geometry)
    in_window_order = {k: ids[k].reshape(-1, 4)[ids["window_index"]].ravel() for k in ("image_ids", "window_ids")}
    for name, order in in_window_order.items():
        assert (np.diff(order) >= 0).all(), name
    assert (np.diff(ids["image_ids"]) >= 0).all()  # Qwen2 (no windows): processor order
