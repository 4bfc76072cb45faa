"""fp32 CPU libraries on AVX-512 and AVX2: the C GEMM (kernels/cpu_f32_gemm.c) against numpy, and
the pass that routes linear layers to it.

The kernel is compiled alone and called through ctypes on every path this CPU
runs (plain C always; AVX2 + FMA and AVX-512 where present), and in an emulated build on every
path whatever the CPU (tests/kernel_builds.py), on small shapes with row tails
(the register tiles have 6 rows), column tails (64- and 16-column panels, 16- and 8-lane
vectors), k not a multiple of the K block, several row blocks, and every
epilogue. The reference is numpy in float64. No timing assertions.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math

import numpy as np
import pytest

from mlc_vision.compiler.kernels import cpu_f32_gemm
from kernel_builds import BUILDS, emulated_object, kernel_library
from parity import assert_close

#: (M, N, K): one row and one column; row and column tails; k shorter than a vector; a 16-lane tail
#: in the last panel; more rows than one work unit takes on any CPU (at most 1032) in two blocks of
#: which the last is short; k over several K blocks with uneven blocks (the block is at least 256 and
#: about 4096 on a 2 MiB L2: k = 9000 has 3 on such a CPU, more on smaller L2).
SHAPES = [(1, 1, 1), (5, 70, 7), (13, 130, 96), (37, 64, 250), (300, 200, 530), (1100, 70, 40), (7, 17, 1000),
          (29, 90, 1024), (9, 40, 9000)]


@pytest.fixture(scope="module", params=BUILDS)
def kernel(request, tmp_path_factory):
    """The kernel by ctypes, as a library links it (``native``) and with every vector path emulated
    (``emulated``, tests/kernel_builds.py)."""
    lib = kernel_library(cpu_f32_gemm, request.param, tmp_path_factory.mktemp(f"f32-{request.param}"))
    lib.mlcv_f32_linear_path.argtypes = [ctypes.c_int] * 2 + [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3 + [ctypes.c_int32]
    lib.mlcv_f32_linear_path.restype = ctypes.c_int
    lib.mlcv_f32_pack_weights_path.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    lib.mlcv_f32_pack_weights_path.restype = ctypes.c_int
    lib.mlcv_f32_packed_floats.argtypes = [ctypes.c_int64] * 2
    lib.mlcv_f32_packed_floats.restype = ctypes.c_int64
    lib.mlcv_f32_linear_group_path.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 3
    lib.mlcv_f32_linear_group_path.restype = ctypes.c_int
    lib.mlcv_f32_best_path.restype = ctypes.c_int
    lib.mlcv_f32_attention_path.argtypes = (
        [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_float]
    )
    lib.mlcv_f32_l2_bytes.restype = ctypes.c_int64
    return lib


def _paths(lib) -> list[int]:
    return [p for p in cpu_f32_gemm.PATHS if lib.mlcv_f32_path_supported(p)]


#: What the weights' pointer holds (``F32_WEIGHTS_*`` of the C file): as stored, bf16, packed.
STORED, BF16, PACKED = 0, 1, 2


def _aligned_floats(count: int) -> np.ndarray:
    """``count`` float32 values starting on a 64-byte boundary (what TVM's allocator gives), NaN-filled."""
    raw = np.full(count + 16, np.nan, dtype=np.float32)
    start = (-raw.ctypes.data % 64) // 4
    return raw[start : start + count]


def _pack(lib, path, w):
    """fp32 ``w [n, k]`` packed for ``path`` by the kernel (what a library's ``prepack_params`` does)."""
    n, k = w.shape
    packed = _aligned_floats(lib.mlcv_f32_packed_floats(n, k))
    assert lib.mlcv_f32_pack_weights_path(path, w.ctypes.data, packed.ctypes.data, n, k) == 0
    return packed


def _run(lib, path, x, w, bias=None, residual=None, gate=None, act=0, scale=None, packed=False):
    """``(status, y)`` of the kernel on ``path``; ``packed``: ``w`` packed for the path first."""
    y = np.full((x.shape[0], w.shape[0]), np.nan, dtype=np.float32)
    ptr = lambda a: None if a is None else a.ctypes.data  # noqa: E731
    weights = _pack(lib, path, w) if packed else w
    status = lib.mlcv_f32_linear_path(
        path, PACKED if packed else STORED, ptr(x), ptr(weights), ptr(bias), ptr(scale), ptr(residual), ptr(gate),
        ptr(y), x.shape[0], w.shape[0], x.shape[1], act,
    )  # fmt: skip
    return status, y


_erf = np.vectorize(math.erf)

#: float64 references of the kernel's activations.
REFERENCE_ACTIVATIONS = {
    "quick_gelu": lambda v: v / (1 + np.exp(-1.702 * v)),
    "gelu": lambda v: 0.5 * v * (1 + _erf(v / math.sqrt(2))),
    "gelu_tanh": lambda v: 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))),
    "silu": lambda v: v / (1 + np.exp(-v)),
}


