"""CPU schedule rules (mlc_vision/compiler/schedules/cpu.py): scheduled == unscheduled numerics.

Small shapes only (no timing): ragged token counts (5, 197), batch 1 and 3,
both attention spellings (sdpa and matmul+softmax), float16 (must not crash),
and the exported functions' signatures."""

from __future__ import annotations

import numpy as np
import pytest

import tvm
from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from mlc_vision.compiler.kernels.fast_exp import exp_f32
from mlc_vision.compiler.pipeline import relax_pipeline
from mlc_vision.compiler.schedules.cpu import GEMM, RowReduction
from parity import assert_all_close, assert_close, assert_fp32_close

TARGET = tvm.target.Target.from_device("cpu")


class _Attn(nn.Module):
    def __init__(self, d, h, sdpa):
        self.h, self.d, self.sdpa = h, d, sdpa
        self.qkv = nn.ModuleList([nn.Linear(d, d) for _ in range(3)])
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, s, _ = x.shape
        hd = self.d // self.h
        q, k, v = (op.reshape(p(x), [b, s, self.h, hd]) for p in self.qkv)
        if self.sdpa:
            o = op.scaled_dot_product_attention(q, k, v)
        else:
            q = op.permute_dims(q, [0, 2, 1, 3])
            k = op.permute_dims(k, [0, 2, 3, 1])
            v = op.permute_dims(v, [0, 2, 1, 3])
            a = op.softmax(op.matmul(q, k) * (hd**-0.5), axis=-1)
            o = op.permute_dims(op.matmul(a, v), [0, 2, 1, 3])
        return self.out(op.reshape(o, [b, s, self.d]))


class _ViT(nn.Module):
    """CLIP-shaped: reshape patch embedding, class token, pos add, pre-norm layers."""

    def __init__(self, img, p, d, h, m, layers, sdpa):
        self.img, self.p, self.d = img, p, d
        n = (img // p) ** 2
        self.patch = nn.Linear(3 * p * p, d, bias=False)
        self.cls = nn.Parameter((d,))
        self.pos = nn.Parameter((n + 1, d))
        self.pre = nn.LayerNorm(d, eps=1e-5)
        self.ln1 = nn.ModuleList([nn.LayerNorm(d, eps=1e-5) for _ in range(layers)])
        self.ln2 = nn.ModuleList([nn.LayerNorm(d, eps=1e-5) for _ in range(layers)])
        self.attn = nn.ModuleList([_Attn(d, h, sdpa) for _ in range(layers)])
        self.fc1 = nn.ModuleList([nn.Linear(d, m) for _ in range(layers)])
        self.fc2 = nn.ModuleList([nn.Linear(m, d) for _ in range(layers)])

    def _hidden(self, px):
        b = px.shape[0]
        g = self.img // self.p
        x = op.reshape(px, [b, 3, g, self.p, g, self.p])
        x = op.reshape(op.permute_dims(x, [0, 2, 4, 1, 3, 5]), [b, g * g, 3 * self.p * self.p])
        x = self.patch(x)
        cls = op.broadcast_to(op.reshape(self.cls, [1, 1, self.d]), [b, 1, self.d])
        x = self.pre(op.concat([cls, x], dim=1) + self.pos)
        hs = [x]
        for ln1, attn, ln2, fc1, fc2 in zip(self.ln1, self.attn, self.ln2, self.fc1, self.fc2):
            x = x + attn(ln1(x))
            y = fc1(ln2(x))
            x = x + fc2(y * op.sigmoid(y * 1.702))
            hs.append(x)
        return hs

    def encode(self, px):
        return self._hidden(px)[-1]

    def hidden_states(self, px):
        return tuple(self._hidden(px))


def _module(img, p, d=32, h=4, m=64, layers=2, sdpa=True, dtype="float32"):
    model = _ViT(img, p, d, h, m, layers, sdpa)
    if dtype != "float32":
        model.to(dtype)
    x = nn.spec.Tensor(["batch", 3, img, img], dtype)
    cfg = {"param_mode": "packed", "effect_mode": "none"}
    mod, params = model.export_tvm(
        {"encode": {"px": x, "$": cfg}, "hidden_states": {"px": x, "$": cfg}}
    )
    bb = relax.BlockBuilder(mod)
    with bb.function("_metadata", []):
        bb.emit_func_output(relax.expr.String('{"test": 1}'))
    rng = np.random.default_rng(0)
    pnp = []
    for name, prm in params:
        shape = [int(s) for s in prm.shape]
        scale = 0.2 if len(shape) == 2 else 0.1
        a = rng.standard_normal(shape) * scale + (1.0 if name.endswith("weight") and len(shape) == 1 else 0)
        pnp.append(a.astype(dtype))
    return bb.get(), pnp


def _run(ex, pnp, x, fn="encode"):
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    out = vm[fn](tvm.runtime.tensor(x, dev), [tvm.runtime.tensor(p, dev) for p in pnp])
    if fn == "hidden_states":
        return [o.numpy() for o in out]
    return out.numpy()


@pytest.mark.parametrize(
    "img,p,sdpa",
    [
        (16, 8, True),  # 5 tokens
        (56, 4, True),  # 197 tokens (ViT-B/16-224 analog)
        (56, 4, False),  # same, matmul + softmax attention
        (24, 4, True),  # 37 tokens
    ],
)
def test_scheduled_matches_unscheduled(img, p, sdpa):
    mod, pnp = _module(img, p, sdpa=sdpa)
    ex = tvm.compile(mod, TARGET, relax_pipeline=relax_pipeline("cpu", TARGET, "fused"))
    ref = tvm.compile(mod, TARGET)
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, img, img)).astype("float32")
        assert_fp32_close(_run(ex, pnp, x), _run(ref, pnp, x), f"scheduled encode, {img}px/{p}, batch {batch}")


