"""bf16 CPU libraries: the C GEMM (kernels/cpu_bf16_gemm.c) against numpy, and a whole
bf16 library against our fp32 library.

The kernel is compiled alone and called through ctypes on every path this CPU
runs (plain C always; AVX512-BF16 and AMX where present), and in an emulated build on every path
whatever the CPU (tests/kernel_builds.py), on small shapes with
row, column and k tails. The reference is numpy's fp32 product of the same
bf16-rounded inputs, so the only difference allowed is fp32 summation order.
No timing assertions.
"""

from __future__ import annotations

import ctypes
import dataclasses

import ml_dtypes
import numpy as np
import pytest

from mlc_vision.compiler.kernels import cpu_bf16_gemm, cpu_f32_gemm
from kernel_builds import BUILDS, kernel_library
from parity import CompiledCPU, assert_close, convert_checkpoint, randomize_all


#: (M, N, K): one row, row tails of the 6-row tile, a 64-column panel tail,
#: k not a multiple of the AMX step (34, 96), and a shape with whole AMX blocks
#: plus tails (70 rows, 200 columns, k 128). The last two reach the AMX linear layer's
#: blocking: K in several L1-sized chunks with a k tail (1060), and x rows in several
#: L2-sized chunks (2000 rows of k 1060 are more than an L2 cache of up to 5 MiB holds).
#: Last panels of 1 to 4 vectors of 16 columns (the AVX512 tile computes only those): 70,
#: 130, 200 (one), 90 (two), 110 (three), 64 (four).
SHAPES = [(1, 1, 2), (5, 70, 64), (13, 130, 96), (37, 64, 34), (70, 200, 128), (9, 90, 48), (11, 110, 40),
          (37, 70, 1060), (2000, 40, 1060)]  # fmt: skip


@pytest.fixture(scope="module", params=BUILDS)
def kernel(request, tmp_path_factory):
    """The kernel by ctypes, as a library links it (``native``) and with the AVX512-BF16 and AMX paths
    emulated (``emulated``, tests/kernel_builds.py)."""
    lib = kernel_library(cpu_bf16_gemm, request.param, tmp_path_factory.mktemp(f"bf16-{request.param}"))
    lib.mlcv_bf16_linear_path.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
    lib.mlcv_bf16_attention_path.argtypes = (
        [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_float]
    )
    lib.mlcv_bf16_attention_io_path.argtypes = (
        [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int32, ctypes.c_int32]
    )
    lib.mlcv_bf16_linear_act_path.argtypes = (
        [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 3
    )
    return lib


def _run(lib, path, x, w, bias, residual=None):
    y = np.full((x.shape[0], w.shape[0]), np.nan, dtype=np.float32)
    ptr = lambda a: None if a is None else a.ctypes.data  # noqa: E731
    status = lib.mlcv_bf16_linear_path(
        path, ptr(x), ptr(w), ptr(bias), ptr(residual), ptr(y), x.shape[0], w.shape[0], x.shape[1]
    )
    return status, y


#: The kernel's epilogues: what is added to x . w^T.
EPILOGUES = {"plain": (False, False), "bias": (True, False), "residual": (False, True), "bias-residual": (True, True)}


@pytest.mark.parametrize("path", sorted(cpu_bf16_gemm.PATHS), ids=list(cpu_bf16_gemm.PATHS.values()))
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_numpy(kernel, path, epilogue, shape):
    if not kernel.mlcv_bf16_path_supported(path):
        pytest.skip(f"this CPU has no {cpu_bf16_gemm.PATHS[path]}")
    with_bias, with_residual = EPILOGUES[epilogue]
    m, n, k = shape
    rng = np.random.default_rng(m * 1000 + n + k)
    x = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
    w = rng.standard_normal((n, k)).astype(ml_dtypes.bfloat16)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    residual = rng.standard_normal((m, n)).astype(np.float32) if with_residual else None
    status, y = _run(kernel, path, x, w, bias, residual)
    assert status == 0
    ref = x.astype(np.float32) @ w.astype(np.float32).T
    ref = ref + (bias if with_bias else 0) + (residual if with_residual else 0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def _erf(z):
    import math

    return np.vectorize(math.erf)(z)


#: The activations the kernel can apply before its bf16 store, as numpy functions of fp64 values
#: ("none": the bf16 store alone, ``ACT_NONE``).
ACTIVATION_REFERENCES = {
    "none": lambda v: v,
    "quick_gelu": lambda v: v / (1 + np.exp(-1.702 * v)),
    "gelu": lambda v: 0.5 * v * (1 + _erf(v / np.sqrt(2))),
    "gelu_tanh": lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3))),
}