def _inputs(shape, seed=0):
    m, n, k = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
    return rng, x, w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("epilogue", ["plain", "bias", "residual", "bias-residual", "scale-residual", "bias-scale-residual"])
@pytest.mark.parametrize("packed", [False, True], ids=["stored", "packed"])
def test_kernel_matches_numpy(kernel, epilogue, shape, packed):
    """Every path, weights as stored and packed once beforehand (a library's ``prepack_params``)."""
    rng, x, w = _inputs(shape)
    m, n, _ = shape
    bias = rng.standard_normal(n, dtype=np.float32) if "bias" in epilogue else None
    scale = rng.standard_normal(n, dtype=np.float32) if "scale" in epilogue else None
    residual = rng.standard_normal((m, n), dtype=np.float32) if "residual" in epilogue else None
    ref = x.astype(np.float64) @ w.astype(np.float64).T + (bias if bias is not None else 0)
    ref = ref * (scale if scale is not None else 1) + (residual if residual is not None else 0)
    for path in _paths(kernel):
        status, y = _run(kernel, path, x, w, bias, residual, scale=scale, packed=packed)
        assert status == 0
        assert_close(y, ref.astype(np.float32), f"path {cpu_f32_gemm.PATHS[path]} {epilogue} {shape} packed={packed}")


@pytest.mark.parametrize("shape", [(13, 130, 96), (37, 70, 250)])
@pytest.mark.parametrize("act", list(cpu_f32_gemm.ACTIVATIONS))
@pytest.mark.parametrize("gated", [False, True])
def test_activation_and_gate_epilogues_match_numpy(kernel, act, gated, shape):
    rng, x, w = _inputs(shape, seed=1)
    m, n, _ = shape
    bias = rng.standard_normal(n, dtype=np.float32)
    gate = rng.standard_normal((m, n), dtype=np.float32) if gated else None
    ref = REFERENCE_ACTIVATIONS[act](x.astype(np.float64) @ w.astype(np.float64).T + bias)
    if gated:
        ref = ref * gate
    for path in _paths(kernel):
        status, y = _run(kernel, path, x, w, bias, gate=gate, act=cpu_f32_gemm.ACTIVATIONS[act], packed=gated)
        assert status == 0
        assert_close(y, ref.astype(np.float32), f"path {cpu_f32_gemm.PATHS[path]} {act} gated={gated}")