def test_signatures_survive():
    mod, pnp = _module(16, 8)
    ex = tvm.compile(mod, TARGET, relax_pipeline=relax_pipeline("cpu", TARGET, "fused"))
    ref = tvm.compile(mod, TARGET)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    assert str(vm["_metadata"]()) == '{"test": 1}'
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype("float32")
    hs, hs_ref = _run(ex, pnp, x, "hidden_states"), _run(ref, pnp, x, "hidden_states")
    assert len(hs_ref) == 3 and hs_ref[0].shape == (2, 5, 32)
    assert_all_close(hs, hs_ref, "scheduled hidden_states")


def test_float16_compiles_and_runs():
    mod, pnp = _module(16, 8, dtype="float16")
    ex = tvm.compile(mod, TARGET, relax_pipeline=relax_pipeline("cpu", TARGET, "fused"))
    ref = tvm.compile(mod, TARGET)
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype("float16")
    assert_close(_run(ex, pnp, x), _run(ref, pnp, x), "scheduled fp16 encode (vs unscheduled fp16)", "float16")


@pytest.mark.parametrize("m,n,k,batched", [(5, 40, 7, False), (197, 96, 64, False), (13, 29, 33, True)])
def test_gemm_rule_ragged(m, n, k, batched):
    """GEMM rule alone: ragged M and N (padded in the kernel), symbolic batch, NT and NN."""
    bvar = tirx.Var("batch", "int64")
    m, n, k = (tirx.const(v, "int64") for v in (m, n, k))  # as LegalizeOps emits them
    a = te.placeholder((bvar, m, k), name="a")
    r = te.reduce_axis((0, k), "r")
    if batched:  # attention P.V: B[batch, k, n]
        w = te.placeholder((bvar, k, n), name="w")
        c = te.compute((bvar, m, n), lambda b, i, j: te.sum(a[b, i, r] * w[b, r, j], axis=r), name="matmul")
    else:  # linear: B[n, k]
        w = te.placeholder((n, k), name="w")
        c = te.compute((bvar, m, n), lambda b, i, j: te.sum(a[b, i, r] * w[j, r], axis=r), name="NT_matmul")
    bias = te.placeholder((n,), name="bias")
    out = te.compute((bvar, m, n), lambda b, i, j: c[b, i, j] + bias[j], name="T_add")
    func = te.create_prim_func([a, w, bias, out])
    rule = GEMM()
    rule.strict = True
    sch = rule.apply(func, TARGET, False)
    assert sch is not None
    lib = tvm.compile(sch.mod, TARGET)
    rng = np.random.default_rng(4)
    m, n, k = int(m), int(n), int(k)
    for batch in (1, 3):
        an = rng.standard_normal((batch, m, k)).astype("float32")
        wn = rng.standard_normal((batch, k, n) if batched else (n, k)).astype("float32")
        bn = rng.standard_normal((n,)).astype("float32")
        ref = (an @ wn if batched else an @ wn.T) + bn
        dev = tvm.cpu()
        o = tvm.runtime.tensor(np.zeros((batch, m, n), "float32"), dev)
        lib(*[tvm.runtime.tensor(t, dev) for t in (an, wn, bn)], o)
        np.testing.assert_allclose(o.numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width,lanes", [(48, True), (40, False)])
def test_row_reduction_sums_in_vector_lanes(width, lanes):
    """RowReduction alone on an RMSNorm-shaped row: a width that is a multiple of 16 is summed as
    16 partial sums (an ``_rf`` block), another width stays one scalar sum; both match numpy."""
    bvar = tirx.Var("batch", "int64")
    x = te.placeholder((bvar, tirx.const(5, "int64"), tirx.const(width, "int64")), name="x")
    r = te.reduce_axis((0, width), "r")
    sq = te.compute((bvar, 5), lambda b, i: te.sum(x[b, i, r] * x[b, i, r], axis=r), name="sq")
    out = te.compute(x.shape, lambda b, i, j: x[b, i, j] * tirx.rsqrt(sq[b, i] / width + 1e-6), name="norm")
    sch = RowReduction().apply(te.create_prim_func([x, out]), TARGET, False)
    assert sch is not None
    assert ('sblock("sq_rf' in sch.mod.script()) == lanes
    lib = tvm.compile(sch.mod, TARGET)
    xn = np.random.default_rng(5).standard_normal((3, 5, width)).astype("float32")
    o = tvm.runtime.tensor(np.zeros_like(xn), tvm.cpu())
    lib(tvm.runtime.tensor(xn, tvm.cpu()), o)
    ref = xn / np.sqrt((xn.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(o.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_exp_polynomial_accuracy():
    """The vectorizable exp used by softmax / sigmoid: <= 4 ulp-ish relative error."""
    x = te.placeholder((4096,), name="x")
    y = te.compute(x.shape, lambda i: exp_f32(x[i]), name="y")
    lib = tvm.compile(te.create_prim_func([x, y]), TARGET)
    xs = np.concatenate([np.linspace(-87, 88, 4000), [0, -1e-8, 1e-8, -30, 30, -0.5, 0.5]])
    xs = np.pad(xs, (0, 4096 - xs.size)).astype("float32")
    out = tvm.runtime.tensor(np.zeros(4096, "float32"), tvm.cpu())
    lib(tvm.runtime.tensor(xs, tvm.cpu()), out)
    ref = np.exp(xs.astype("float64"))
    assert (np.abs(out.numpy() - ref) / ref).max() < 5e-7