@pytest.mark.parametrize("path", sorted(cpu_bf16_gemm.PATHS), ids=list(cpu_bf16_gemm.PATHS.values()))
@pytest.mark.parametrize("act", list(ACTIVATION_REFERENCES))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_activation_epilogue_matches_numpy(kernel, path, act, with_bias, shape):
    """x . w^T (+ bias), the activation and the bf16 rounding in the kernel: within one bf16 step of
    the exact activation of numpy's product (the inputs' scale spans the activations' curved part
    and their tails)."""
    if not kernel.mlcv_bf16_path_supported(path):
        pytest.skip(f"this CPU has no {cpu_bf16_gemm.PATHS[path]}")
    m, n, k = shape
    rng = np.random.default_rng(m + 7 * n + k)
    x = (rng.standard_normal((m, k)) * 2 / np.sqrt(k)).astype(ml_dtypes.bfloat16)
    w = rng.standard_normal((n, k)).astype(ml_dtypes.bfloat16)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    y16 = np.zeros((m, n), dtype=ml_dtypes.bfloat16)
    ptr = lambda a: None if a is None else a.ctypes.data  # noqa: E731
    status = kernel.mlcv_bf16_linear_act_path(
        path, ptr(x), ptr(w), ptr(bias), cpu_bf16_gemm.ACTIVATIONS.get(act, cpu_bf16_gemm.ACT_NONE), ptr(y16),
        m, n, k,
    )
    assert status == 0
    pre = x.astype(np.float64) @ w.astype(np.float64).T + (bias if with_bias else 0)
    ref = ACTIVATION_REFERENCES[act](pre)
    assert np.abs(pre).max() > 3 and (pre < -3).any()  # the tails are exercised
    np.testing.assert_allclose(y16.astype(np.float64), ref, rtol=2.0**-7, atol=1e-5 * np.sqrt(k))


def test_unknown_activation_is_refused(kernel):
    x = np.ones((2, 4), dtype=ml_dtypes.bfloat16)
    y16 = np.zeros((2, 3), dtype=ml_dtypes.bfloat16)
    w = np.ones((3, 4), dtype=ml_dtypes.bfloat16)
    status = kernel.mlcv_bf16_linear_act_path(0, x.ctypes.data, w.ctypes.data, None, 99, y16.ctypes.data, 2, 3, 4)
    assert status != 0


#: (batch, seq, heads, head_dim): a single key; odd key counts (a zero key pads the last pair);
#: key panels with tails (70, 197); a head dim that is not a whole number of 16-lane vectors (72)
#: and one of two value panels (80 -> 128 columns); more heads than queries.
ATTENTION_SHAPES = [(1, 1, 1, 2), (2, 5, 3, 8), (1, 70, 2, 64), (1, 197, 1, 72), (2, 33, 4, 80)]


def _attention_reference(q, k, v, scale):
    qh, kh, vh = (np.transpose(t.astype(np.float64), (0, 2, 1, 3)) for t in (q, k, v))
    s = qh @ np.swapaxes(kh, -1, -2) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.transpose((p / p.sum(-1, keepdims=True)) @ vh, (0, 2, 1, 3))