def test_activations_are_accurate_over_a_wide_range(kernel):
    """Each activation on inputs from -12 to 12 (x = I, w = the values as a column): tails and the
    erf polynomial's switch point included."""
    v = np.concatenate([np.linspace(-12, 12, 4001), [-0.921875, 0.921875, 0.0]]).astype(np.float32)
    x = np.ones((1, 1), np.float32)
    w = v.reshape(-1, 1).copy()
    for name, code in cpu_f32_gemm.ACTIVATIONS.items():
        ref = REFERENCE_ACTIVATIONS[name](v.astype(np.float64))
        for path in _paths(kernel):
            status, y = _run(kernel, path, x, w, act=code)
            assert status == 0
            err = np.abs(y[0] - ref)
            assert err.max() <= 2e-6 * max(1.0, np.abs(ref).max()), (name, path, float(err.max()), v[err.argmax()])


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_weights_match_numpy(kernel, shape):
    """bf16 weights (a bf16 library on a CPU without bf16 arithmetic): the same GEMM on the weights'
    bf16 values, widened exactly; k tails of every vector width (1, 7, 96, 250, ...)."""
    import ml_dtypes

    rng, x, w = _inputs(shape, seed=3)
    m, n, _ = shape
    w16 = w.astype(ml_dtypes.bfloat16)
    bias = rng.standard_normal(n, dtype=np.float32)
    residual = rng.standard_normal((m, n), dtype=np.float32)
    ref = x.astype(np.float64) @ w16.astype(np.float64).T + bias + residual
    for path in _paths(kernel):
        y = np.full((m, n), np.nan, dtype=np.float32)
        status = kernel.mlcv_f32_linear_path(
            path, BF16, x.ctypes.data, w16.ctypes.data, bias.ctypes.data, None, residual.ctypes.data, None, y.ctypes.data,
            m, n, shape[2], 0,
        )  # fmt: skip
        assert status == 0
        assert_close(y, ref.astype(np.float32), f"bf16 weights, path {cpu_f32_gemm.PATHS[path]} {shape}")


@pytest.mark.parametrize("shape", [(5, 70, 7), (37, 64, 250), (300, 200, 530), (1100, 70, 40), (9, 40, 9000)])
@pytest.mark.parametrize("biases", [(True, True, True), (True, False, True), (False, True)])
@pytest.mark.parametrize("kind", [STORED, BF16, PACKED], ids=["stored", "bf16", "packed"])
def test_linear_group_matches_numpy(kernel, shape, biases, kind):
    """Two or three linear layers of one input as one job (a layer's q, k and v): each output as its
    own GEMM would give, a part without a bias included; row and column tails inside each part;
    weights as stored, in bf16, or packed once beforehand."""
    import ml_dtypes

    rng, x, _ = _inputs(shape, seed=4)
    m, n, k = shape
    weights = [(rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)).astype(np.float32) for _ in biases]
    if kind == BF16:
        weights = [w.astype(ml_dtypes.bfloat16) for w in weights]
    bias = [rng.standard_normal(n, dtype=np.float32) if has else None for has in biases]
    refs = [x.astype(np.float64) @ w.astype(np.float64).T + (b if b is not None else 0) for w, b in zip(weights, bias)]
    ptr = lambda a: None if a is None else a.ctypes.data  # noqa: E731
    pad = [None] * (3 - len(biases))
    for path in _paths(kernel):
        ys = [np.full((m, n), np.nan, dtype=np.float32) for _ in biases]
        given = [_pack(kernel, path, w) for w in weights] if kind == PACKED else weights
        status = kernel.mlcv_f32_linear_group_path(
            path, kind, len(biases), ptr(x), *[ptr(w) for w in given], *pad, *[ptr(b) for b in bias], *pad,
            *[ptr(y) for y in ys], *pad, m, n, k,
        )  # fmt: skip
        assert status == 0
        for i, (y, ref) in enumerate(zip(ys, refs)):
            assert_close(y, ref.astype(np.float32), f"part {i} of {biases}, kind={kind}, path {path} {shape}")


def test_linear_group_refuses_one_part(kernel):
    _, x, w = _inputs((4, 8, 16))
    y = np.zeros((4, 8), np.float32)
    args = [x.ctypes.data, w.ctypes.data, None, None, None, None, None, y.ctypes.data, None, None, 4, 8, 16]
    assert kernel.mlcv_f32_linear_group_path(0, 0, 1, *args) != 0
    assert kernel.mlcv_f32_linear_group_path(0, 0, 4, *args) != 0


