"""A vectorizable fp32 ``exp`` as a TIR expression.

LLVM turns ``llvm.exp`` on a vector into one scalar ``expf`` call per element;
the attention softmax of a ViT-L/14-336 needs 128 M of them per image. This
range-reduced polynomial vectorizes and is used by the CPU legalizers
(softmax, sigmoid, exp) and by the fused CPU attention kernel.
"""

from __future__ import annotations

from tvm import tirx

F32 = "float32"
EXP_MAX_ARG = 88.3762626647949  # exp overflows fp32 just above, underflows to 0 just below -87.3
# ln 2 split in a short head (exact in fp32 times a small n) and a tail.
LN2_HEAD = 0.693359375
LN2_TAIL = -2.12194440e-4
LOG2_E = 1.44269504088896341
# Cephes expf: p(r) = 1 + r + r^2 * (c0 r^5 + ... + c5).
POLYNOMIAL = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def exp_f32(x):
    """``exp(x)`` for fp32: ``2^n * p(r)`` with ``n = round(x / ln 2)``, ``r = x - n ln 2``.

    Max relative error < 5e-7 on [-87, 88] (tests/test_cpu_schedule.py); it
    flushes to 0 below about -87.3, where ``expf`` underflows too.
    """
    x = tirx.max(tirx.min(x, tirx.const(EXP_MAX_ARG, F32)), tirx.const(-EXP_MAX_ARG, F32))
    n = tirx.floor(x * tirx.const(LOG2_E, F32) + tirx.const(0.5, F32))
    r = x - n * tirx.const(LN2_HEAD, F32)
    r = r - n * tirx.const(LN2_TAIL, F32)
    p = tirx.const(POLYNOMIAL[0], F32)
    for c in POLYNOMIAL[1:]:
        p = p * r + tirx.const(c, F32)
    p = p * r * r + r + tirx.const(1.0, F32)
    bits = tirx.shift_left(n.astype("int32") + tirx.const(127, "int32"), tirx.const(23, "int32"))
    return p * tirx.reinterpret(F32, bits)


def exp(x):
    """``exp_f32`` for fp32 expressions, TIR's ``exp`` for any other dtype."""
    return exp_f32(x) if str(x.ty) == F32 else tirx.exp(x)
