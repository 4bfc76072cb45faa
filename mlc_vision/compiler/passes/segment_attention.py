"""Lower the segmented attention of the native-resolution towers.

``models/qwen2_vl.py`` emits attention within segments as one call,
``call_dps_packed(SEGMENT_ATTENTION, [q, k, v, segments])``: q, k, v
``[n, heads, head_dim]`` in one dtype, ``segments [n]`` int32, the output
``[n, heads, head_dim]`` = softmax(q k^T / sqrt(head_dim), keys with the
query's id only) v, the softmax in float32. No packed function of that name
exists at run time: every pipeline replaces the call before legalization.

* ``lower_segment_attention_cpu``: the C kernel of
  ``kernels/cpu_segment_attention.c`` (flash-style per segment; fp16 q, k, v
  are cast to fp32 around it), for head_dim <= 128. It needs the ids in
  contiguous runs, which the runtime's window order gives
  (docs/native_resolution.md).
* ``lower_segment_attention_masked`` (whatever is left, every target): a
  ``[n, n]`` additive mask from the ids, matmul -> float32 softmax -> matmul.
  Its cost grows with ``n^2`` for every layer, windowed or not.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from ...models.qwen2_vl import MASKED, SEGMENT_ATTENTION
from ..kernels.cpu_segment_attention import MAX_HEAD_DIM, segment_attention_primfunc
from .relax_rewrite import rewrite_relax_functions, static_int

F32 = "float32"


def segment_attention_args(call):
    """``(q, k, v, segments)`` of a segmented-attention call, else None."""
    if not isinstance(call, relax.Call) or not call.op.same_as(tvm.ir.Op.get("relax.call_dps_packed")):
        return None
    func, args = call.args[0], call.args[1]
    if not isinstance(func, relax.ExternFunc) or str(func.global_symbol) != SEGMENT_ATTENTION:
        return None
    return tuple(args.fields)


def _cast(x, dtype):
    return x if x.ty.dtype == dtype else relax.op.astype(x, dtype)


@relax.expr_functor.mutator
class _SegmentAttentionRewriter(relax.PyExprMutator):  # pylint: disable=abstract-method
    """Each segmented-attention call -> ``lower(builder, q, k, v, segments)``, unless that returns None."""

    def __init__(self, mod, lower):
        super().__init__(mod)
        self.lower = lower

    def visit_call_(self, call):  # noqa: D102
        call = super().visit_call_(call)
        args = segment_attention_args(call)
        if args is None:
            return call
        lowered = self.lower(self.builder_, *args)
        return call if lowered is None else lowered


class _CpuKernels:
    """The C kernel's PrimFunc per (heads, head_dim), added to the module once each."""

    def __init__(self):
        self.kernels = {}

    def __call__(self, builder, q, k, v, segments):
        heads, head_dim = (static_int(x) for x in q.ty.shape.values[1:])
        if heads is None or head_dim is None or head_dim > MAX_HEAD_DIM or q.ty.dtype not in (F32, "float16"):
            return None
        key = (heads, head_dim)
        if key not in self.kernels:
            func = segment_attention_primfunc(heads, head_dim, 1.0 / math.sqrt(head_dim))
            self.kernels[key] = builder.add_func(func, f"segment_attention_h{heads}_d{head_dim}")
        q32, k32, v32 = (x if x.ty.dtype == F32 else builder.emit(_cast(x, F32)) for x in (q, k, v))
        out_ty = relax.TensorType(q.ty.shape, F32)
        out = builder.emit(relax.call_tir(self.kernels[key], [q32, k32, v32, segments], out_ty))
        return _cast(out, q.ty.dtype)


def masked_segment_attention(builder, q, k, v, segments):
    """The ``[n, n]``-mask lowering: scores of every pair, keys of another segment at ``MASKED`` before the softmax."""
    op = relax.op
    dtype = q.ty.dtype
    scale = 1.0 / math.sqrt(int(q.ty.shape.values[2]))
    qh = builder.emit(op.permute_dims(q, [1, 0, 2]))
    kt = builder.emit(op.permute_dims(k, [1, 2, 0]))
    vh = builder.emit(op.permute_dims(v, [1, 0, 2]))
    scores = builder.emit(op.matmul(qh, kt))
    scores = builder.emit(_cast(scores, F32)) if scores.ty.dtype != F32 else scores
    same = builder.emit(op.equal(op.expand_dims(segments, 1), op.expand_dims(segments, 0)))
    masked = relax.const(np.full((1,), MASKED, dtype=np.float32))
    mask = builder.emit(op.expand_dims(op.where(same, relax.const(np.zeros((1,), np.float32)), masked), 0))
    probs = builder.emit(op.nn.softmax(op.add(op.multiply(scores, relax.const(scale, F32)), mask), axis=-1))
    out = builder.emit(op.matmul(_cast(probs, dtype), vh))  # [heads, n, head_dim]
    return op.permute_dims(out, [1, 0, 2])


@tvm.transform.module_pass(opt_level=0, name="LowerSegmentAttentionCPU")
def lower_segment_attention_cpu(mod, _ctx):
    """Segmented attention -> the C kernel (fp32 and fp16 libraries, head_dim <= 128)."""
    return rewrite_relax_functions(mod, _SegmentAttentionRewriter(mod, _CpuKernels()))


@tvm.transform.module_pass(opt_level=0, name="LowerSegmentAttentionMasked")
def lower_segment_attention_masked(mod, _ctx):
    """Every segmented attention still left -> the ``[n, n]`` mask lowering."""
    return rewrite_relax_functions(mod, _SegmentAttentionRewriter(mod, masked_segment_attention))
