"""Lower ``R.nn.attention`` to matmul -> softmax -> matmul (every target, after any fused kernel).

TVM 0.27's own legalization of ``R.nn.attention`` multiplies fp16 scores by a
float32 scale and the next matmul then fails to type-check, so every pipeline
splits what no fused kernel took. Our CPU GEMM rule and dlight's GPU matmul
rule then schedule the two batched matmuls.

* ``split_attention``: permute to ``[b, h, s, d]``, ``matmul(q, k^T) * scale``,
  softmax, ``matmul(p, v)``, permute back.
* ``split_attention_cuda`` (``--attention tensorcore``): no permutes (the
  matmuls index ``[b, s, h, d]`` directly) and our warp-per-row softmax
  (``kernels/warp_softmax.py``); the matmuls reach tensor cores through
  ``schedules/gpu.py``.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..kernels.warp_softmax import supports as warp_softmax_supports
from ..kernels.warp_softmax import warp_softmax_kernel
from .relax_rewrite import ATTENTION_OP, rewrite_relax_functions, static_int


def _scores_te(q, k):
    """``[b, s, h, d] x [b, t, h, d] -> [b, h, s, t]``: Q·K^T per head, read in the projections' layout.

    The Relax split permutes q, k and v to ``[b, h, s, d]`` first: three
    transpose kernels per layer (and one for the output). dlight's matmul rule
    finds batch (b, h), rows, columns and reduction from the indices, so the
    matmul can read the strided layout itself (a row of head_dim values stays
    contiguous), and the permutes disappear.
    """
    from tvm import te

    d = te.reduce_axis((0, q.shape[3]), name="d")
    shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    return te.compute(shape, lambda n, h, i, j: te.sum(q[n, i, h, d] * k[n, j, h, d], axis=d), name="scores")


def _context_te(p, v):
    """``[b, h, s, t] x [b, t, h, d] -> [b, s, h, d]``: P·V written straight in the output layout."""
    from tvm import te

    t = te.reduce_axis((0, p.shape[3]), name="t")
    shape = (p.shape[0], p.shape[2], p.shape[1], v.shape[3])
    return te.compute(shape, lambda n, i, h, c: te.sum(p[n, h, i, t] * v[n, t, h, c], axis=t), name="context")


@relax.expr_functor.mutator
class _AttentionSplitter(relax.PyExprMutator):  # pylint: disable=abstract-method
    """``R.nn.attention(q, k, v)`` (no bias, no causal mask) ->
    permute -> matmul(q, k^T) * scale -> softmax -> matmul(., v) -> permute."""

    def __init__(self, mod, cuda: bool = False):
        super().__init__(mod)
        self.op = tvm.ir.Op.get(ATTENTION_OP)
        self.cuda = cuda
        self.softmax_kernels = {}

    def softmax(self, s):
        """``softmax(s, axis=-1)``: our warp-per-row kernel on CUDA where it applies, else the Relax op."""
        ty = s.ty
        dims = [static_int(x) for x in ty.shape.values[1:]] if ty.shape is not None and ty.ndim == 4 else [None]
        if not self.cuda or None in dims or not warp_softmax_supports(dims[-1], ty.dtype):
            return relax.op.nn.softmax(s, axis=-1)
        key = (*dims, ty.dtype)
        if key not in self.softmax_kernels:
            name = "warp_softmax_h{}_s{}_n{}_{}".format(*key)
            self.softmax_kernels[key] = self.builder_.add_func(warp_softmax_kernel(*key), name)
        return relax.call_tir(self.softmax_kernels[key], [s], ty)

    def visit_call_(self, call):  # noqa: D102
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or not call.op.same_as(self.op) or len(call.args) != 3:
            return call
        if call.attrs.causal_mask is not None:
            return call
        q, k, v = call.args
        qty = q.ty
        if qty.ndim != 4 or not all(isinstance(a.ty, relax.TensorType) for a in (k, v)):
            return call
        d = qty.shape[3]
        scale = call.attrs.scale
        if scale is None:
            if static_int(d) is None:
                return call
            scale = 1.0 / float(static_int(d)) ** 0.5
        else:
            scale = float(scale)
        op = relax.op
        if self.cuda:
            # No permutes: the two matmuls index [batch, seq, heads, head_dim] directly.
            s = self.builder_.emit_te(_scores_te, q, k, primfunc_name_hint="attn_scores_matmul")
            s = self.builder_.emit(op.multiply(s, relax.const(scale, qty.dtype)))
            p = self.builder_.emit(self.softmax(s))
            return self.builder_.call_te(_context_te, p, v, primfunc_name_hint="attn_context_matmul")
        perm = [0, 2, 1, 3]
        qt = self.builder_.emit(op.permute_dims(q, perm))
        kt = self.builder_.emit(op.permute_dims(k, perm))
        vt = self.builder_.emit(op.permute_dims(v, perm))
        s = self.builder_.emit(op.matmul(qt, op.permute_dims(kt, [0, 1, 3, 2])))
        s = self.builder_.emit(op.multiply(s, relax.const(scale, qty.dtype)))
        p = self.builder_.emit(self.softmax(s))
        o = self.builder_.emit(op.matmul(p, vt))
        return op.permute_dims(o, perm)


@tvm.transform.module_pass(opt_level=0, name="SplitAttention")
def split_attention(mod, _ctx):
    """Module pass wrapping ``_AttentionSplitter`` (Relax functions only)."""
    return _split(mod, cuda=False)


@tvm.transform.module_pass(opt_level=0, name="SplitAttentionCUDA")
def split_attention_cuda(mod, _ctx):
    """The split for ``--attention tensorcore`` on CUDA (``gpu_relax_pipeline`` picks it).

    * No permutes: the two matmuls index q, k, v and the output in
      ``[batch, seq, heads, head_dim]`` (``_scores_te``, ``_context_te``).
    * The softmax is our warp-per-row kernel (``kernels/warp_softmax.py``):
      dlight's schedule was 10-12 % of the H100 time (a 256-thread block per
      row, three passes over global memory, fp16 max and sum); ours reads the
      row once into registers and reduces in fp32 with warp shuffles.
    * The matmuls reach tensor cores through ``schedules/gpu.py``.
    """
    return _split(mod, cuda=True)


def _split(mod, cuda: bool):
    return rewrite_relax_functions(mod, _AttentionSplitter(mod, cuda=cuda))
