"""The fused CPU attention kernel (compiler/kernels/cpu_attention.py): numerics against numpy on shapes
that hit every tail (tokens not a multiple of the query or key tiles, head_dim not a multiple
of 16), and that the CPU pipeline uses it only where it applies."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from mlc_vision.compiler.pipeline import relax_pipeline
from mlc_vision.compiler.kernels.cpu_attention import TILE_Q, _half_tile_rows, cpu_attention_kernel
from test_fused_attention import reference


def run_kernel(batch, seq, heads, head_dim, scale, seed=0):
    func = cpu_attention_kernel(seq, heads, head_dim, scale)
    target = tvm.target.Target.from_device("cpu")
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((batch, seq, heads, head_dim)).astype("float32") for _ in range(3))
    out = tvm.runtime.tensor(np.full_like(q, np.nan))  # every element must be written
    lib["main"](*(tvm.runtime.tensor(x) for x in (q, k, v)), out)
    return out.numpy(), reference(q, k, v, scale)


@pytest.mark.parametrize(
    "batch,seq,heads,head_dim",
    [
        (2, 50, 2, 24),  # head_dim padded to 32
        (1, 197, 3, 64),  # CLIP-B/16 tokens: a partial query tile and key tile
        (3, 65, 2, 72),  # SigLIP so400m head_dim (80 padded, 2-row register tiles)
        (1, 49, 1, 128),  # 1-row register tiles; one token past a query tile
        (2, TILE_Q, 2, 16),  # exactly one query tile
        (1, 1, 1, 64),  # a single token
    ],
)
def test_kernel_matches_numpy(batch, seq, heads, head_dim):
    ours, ref = run_kernel(batch, seq, heads, head_dim, head_dim**-0.5)
    assert not np.isnan(ours).any()
    np.testing.assert_allclose(ours, ref, atol=2e-6 * np.abs(ref).max(), rtol=0)


def test_large_scores_stay_finite():
    """Scores of +-200 (a sharp softmax) must neither overflow exp nor lose the max row."""
    ours, ref = run_kernel(1, 70, 2, 32, scale=8.0, seed=3)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_register_tiles_stay_on_the_stack():
    """Each half of a register tile is under TVM's 1 KiB stack limit and within 24 vectors."""
    for head_dim in (16, 24, 64, 72, 80, 96, 112, 128):
        padded = (head_dim + 15) // 16 * 16
        rows = _half_tile_rows(padded)
        assert rows * padded * 4 < 1024 and 2 * rows * (padded // 16) <= 24
        assert TILE_Q % (2 * rows) == 0


def attention_module(dtype: str, causal: bool = False) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    shape = (tvm.tirx.Var("batch", "int64"), 20, 2, 16)
    q, k, v = (relax.Var(n, relax.TensorType(shape, dtype)) for n in "qkv")
    with bb.function("main", [q, k, v]):
        out = bb.emit(relax.op.nn.attention(q, k, v, causal_mask="TopLeft" if causal else None))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("dtype,causal,fused", [("float32", False, True), ("float16", False, False), ("float32", True, False)])
def test_pipeline_fuses_plain_fp32_attention_only(dtype, causal, fused):
    target = tvm.target.Target.from_device("cpu")
    mod = relax_pipeline("cpu", target, "fused")(attention_module(dtype, causal))
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert any(n.startswith("attention_s20_h2_d16") for n in names) == fused, names
    if dtype == "float16":  # still split into matmul -> softmax -> matmul
        assert any("softmax" in n for n in names), names