def test_packed_weights_for_another_path_or_shape_are_refused(kernel):
    """Weights packed for one path, or for another shape, are refused by the others (status -2), not
    read in the wrong layout; packing refuses a misaligned buffer and a path this CPU lacks."""
    _, x, w = _inputs((4, 40, 24))
    y = np.zeros((4, 40), np.float32)
    for packed_for in _paths(kernel):
        packed = _pack(kernel, packed_for, w)
        for path in _paths(kernel):
            status = kernel.mlcv_f32_linear_path(path, PACKED, x.ctypes.data, packed.ctypes.data, None, None, None, None,
                                                 y.ctypes.data, 4, 40, 24, 0)  # fmt: skip
            assert status == (0 if path == packed_for else -2), (packed_for, path)
        # read as a [30, 24] weight (its header at the same place): another shape
        status = kernel.mlcv_f32_linear_path(packed_for, PACKED, x.ctypes.data, packed.ctypes.data, None, None, None,
                                             None, y.ctypes.data, 4, 30, 24, 0)  # fmt: skip
        assert status == -2
    buffer = _aligned_floats(kernel.mlcv_f32_packed_floats(40, 24) + 1)
    assert kernel.mlcv_f32_pack_weights_path(0, w.ctypes.data, buffer[1:].ctypes.data, 40, 24) == -1
    assert kernel.mlcv_f32_pack_weights_path(7, w.ctypes.data, buffer.ctypes.data, 40, 24) == -1


def test_bad_arguments_are_refused(kernel):
    _, x, w = _inputs((4, 8, 16))
    r = np.zeros((4, 8), np.float32)
    assert _run(kernel, 0, x, w, act=99)[0] != 0
    assert _run(kernel, 0, x, w, residual=r, gate=r)[0] != 0
    assert _run(kernel, 7, x, w)[0] != 0


def test_kernel_objects_are_cached_between_exports(tmp_path, monkeypatch):
    """The export keeps compiled kernels in $MLC_VISION_CACHE_DIR: a second compile of the same source
    reuses the object; an unwritable cache directory means no cache (compiled afresh), not an error."""
    from mlc_vision.compiler.kernels import c_objects

    monkeypatch.setenv(c_objects.CACHE_ENV, str(tmp_path / "cache"))
    directory = c_objects.object_cache_dir()
    assert directory == tmp_path / "cache" / "c-objects"
    obj = cpu_f32_gemm.compile_object(directory)
    stamp = obj.stat().st_mtime_ns
    assert cpu_f32_gemm.compile_object(directory) == obj and obj.stat().st_mtime_ns == stamp
    assert [p.name for p in directory.iterdir()] == [obj.name]  # no temporary left behind
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(c_objects.CACHE_ENV, str(tmp_path / "file"))
    assert c_objects.object_cache_dir() is None


def test_best_path_and_cache_sizes(kernel):
    assert kernel.mlcv_f32_path_supported(kernel.mlcv_f32_best_path())
    assert 256 * 1024 <= kernel.mlcv_f32_l2_bytes() <= 64 * 1024 * 1024


