"""Segmented attention on CUDA tensor cores (``--attention flash``, fp16/bf16).

Each segmented-attention call of a native-resolution tower (see
``segment_attention.py``) whose dtype and head_dim the tensor-core flash kernel
takes becomes two kernels of ``kernels/cuda_tc_flash_attention.py``:

1. ``segment_bounds`` over the call's ids: ``[n, 2]`` int32, the first and one
   past the last position of each position's segment (binary searches; the ids
   are non-decreasing in attention order, docs/native_resolution.md);
2. the segmented flash kernel on q, k, v seen as ``[1, n, heads, head_dim]``
   (a reshape, no copy), which walks for each tile of 64 queries only the keys
   of its rows' segments.

The blocks of a tower share two id arrays (``image_ids``, ``window_ids``), so
the bounds of each are computed once per call of the library: equal
``segment_bounds`` calls are merged (common-subexpression elimination) after
the rewrite. Calls the kernel does not take (fp32, a head_dim it does not
support) stay for ``lower_segment_attention_masked``.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax

from ..kernels.cuda_tc_flash_attention import segment_bounds_kernel, supports, tc_segment_attention_kernel
from .relax_rewrite import rewrite_relax_functions, static_int
from .segment_attention import _SegmentAttentionRewriter

BOUNDS = "segment_bounds"
OPAQUE = 8  # relax OpPatternKind::kOpaque


class FlashKernels:
    """``lower(builder, q, k, v, segments)`` for the segment rewriter; PrimFuncs added once each.

    ``cpu``: the kernels' CPU builds (the same TVMScript, lanes emulated), so the whole lowering can be
    run and checked on a CPU (tests/test_segment_attention_cuda.py)."""

    def __init__(self, cpu: bool = False):
        self.kernels = {}
        self.cpu = cpu

    def _kernel(self, builder, name, make):
        # opaque: FuseOps must not merge anything into kernels that are scheduled already
        if name not in self.kernels:
            self.kernels[name] = builder.add_func(make().with_attr("op_pattern", OPAQUE), name)
        return self.kernels[name]

    def __call__(self, builder, q, k, v, segments):
        heads, head_dim = (static_int(x) for x in q.ty.shape.values[1:])
        dtype = q.ty.dtype
        if heads is None or head_dim is None or not supports(head_dim, dtype):
            return None
        if any(x.ty.dtype != dtype for x in (k, v)):
            return None
        n = q.ty.shape.values[0]
        bounds_func = self._kernel(builder, BOUNDS, lambda: segment_bounds_kernel(self.cpu))
        name = f"flash_segment_attention_h{heads}_d{head_dim}_{dtype}"
        scale = 1.0 / math.sqrt(head_dim)
        flash = self._kernel(
            builder, name, lambda: tc_segment_attention_kernel(heads, head_dim, dtype, scale, cpu=self.cpu)
        )
        bounds = builder.emit(relax.call_tir(bounds_func, [segments], relax.TensorType([n, 2], "int32")))
        batched = [builder.emit(relax.op.reshape(x, [1, n, heads, head_dim])) for x in (q, k, v)]
        out_ty = relax.TensorType([1, n, heads, head_dim], dtype)
        out = builder.emit(relax.call_tir(flash, [*batched, bounds], out_ty))
        return relax.op.reshape(out, [n, heads, head_dim])


@tvm.transform.module_pass(opt_level=0, name="LowerSegmentAttentionCUDAFlash")
def lower_segment_attention_cuda_flash(mod, _ctx):
    """Segmented attention -> segment bounds + the tensor-core flash kernel (fp16/bf16, head_dim a multiple
    of 8 up to 128); one ``segment_bounds`` call per id array."""
    return lower_with(mod, FlashKernels())


def lower_with(mod, kernels: FlashKernels):
    """``mod`` with every segmented attention that ``kernels`` takes rewritten, equal bounds calls merged."""
    mod = rewrite_relax_functions(mod, _SegmentAttentionRewriter(mod, kernels))
    return relax.transform.EliminateCommonSubexpr()(mod) if kernels.kernels else mod