@pytest.mark.parametrize("path", sorted(cpu_bf16_gemm.PATHS), ids=list(cpu_bf16_gemm.PATHS.values()))
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_matches_numpy(kernel, path, shape):
    """softmax(scale q k^T) v over [batch, seq, heads, head_dim]: plain C in fp32 (fp32 summation order
    only), the bf16 paths within what rounding q, k, v and the probabilities to bf16 allows."""
    if not kernel.mlcv_bf16_path_supported(path):
        pytest.skip(f"this CPU has no {cpu_bf16_gemm.PATHS[path]}")
    b, s, h, d = shape
    rng = np.random.default_rng(s * 10 + d)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    q *= 2  # peaked rows: some probabilities near 1, most near 0
    out = np.full(shape, np.nan, dtype=np.float32)
    scale = d**-0.5
    status = kernel.mlcv_bf16_attention_path(
        path, q.ctypes.data, k.ctypes.data, v.ctypes.data, out.ctypes.data, b, s, h, d, scale
    )
    assert status == 0
    tol = 1e-5 if cpu_bf16_gemm.PATHS[path] == "generic" else 2e-2
    np.testing.assert_allclose(out, _attention_reference(q, k, v, scale), rtol=tol, atol=tol)


@pytest.mark.parametrize("path", sorted(cpu_bf16_gemm.PATHS), ids=list(cpu_bf16_gemm.PATHS.values()))
@pytest.mark.parametrize("io", ["bf16-in", "bf16-out", "bf16-in-out"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_bf16_io_matches_numpy(kernel, path, io, shape):
    """The attention with bf16 q, k, v and/or a bf16 output (the q, k, v projections of a bf16
    library store bf16): the same result as numpy's attention of the same (bf16) inputs, the output
    within one bf16 rounding more when it is bf16."""
    if not kernel.mlcv_bf16_path_supported(path):
        pytest.skip(f"this CPU has no {cpu_bf16_gemm.PATHS[path]}")
    in16, out16 = io != "bf16-out", io != "bf16-in"
    b, s, h, d = shape
    rng = np.random.default_rng(s * 10 + d + 1)
    q, k, v = (rng.standard_normal(shape).astype(ml_dtypes.bfloat16) for _ in range(3))
    q = (q.astype(np.float32) * 2).astype(ml_dtypes.bfloat16)  # peaked rows, still exact in bf16
    if not in16:
        q, k, v = (t.astype(np.float32) for t in (q, k, v))
    out = np.full(shape, np.nan, dtype=ml_dtypes.bfloat16 if out16 else np.float32)
    scale = d**-0.5
    status = kernel.mlcv_bf16_attention_io_path(
        path, q.ctypes.data, k.ctypes.data, v.ctypes.data, out.ctypes.data, b, s, h, d, scale, in16, out16
    )
    assert status == 0
    tol = 1e-5 if cpu_bf16_gemm.PATHS[path] == "generic" else 2e-2
    tol = max(tol, 2.0**-8) if out16 else tol
    ref = _attention_reference(*(t.astype(np.float32) for t in (q, k, v)), scale)
    np.testing.assert_allclose(out.astype(np.float32), ref, rtol=tol, atol=tol)


def test_odd_k_is_refused(kernel):
    x = np.ones((2, 3), dtype=ml_dtypes.bfloat16)
    status, _ = _run(kernel, 0, x, np.ones((4, 3), dtype=ml_dtypes.bfloat16), None)
    assert status != 0


def test_best_path_is_supported(kernel):
    best = kernel.mlcv_bf16_best_path()
    assert best in cpu_bf16_gemm.PATHS and kernel.mlcv_bf16_path_supported(best)


# ---- a whole library ---------------------------------------------------------------------

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = randomize_all(CLIPVisionModel(CLIPVisionConfig(**TINY)), seed=0)
    ckpt = tmp_path_factory.mktemp("clip-bf16-ckpt")
    model.save_pretrained(ckpt)
    return ckpt


def test_bf16_library_matches_fp32_library(clip_checkpoint, tmp_path):
    from mlc_vision.checkpoint.resolve import resolve_config

    config = dataclasses.replace(resolve_config(clip_checkpoint), select_layer=-1, feature="cls_patch")
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype("float32")
    out = {}
    for dtype in ("float32", "bfloat16"):
        params = convert_checkpoint(clip_checkpoint, tmp_path / f"params-{dtype}", dtype=dtype)
        lib = CompiledCPU(config, params, dtype, tmp_path, hidden_states=False)
        out[dtype] = lib.encode(pixels)
    assert lib.metadata["params"][0]["dtype"] == "bfloat16"
    assert_close(out["bfloat16"], out["float32"], "bf16 library vs the fp32 library", "bfloat16")


def _bf16_calls(config, cpu: str) -> list[str]:
    """The kernels a bf16 CPU library of ``config`` for LLVM's CPU ``cpu`` launches (as exported: the
    fp32 C kernel available)."""
    from mlc_vision.bench import kernel_calls
    from mlc_vision.compiler.module import build_module
    from mlc_vision.compiler.pipeline import relax_pipeline
    from mlc_vision.compiler.targets import cpu_target

    built = build_module(config, "bfloat16", "cpu", cpu=cpu)
    target = cpu_target(built.metadata["cpu"])
    return kernel_calls(relax_pipeline("cpu", target, built.metadata["attention"], f32_gemm=True)(built.mod))


#: A CPU with bf16 arithmetic (AVX512-BF16), one with only fp32 FMAs (AVX2 + FMA): the library's CPU,
#: not this one (no library is run here).
BF16_CPU, FP32_ONLY_CPU = "znver4", "haswell"


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu", "gelu_pytorch_tanh"])
def test_bf16_linear_layers_call_the_kernel(clip_checkpoint, hidden_act):
    """For a CPU with bf16 arithmetic, every linear layer of a bf16 CPU library becomes the C kernel;
    none stays an fp32 matmul; fc1 applies the MLP's activation in its epilogue (no activation kernel
    is left); attention is the kernel's too."""
    from mlc_vision.checkpoint.resolve import resolve_config

    config = dataclasses.replace(
        resolve_config(clip_checkpoint), select_layer=-1, feature="cls_patch", hidden_act=hidden_act
    )
    calls = _bf16_calls(config, BF16_CPU)
    linear = [c for c in calls if c.startswith("bf16_linear")]
    assert len(linear) == 1 + 6 * TINY["num_hidden_layers"]  # patch embedding + q, k, v, out, fc1, fc2
    assert not [c for c in calls if "matmul" in c]
    # out-projection and fc2 add the residual stream in the kernel: no separate add kernel
    assert len([c for c in linear if c.endswith("_residual")]) == 2 * TINY["num_hidden_layers"]
    epilogue = {"quick_gelu": "_quick_gelu", "gelu": "_gelu", "gelu_pytorch_tanh": "_gelu_tanh"}[hidden_act]
    assert len([c for c in linear if c.endswith(epilogue)]) == TINY["num_hidden_layers"]
    assert not [c for c in calls if "gelu" in c and not c.startswith("bf16_linear") or "sigmoid" in c]
    # attention: the bf16 kernel's, not the fp32 fused one; q, k, v come in bf16 from their
    # projections, the output goes in bf16 to out-projection (no cast kernel between them)
    attention = [c for c in calls if c.startswith("bf16_attention")]
    assert len(attention) == TINY["num_hidden_layers"]
    assert all(c.endswith("_in16_out16") for c in attention)
    assert len([c for c in linear if c.endswith("_bias_bf16")]) == 3 * TINY["num_hidden_layers"]
    assert not [c for c in calls if c.startswith("attention")]
    assert not [c for c in calls if c.startswith("f32_")]


def test_bf16_library_for_a_cpu_without_bf16_arithmetic_reads_bf16_weights_in_fp32(clip_checkpoint):
    """For an AVX2 CPU, a bf16 library's linear layers are the fp32 kernel reading the bf16 weights
    (with the fp32 epilogues), its attention the fp32 kernel's; the bf16 kernel is neither called
    nor linked."""
    from mlc_vision.checkpoint.resolve import resolve_config
    from mlc_vision.compiler.export import c_kernels
    from mlc_vision.compiler.targets import cpu_spec

    config = dataclasses.replace(resolve_config(clip_checkpoint), select_layer=-1, feature="cls_patch")
    calls = _bf16_calls(config, FP32_ONLY_CPU)
    layers = TINY["num_hidden_layers"]
    linear = [c for c in calls if c.startswith("f32_linear_bf16w")]
    assert len(linear) == 1 + 4 * layers  # patch embedding, (q, k, v) as one group call, out, fc1, fc2
    assert len([c for c in linear if c.startswith("f32_linear_bf16w_group3_")]) == layers
    assert len([c for c in linear if c.endswith("_residual")]) == 2 * layers
    assert len([c for c in linear if c.endswith("_quick_gelu")]) == layers
    assert len([c for c in calls if c.startswith("f32_attention")]) == layers
    assert not [c for c in calls if c.startswith("bf16_") or "matmul" in c]
    metadata = {"dtype": "bfloat16", "cpu": cpu_spec(FP32_ONLY_CPU)}
    assert cpu_bf16_gemm not in c_kernels("cpu", metadata)
    assert cpu_bf16_gemm in c_kernels("cpu", {"dtype": "bfloat16", "cpu": cpu_spec(BF16_CPU)})


def test_bf16_library_for_an_avx2_cpu_matches_fp32_library(clip_checkpoint, tmp_path):
    """The library of the test above, run (on any CPU with AVX2: the fp32 kernel picks its fastest
    path here): cosine >= 0.9999 against the fp32 library, as a bf16 library must."""
    from mlc_vision.checkpoint.resolve import resolve_config
    from mlc_vision.compiler.targets import cpu_spec

    if not cpu_f32_gemm.has_vector_path(cpu_spec()["features"]):
        pytest.skip("this CPU has no AVX2 + FMA")
    config = dataclasses.replace(resolve_config(clip_checkpoint), select_layer=-1, feature="cls_patch")
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype("float32")
    out = {}
    for dtype, cpu in (("float32", None), ("bfloat16", FP32_ONLY_CPU)):
        params = convert_checkpoint(clip_checkpoint, tmp_path / f"params-{dtype}", dtype=dtype)
        out[dtype] = CompiledCPU(config, params, dtype, tmp_path, hidden_states=False, cpu=cpu).encode(pixels)
    assert_close(out["bfloat16"], out["float32"], "bf16 weights in fp32 vs the fp32 library", "bfloat16")


def test_split_qkv_projection_feeds_attention_in_bf16():
    """InternViT's one qkv linear layer, split into q, k and v: it stores bf16 and the attention reads
    bf16 (the split runs on bf16)."""
    import tvm

    from mlc_vision.bench import kernel_calls
    from mlc_vision.compiler.module import build_module
    from mlc_vision.compiler.pipeline import relax_pipeline
    from mlc_vision.config import load_preset

    config = dataclasses.replace(
        load_preset("internvit-300m-448px"), select_layer=-1, feature="cls_patch", num_hidden_layers=1
    )
    calls = _bf16_calls(config, BF16_CPU)
    attention = [c for c in calls if c.startswith("bf16_attention")]
    assert len(attention) == 1 and attention[0].endswith("_in16_out16")
    qkv = [c for c in calls if c.startswith("bf16_linear") and f"_n{3 * config.hidden_size}_" in c]
    assert len(qkv) == 1 and qkv[0].endswith("_bf16")