def _attention_reference(q, k, v, scale):
    q, k, v = (a.astype(np.float64).transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, H, S, D]
    s = scale * q @ k.transpose(0, 1, 3, 2)
    p = np.exp(s - s.max(-1, keepdims=True))
    return ((p / p.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3)


#: (batch, seq, heads, head_dim): one token; a seq that is neither a multiple of the 48-query block
#: nor of the 64-key tile (the last key tile computing 1, 2, 3 or 4 vectors of 16 keys: 197, 90, 100,
#: 50); head dims of every register tile (1, 2, 4, 5, 8 vectors) and with tails.
ATTENTION_SHAPES = [(1, 1, 1, 8), (2, 50, 3, 16), (1, 197, 2, 64), (2, 61, 2, 72), (1, 100, 1, 128), (1, 7, 2, 20),
                    (1, 90, 2, 64)]  # fmt: skip


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_matches_numpy(kernel, shape):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    scale = 1.0 / math.sqrt(shape[3])
    ref = _attention_reference(q, k, v, scale)
    for path in _paths(kernel):
        out = np.full(shape, np.nan, np.float32)
        ptr = lambda a: a.ctypes.data  # noqa: E731
        assert kernel.mlcv_f32_attention_path(path, ptr(q), ptr(k), ptr(v), ptr(out), *shape, scale) == 0
        assert_close(out, ref.astype(np.float32), f"attention path {cpu_f32_gemm.PATHS[path]} {shape}")


def test_attention_refuses_head_dims_over_128(kernel):
    q = np.zeros((1, 2, 1, 136), np.float32)
    assert kernel.mlcv_f32_attention_path(0, q.ctypes.data, q.ctypes.data, q.ctypes.data, q.ctypes.data, 1, 2, 1, 136, 1.0) != 0


def test_primfunc_rejects_residual_with_gate():
    with pytest.raises(ValueError):
        cpu_f32_gemm.linear_primfunc(1, 8, 8, bias=False, residual=True, gate=True)


# ---- the pass ---------------------------------------------------------------------------------

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
LAYERS = TINY["num_hidden_layers"]


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from parity import randomize_all

    model = randomize_all(CLIPVisionModel(CLIPVisionConfig(**TINY)), seed=0)
    ckpt = tmp_path_factory.mktemp("clip-f32-ckpt")
    model.save_pretrained(ckpt)
    return ckpt


def _calls(config, cpu: str | None = None) -> list[str]:
    """The kernels an fp32 CPU library of ``config`` launches (``cpu``: LLVM's CPU name, default this one)."""
    from mlc_vision.bench import kernel_calls
    from mlc_vision.compiler.module import build_module
    from mlc_vision.compiler.pipeline import relax_pipeline
    from mlc_vision.compiler.targets import cpu_target

    built = build_module(config, "float32", "cpu", cpu=cpu)
    target = cpu_target(built.metadata["cpu"])
    return kernel_calls(relax_pipeline("cpu", target, built.metadata["attention"], f32_gemm=True)(built.mod))


def _needs_vector_path():
    from mlc_vision.compiler.targets import cpu_spec

    if not cpu_f32_gemm.has_vector_path(cpu_spec()["features"]):
        pytest.skip("this CPU has neither AVX-512F nor AVX2 + FMA: fp32 libraries keep the TIR GEMM")


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu", "gelu_pytorch_tanh"])
def test_fp32_linear_layers_call_the_kernel(clip_checkpoint, hidden_act):
    """On an AVX-512 or AVX2 CPU every linear layer of an fp32 library is the C kernel; the residual adds
    and the MLP's activation are its epilogues (no add or activation kernel left for them)."""
    from mlc_vision.checkpoint.resolve import resolve_config

    _needs_vector_path()
    config = dataclasses.replace(resolve_config(clip_checkpoint), select_layer=-1, feature="cls_patch", hidden_act=hidden_act)
    calls = _calls(config)
    linear = [c for c in calls if c.startswith("f32_linear")]
    assert len(linear) == 1 + 4 * LAYERS  # patch embedding + (q, k, v), out, fc1, fc2
    assert len([c for c in linear if c.startswith("f32_linear_group3_") and c.endswith("_bias")]) == LAYERS
    assert len([c for c in linear if "_bias" in c]) == 4 * LAYERS  # the patch embedding has no bias
    assert len([c for c in linear if c.endswith("_residual")]) == 2 * LAYERS
    epilogue = {"quick_gelu": "_quick_gelu", "gelu": "_gelu", "gelu_pytorch_tanh": "_gelu_tanh"}[hidden_act]
    assert len([c for c in linear if c.endswith(epilogue)]) == LAYERS
    assert not [c for c in calls if ("gelu" in c or "sigmoid" in c) and not c.startswith("f32_linear")]
    assert not [c for c in calls if "NT_matmul" in c]
    # attention: the C kernel's, not the TIR fused one
    assert len([c for c in calls if c.startswith("f32_attention")]) == LAYERS
    assert not [c for c in calls if c.startswith("attention")]


def test_cpu_without_avx2_keeps_the_tir_gemm(clip_checkpoint):
    from mlc_vision.checkpoint.resolve import resolve_config

    config = dataclasses.replace(resolve_config(clip_checkpoint), select_layer=-1, feature="cls_patch")
    calls = _calls(config, cpu="x86-64-v2")
    assert not [c for c in calls if c.startswith("f32_linear")]
    assert [c for c in calls if "matmul" in c]


def test_avx2_cpu_calls_the_kernel(clip_checkpoint):
    """A library built for an AVX2 + FMA CPU (``--cpu haswell``) calls the kernel, whatever this CPU is."""
    from mlc_vision.checkpoint.resolve import resolve_config

    config = dataclasses.replace(resolve_config(clip_checkpoint), select_layer=-1, feature="cls_patch")
    calls = _calls(config, cpu="haswell")
    assert len([c for c in calls if c.startswith("f32_linear")]) == 1 + 4 * LAYERS
    assert len([c for c in calls if c.startswith("f32_attention")]) == LAYERS


def test_prepacked_twins_read_weights_packed_once(clip_checkpoint):
    """With ``prepack`` every entry keeps its kernels and gets a ``_prepacked`` twin whose linear layers
    read packed weights and pack none; ``prepack_params`` packs each linear layer's weights once for all
    the twins (patch embedding, q, k, v, out, fc1, fc2)."""
    from mlc_vision.bench import kernel_calls
    from mlc_vision.checkpoint.resolve import resolve_config
    from mlc_vision.compiler.module import build_module
    from mlc_vision.compiler.pipeline import relax_pipeline
    from mlc_vision.compiler.targets import cpu_target

    _needs_vector_path()
    config = dataclasses.replace(resolve_config(clip_checkpoint), select_layer=-1, feature="cls_patch")
    built = build_module(config, "float32", "cpu", expose_hidden_states=True)
    prepack = built.metadata["prepack"]
    assert prepack["entries"] == {name: f"{name}_prepacked" for name in ("encode", "encode_rgb8", "hidden_states")}
    pipeline = relax_pipeline("cpu", cpu_target(built.metadata["cpu"]), "fused", f32_gemm=True, prepack=True)
    mod = pipeline(built.mod)
    for entry, twin in prepack["entries"].items():
        plain = [c for c in kernel_calls(mod, entry) if c.startswith("f32_")]
        packed = [c for c in kernel_calls(mod, twin) if c.startswith("f32_")]
        assert [c.removesuffix("_packed") for c in packed] == plain, entry
        assert len([c for c in packed if c.endswith("_packed")]) == 1 + 4 * LAYERS
        assert not [c for c in plain if c.endswith("_packed") or c.startswith("f32_pack")]
    packing = kernel_calls(mod, prepack["function"])
    assert len(packing) == 1 + 6 * LAYERS and all(c.startswith("f32_pack_weights_") for c in packing)


def test_bf16_libraries_have_no_prepack():
    from mlc_vision.compiler.module import prepack_metadata

    features = {"features": ["avx2", "fma"]}
    assert prepack_metadata("bfloat16", features, ["encode"]) is None
    assert prepack_metadata("float32", {"features": ["sse4.2"]}, ["encode"]) is None
    assert prepack_metadata("float32", features, ["encode"]) == {
        "function": "prepack_params", "entries": {"encode": "encode_prepacked"}}  # fmt: skip


def test_prepacked_library_equals_its_entries(clip_checkpoint, tmp_path, monkeypatch):
    """A built library: each twin on the packed params gives exactly what its entry gives on the params
    as loaded (same kernels and sums, only the packing moved), and ``VisionEncoder`` calls the twins;
    where a packed copy would not fit in the memory left, it warns and calls the entries."""
    import tvm

    from mlc_vision.checkpoint.resolve import resolve_config
    from mlc_vision.runtime import memory
    from mlc_vision.runtime.encoder import VisionEncoder
    from parity import CompiledCPU, convert_checkpoint

    _needs_vector_path()
    config = dataclasses.replace(resolve_config(clip_checkpoint), select_layer=-1, feature="cls_patch")
    params_dir = convert_checkpoint(clip_checkpoint, tmp_path / "params")
    lib = CompiledCPU(config, params_dir, "float32", tmp_path)
    # the linear layers' weights are held packed only (patch embedding [64, 192], q/k/v/out [64, 64], fc1, fc2)
    hidden, inner = TINY["hidden_size"], TINY["intermediate_size"]
    packed = sorted([cpu_f32_gemm.packed_floats(hidden, 3 * 8 * 8)] + [cpu_f32_gemm.packed_floats(hidden, hidden)] * 4 * LAYERS
                    + [cpu_f32_gemm.packed_floats(inner, hidden), cpu_f32_gemm.packed_floats(hidden, inner)] * LAYERS)  # fmt: skip
    shapes = [tuple(p.shape) for p in lib.params]
    assert sorted(s[0] for s in shapes if len(s) == 1 and s[0] in packed) == packed
    assert not [s for s in shapes if s in [(hidden, 3, 8, 8), (hidden, hidden), (inner, hidden), (hidden, inner)]]
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    tensor = tvm.runtime.tensor(x, tvm.cpu())
    raw = lib.vm["encode"](tensor, lib.loaded_params).numpy()
    np.testing.assert_array_equal(lib.encode(x), raw)
    for ours, theirs in zip(lib.hidden_states(x), lib.vm["hidden_states"](tensor, lib.loaded_params)):
        np.testing.assert_array_equal(ours, theirs.numpy())
    np.testing.assert_array_equal(VisionEncoder(lib.lib_path, params_dir).encode_pixels(x), raw)
    np.testing.assert_array_equal(VisionEncoder(lib.lib_path, params_dir, prepack=False).encode_pixels(x), raw)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1 << 20)
    with pytest.warns(UserWarning, match="not packed at load"):
        short_of_memory = VisionEncoder(lib.lib_path, params_dir)
    assert not short_of_memory._loaded_params().packed
    np.testing.assert_array_equal(short_of_memory.encode_pixels(x), raw)


