"""CPU legalizations that replace TVM's defaults for ops whose libm calls would not vectorize.

* ``exp``, ``sigmoid``, ``softmax``: the range-reduced polynomial of
  ``kernels/fast_exp.py`` (max relative error < 5e-7 in fp32) instead of one
  scalar ``expf`` call per element. The softmax keeps TVM's max / exp / sum /
  divide structure so that ``schedules/cpu.py``'s ``RowReduction`` takes it.
* ``gelu`` (erf) and ``gelu_tanh``: ``0.5 x (1 + f(arg(x)))`` with TVM's
  polynomial ``topi.fast_erf`` / ``topi.fast_tanh`` in fp32 (max abs error
  ~1e-7). With libm's ``erf`` the epilogue of InternViT's fc1 was 30 % of that
  layer's largest GEMM.

``LEGALIZE_OVERRIDES`` is the ``customize_legalize_map`` of ``LegalizeOps``.
"""

from __future__ import annotations

import math

from tvm import tirx

from ..kernels.fast_exp import exp


def _legalize_softmax(bb, call):
    from tvm import te

    axis = int(call.attrs.axis)

    def fte(x):
        nd = len(x.shape)
        ax = axis % nd
        if ax != nd - 1:
            from tvm import topi

            return topi.nn.softmax(x, axis=ax)
        k1 = te.reduce_axis((0, x.shape[-1]), "k")
        mx = te.compute(x.shape[:-1], lambda *i: te.max(x[(*i, k1)], axis=k1), name="T_softmax_maxelem")
        e = te.compute(x.shape, lambda *i: exp(x[i] - mx[i[:-1]]), name="T_softmax_exp")
        k2 = te.reduce_axis((0, x.shape[-1]), "k")
        s = te.compute(x.shape[:-1], lambda *i: te.sum(e[(*i, k2)], axis=k2), name="T_softmax_expsum")
        return te.compute(x.shape, lambda *i: e[i] / s[i[:-1]], name="T_softmax_norm")

    return bb.call_te(fte, call.args[0], primfunc_name_hint="softmax")


def _legalize_sigmoid(bb, call):
    from tvm import te

    def fte(x):
        one = tirx.const(1.0, str(x.dtype))
        return te.compute(x.shape, lambda *i: one / (one + exp(-x[i])), name="compute")

    return bb.call_te(fte, call.args[0], primfunc_name_hint="sigmoid")


def _legalize_exp(bb, call):
    from tvm import te

    return bb.call_te(lambda x: te.compute(x.shape, lambda *i: exp(x(*i)), name="compute"),
                      call.args[0], primfunc_name_hint="exp")


def _in_fp32(fn, x):
    """``fn`` of a te tensor computed in fp32 (LLVM has no fp16 erf/tanh), cast back to x's dtype."""
    from tvm import topi

    if x.dtype == "float32":
        return fn(x)
    return topi.cast(fn(topi.cast(x, "float32")), x.dtype)


def _gelu_legalizer(name: str, fn_name: str, argument):
    """Legalize a GELU as ``0.5 x (1 + fn(argument(x)))`` with TVM's polynomial ``topi.<fn_name>``.

    ``tirx.erf`` / ``tirx.tanh`` become one scalar libm call per element; in
    InternViT's fc1 epilogue that was 30 % of the layer's largest GEMM.
    ``fast_erf``/``fast_tanh`` vectorize (max abs error ~1e-7).
    """
    from tvm import te, topi

    def fte(x):
        arg = te.compute(x.shape, lambda *i: argument(x[i]), name=f"T_{name}_arg")
        y = _in_fp32(getattr(topi, fn_name), arg)
        half, one = tirx.const(0.5, x.dtype), tirx.const(1.0, x.dtype)
        return te.compute(x.shape, lambda *i: half * x[i] * (one + y[i]), name=f"T_{name}")

    return lambda bb, call: bb.call_te(fte, call.args[0], primfunc_name_hint=name)


def _erf_argument(v):
    """x / sqrt 2: exact GELU is 0.5 x (1 + erf(x / sqrt 2))."""
    return v * tirx.const(math.sqrt(0.5), v.dtype)


def _tanh_argument(v):
    """sqrt(2/pi) (x + 0.044715 x^3): tanh GELU (SigLIP's ``gelu_pytorch_tanh``)."""
    return tirx.const(math.sqrt(2 / math.pi), v.dtype) * (v + tirx.const(0.044715, v.dtype) * v * v * v)


LEGALIZE_OVERRIDES = {
    "relax.nn.gelu": _gelu_legalizer("gelu", "fast_erf", _erf_argument),
    "relax.nn.gelu_tanh": _gelu_legalizer("gelu_tanh", "fast_tanh", _tanh_argument),
    "relax.nn.softmax": _legalize_softmax,
    "relax.sigmoid": _legalize_sigmoid,
    "relax.exp": _legalize_exp,
}
