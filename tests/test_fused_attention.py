"""Our fused attention kernel (compiler/kernels/cuda_flash_attention.py): numerics on the CPU build of the same
algorithm against numpy, and that the CUDA pipeline uses it instead of a seq x seq score matrix."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from mlc_vision.compiler.kernels.cuda_flash_attention import block_k, flash_attention_kernel


def reference(q, k, v, scale):
    q, k, v = (x.astype("float64").transpose(0, 2, 1, 3) for x in (q, k, v))
    s = q @ k.transpose(0, 1, 3, 2) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True) @ v).transpose(0, 2, 1, 3)


@pytest.mark.parametrize(
    "seq,heads,head_dim,dtype,atol",
    [
        (50, 2, 16, "float32", 1e-5),  # seq not a multiple of the tiles
        (33, 3, 64, "float32", 1e-5),
        (65, 2, 128, "float32", 1e-5),  # 16 keys per step (shared memory)
        (37, 2, 72, "float16", 3e-3),  # InternViT-6B-like head_dim
        (70, 2, 128, "float16", 3e-3),
    ],
)
def test_kernel_matches_numpy(seq, heads, head_dim, dtype, atol):
    scale = head_dim**-0.5
    func = flash_attention_kernel(seq, heads, head_dim, dtype, scale, cpu=True)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, seq, heads, head_dim)).astype(dtype) for _ in range(3))
    out = tvm.runtime.tensor(np.zeros_like(q))
    lib["main"](*(tvm.runtime.tensor(x) for x in (q, k, v)), out)
    np.testing.assert_allclose(out.numpy().astype("float64"), reference(q, k, v, scale), atol=atol, rtol=0)


def test_tiles_fit_shared_memory():
    assert block_k(64, "float16") == 32 and block_k(128, "float16") == 32
    with pytest.raises(ValueError):
        flash_attention_kernel(10, 1, 256, "float16", 1.0)


def test_cuda_split_matmuls_match_numpy():
    """The CUDA split's transpose-free matmuls (q, k, v, out in [batch, seq, heads, head_dim]) on the CPU."""
    from tvm import te

    from mlc_vision.compiler.passes.split_attention import _context_te, _scores_te

    b, seq, heads, d = 2, 13, 3, 8
    q, k, v = (te.placeholder((b, seq, heads, d), "float32", name=n) for n in "qkv")
    p = te.placeholder((b, heads, seq, seq), "float32", name="p")
    scores = _scores_te(q, k)
    context = _context_te(p, v)
    fs = tvm.compile(te.create_prim_func([q, k, scores]).with_attr("global_symbol", "main"), target="llvm")
    fc = tvm.compile(te.create_prim_func([p, v, context]).with_attr("global_symbol", "main"), target="llvm")
    rng = np.random.default_rng(0)
    qn, kn, vn = (rng.standard_normal((b, seq, heads, d)).astype("float32") for _ in range(3))
    pn = rng.standard_normal((b, heads, seq, seq)).astype("float32")
    s_out = tvm.runtime.tensor(np.zeros((b, heads, seq, seq), "float32"))
    c_out = tvm.runtime.tensor(np.zeros((b, seq, heads, d), "float32"))
    fs["main"](tvm.runtime.tensor(qn), tvm.runtime.tensor(kn), s_out)
    fc["main"](tvm.runtime.tensor(pn), tvm.runtime.tensor(vn), c_out)
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (qn, kn, vn))
    np.testing.assert_allclose(s_out.numpy(), qt @ kt.transpose(0, 1, 3, 2), atol=1e-5)
    np.testing.assert_allclose(c_out.numpy(), (pn @ vt).transpose(0, 2, 1, 3), atol=1e-5)


# ---- the tensor-core flash kernel (--attention flash), its CPU build --------------------------------------


@pytest.mark.parametrize(
    "seq,heads,head_dim,dtype,atol",
    [
        (50, 2, 64, "float16", 2e-3),  # one key tile, padded rows and keys
        (130, 1, 72, "bfloat16", 1.5e-2),  # 3 key tiles; head_dim 72: an odd n8 tile, Q·K^T padded to 80
        (70, 1, 80, "float16", 2e-3),
        (65, 1, 128, "float16", 2e-3),  # one key past a tile
        (40, 1, 112, "float16", 2e-3),  # EVA-CLIP E/14: 7 k16 steps, 14 n8 tiles
    ],
)
def test_tc_flash_kernel_matches_numpy(seq, heads, head_dim, dtype, atol):
    """The same TVMScript as the CUDA kernel, with ldmatrix, mma.sync and the quad shuffles
    computed lane by lane from their PTX definitions: wrong fragment indices fail here.

    Tolerances: P is rounded to the input dtype before P·V, as on the GPU
    (bf16 has 8 bits of mantissa)."""
    import ml_dtypes

    from mlc_vision.compiler.kernels.cuda_tc_flash_attention import tc_flash_attention_kernel

    scale = head_dim**-0.5
    func = tc_flash_attention_kernel(seq, heads, head_dim, dtype, scale, cpu=True)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    rng = np.random.default_rng(0)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    q, k, v = (rng.standard_normal((2, seq, heads, head_dim)).astype(np_dtype) for _ in range(3))
    out = tvm.runtime.tensor(np.zeros_like(q))
    lib["main"](*(tvm.runtime.tensor(x) for x in (q, k, v)), out)
    expected = reference(*(x.astype("float32") for x in (q, k, v)), scale)
    np.testing.assert_allclose(out.numpy().astype("float64"), expected, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "seq, heads, head_dim, dtype, atol",
    [(70, 2, 64, "float16", 2e-3), (40, 3, 72, "bfloat16", 2e-2), (65, 2, 128, "float16", 2e-3)],
)
def test_tc_flash_packed_kernel_matches_numpy(seq, heads, head_dim, dtype, atol):
    """The packed entry (one ``[b, seq, 3, heads, head_dim]`` projection, q | k | v) reads each of q, k, v
    at its own offset and row stride: a wrong view gives another tensor's numbers here."""
    import ml_dtypes

    from mlc_vision.compiler.kernels.cuda_tc_flash_attention import tc_flash_attention_packed_kernel

    scale = head_dim**-0.5
    func = tc_flash_attention_packed_kernel(seq, heads, head_dim, dtype, scale, cpu=True)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    qkv = np.random.default_rng(1).standard_normal((2, seq, 3, heads, head_dim)).astype(np_dtype)
    out = tvm.runtime.tensor(np.zeros((2, seq, heads, head_dim), np_dtype))
    lib["main"](tvm.runtime.tensor(qkv), out)
    q, k, v = (qkv[:, :, i].astype("float32") for i in range(3))
    np.testing.assert_allclose(out.numpy().astype("float64"), reference(q, k, v, scale), atol=atol, rtol=0)


def test_tc_flash_kernel_limits():
    from mlc_vision.compiler.kernels.cuda_tc_flash_attention import supports, tc_flash_attention_kernel

    assert all(supports(d, "float16") for d in (64, 72, 80, 128)) and supports(64, "bfloat16")
    assert not supports(64, "float32") and not supports(68, "float16") and not supports(136, "float16")
    with pytest.raises(ValueError):
        tc_flash_attention_kernel(10, 1, 68, "float16", 1.0)