#: Where the C file keeps a packed weight's register-tile width: the header after the panels
#: (``F32_PACK_HEADER_FLOATS``: magic, nr, N, K as int64).
PACK_HEADER_NR = 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_library_linking_the_emulated_kernel_runs_avx512(clip_checkpoint, tmp_path, monkeypatch, dtype):
    """A whole library linking the emulated build of the fp32 kernel (tests/kernel_builds.py), which
    takes its AVX-512 path on any CPU: an fp32 library's weights packed at load into 64-column panels
    (the packed header says so) and its twins reading them; a bf16 library's weights widened from bf16
    by the AVX-512 packing. Both give what the library with the native kernel gives."""
    from mlc_vision.checkpoint.resolve import resolve_config
    from parity import CompiledCPU, convert_checkpoint

    _needs_vector_path()
    config = dataclasses.replace(resolve_config(clip_checkpoint), select_layer=-1, feature="cls_patch")
    params_dir = convert_checkpoint(clip_checkpoint, tmp_path / "params", dtype=dtype)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    cpu = "haswell"  # AVX2 + FMA, no bf16 arithmetic: a bf16 library's linear layers are this kernel's too
    native = CompiledCPU(config, params_dir, dtype, tmp_path / "native", cpu=cpu).encode(x)
    obj = emulated_object(cpu_f32_gemm.SOURCE, tmp_path)
    monkeypatch.setattr(cpu_f32_gemm, "compile_object", lambda workdir: obj)
    lib = CompiledCPU(config, params_dir, dtype, tmp_path / "emulated", cpu=cpu)
    if dtype == "float32":
        hidden = TINY["hidden_size"]
        packed = next(p.numpy() for p in lib.params if p.shape == (cpu_f32_gemm.packed_floats(hidden, hidden),))
        header = packed[-cpu_f32_gemm.PACK_HEADER_FLOATS :].view(np.int64)
        assert header[PACK_HEADER_NR] == 64, "the weights were not packed for the AVX-512 path (64-column tile)"
    assert_close(np.asarray(lib.encode(x), np.float32), np.asarray(native, np.float32),
                 f"{dtype} library, emulated AVX-512 kernel against the native one", dtype)  # fmt: skip


def test_pipeline_calls_the_kernel_only_when_asked(clip_checkpoint):
    """A plain ``tvm.compile`` with our pipeline links no C object: it keeps the TIR GEMM."""
    from mlc_vision.bench import kernel_calls
    from mlc_vision.checkpoint.resolve import resolve_config
    from mlc_vision.compiler.module import build_module
    from mlc_vision.compiler.pipeline import relax_pipeline
    from mlc_vision.compiler.targets import cpu_target

    _needs_vector_path()
    built = build_module(resolve_config(clip_checkpoint), "float32", "cpu")
    calls = kernel_calls(relax_pipeline("cpu", cpu_target(built.metadata["cpu"]), "fused")(built.mod))
    assert not [c for c in calls if c.startswith("f32_linear")]


def test_kernel_is_linked_exactly_for_avx512_and_avx2_cpu_libraries():
    from mlc_vision.compiler.export import needs_f32_kernel

    assert needs_f32_kernel("cpu", {"dtype": "float32", "cpu": {"features": ["avx2", "avx512f"]}})
    assert needs_f32_kernel("cpu", {"dtype": "float32", "cpu": {"features": ["avx2", "fma"]}})
    assert not needs_f32_kernel("cpu", {"dtype": "float32", "cpu": {"features": ["avx2"]}})
    assert not needs_f32_kernel("cpu", {"dtype": "float32", "cpu": {"features": ["sse4.2"]}})
    assert not needs_f32_kernel("cuda", {"dtype": "float32"})


def test_swiglu_with_symbolic_rows_is_one_gated_kernel(tmp_path):
    """Qwen2.5's tower (symbolic patch count): gate and up projections with SiLU and the product in
    the gate kernel's epilogue; down projection adds the residual."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from mlc_vision.checkpoint.resolve import resolve_config

    _needs_vector_path()
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=32, vocab_size=64, bos_token_id=0, eos_token_id=1)  # fmt: skip
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, out_hidden_size=24, fullatt_block_indexes=[1])  # fmt: skip
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).save_pretrained(tmp_path)
    calls = _calls(resolve_config(str(tmp_path)))
    gated = [c for c in calls if c.startswith("f32_linear") and c.endswith("_gated_silu")]
    assert len(gated) == vision["depth"]
    assert not [c for c in calls if "silu" in c and not c.startswith("f32_linear")]


def test_layer_scale_and_residual_are_one_kernel(tmp_path):
    """DINOv2's ``x + ls * f(x)``: the attention output projection and fc2 scale their columns and
    add the residual in the epilogue (no multiply or add kernel left for them)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from mlc_vision.checkpoint.resolve import resolve_config

    _needs_vector_path()
    torch.manual_seed(0)
    layers = 2
    config = Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, image_size=56, patch_size=14,
                          mlp_ratio=2)  # fmt: skip
    Dinov2Model(config).save_pretrained(tmp_path)
    calls = _calls(dataclasses.replace(resolve_config(str(tmp_path)), select_layer=-1))
    scaled = [c for c in calls if c.startswith("f32_linear") and c.endswith("_bias_scale_residual")]
    assert len(scaled) == 2 * layers
    assert not [c for c in calls if "multiply" in c]
