"""Fused (flash-style) attention for the GPU pipeline: no seq x seq scores in global memory.

TVM 0.27 has no fused attention we can use here (see docs/performance.md, "GPU
path"): the PyPI wheel is built without CUTLASS (no ``relax.ext.cutlass``, and
without CUTLASS's fMHA example headers), without cuDNN, and its FlashInfer path
needs the ``flashinfer`` package and targets paged KV caches. Splitting
``R.nn.attention`` into matmul -> softmax -> matmul writes the scores
``[batch, heads, seq, seq]`` to global memory and reads them back 2-3 times.

So we write the kernel ourselves, in TVMScript, with its schedule built in:

* one thread block per (batch x head, tile of ``BLOCK_Q`` queries), ``THREADS``
  threads; the block walks the keys in tiles of ``BLOCK_K``;
* q, k, v are read straight from the ``[batch, seq, heads, head_dim]`` layout
  that ``op.scaled_dot_product_attention`` takes, and the output is written in
  it (no permute kernels around it);
* scores and the online-softmax state (running max ``m``, running sum ``l``)
  live in shared memory, the output accumulator in registers (``BLOCK_Q x
  head_dim / THREADS`` floats per thread), all float32; inputs and the output
  are in the model's dtype (fp16 or fp32);
* masked (padding) keys get a large negative score, so ``exp`` makes them 0.

It runs on CUDA cores (``--attention tensorcore``, ``split_attention_cuda``
below, is the split path with its two matmuls on tensor cores). Phases that
touch shared memory are separate thread loops; TVM's ``ThreadSync`` pass puts
``__syncthreads()`` between them.

``cpu=True`` builds the same algorithm with serial loops and global scratch
buffers, so the numerics can be checked on the CPU against numpy: each phase is
data-parallel over the threads, so running the threads one after another within
a phase is what the GPU computes.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.script import tirx as T

from .softmax import supports as warp_softmax_supports
from .softmax import warp_softmax_kernel

BLOCK_Q = 32  # query rows per thread block
THREADS = 128
MAX_HEAD_DIM = 128
SHARED_BYTES = 48 * 1024  # static shared memory per block on every CUDA GPU
NEG = -1.0e30  # score of a padding key; finite, so max/exp never see inf - inf


def _threads(cpu: bool, n: int, tag: str):
    return T.serial(n) if cpu else T.thread_binding(n, thread=tag)


def shared_bytes(head_dim: int, dtype: str, block_k_: int) -> int:
    """Shared memory of one block: q, k (padded rows), v tiles, scores, p (f32), m, l, alpha."""
    elem = 2 if dtype in ("float16", "bfloat16") else 4
    tiles = (BLOCK_Q + block_k_) * (head_dim + 2) * elem + block_k_ * head_dim * elem
    return tiles + 2 * BLOCK_Q * block_k_ * 4 + 3 * BLOCK_Q * 4


def block_k(head_dim: int, dtype: str) -> int:
    """Keys per step: 32, or fewer where 32 would not fit in 48 KiB (fp32 d=128 takes 16)."""
    return next((bk for bk in (32, 16) if shared_bytes(head_dim, dtype, bk) <= SHARED_BYTES), 8)


def flash_attention_kernel(seq: int, heads: int, head_dim: int, dtype: str, scale: float, cpu: bool = False):
    """A PrimFunc ``(q, k, v, out)``, all ``[batch, seq, heads, head_dim]``, batch symbolic."""
    if head_dim > MAX_HEAD_DIM or shared_bytes(head_dim, dtype, block_k(head_dim, dtype)) > SHARED_BYTES:
        raise ValueError(f"fused attention supports head_dim <= {MAX_HEAD_DIM} in fp16 (got {head_dim}, {dtype})")
    S, H, D, BQ, BK, NT = seq, heads, head_dim, BLOCK_Q, block_k(head_dim, dtype), THREADS
    DP = D + 2  # padded row: a warp reading column c of 32 rows hits 32 banks, not one
    n_q_tiles = (S + BQ - 1) // BQ
    n_k_tiles = (S + BK - 1) // BK
    per_q = (BQ * D + NT - 1) // NT  # elements of a [BQ, D] tile per thread
    per_k = (BK * D + NT - 1) // NT
    per_s = BQ * BK // NT
    shared = "global" if cpu else "shared"
    local = "global" if cpu else "local"
    scale_f = float(scale)
    # A GPU thread's local buffer is its own; the serial CPU version keeps one row per thread.
    own, own_rows = (1, NT) if cpu else (0, 1)

    def block(n, tag):
        return _threads(cpu, n, tag)

    @T.prim_func(private=True)
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        b = T.int64()
        Q = T.match_buffer(q_h, (b, S, H, D), dtype)
        K = T.match_buffer(k_h, (b, S, H, D), dtype)
        V = T.match_buffer(v_h, (b, S, H, D), dtype)
        O = T.match_buffer(o_h, (b, S, H, D), dtype)
        for bh in block(b * H, "blockIdx.y"):
            for qt in block(n_q_tiles, "blockIdx.x"):
                Qs = T.alloc_buffer((BQ, DP), dtype, scope=shared)
                Ks = T.alloc_buffer((BK, DP), dtype, scope=shared)
                Vs = T.alloc_buffer((BK, D), dtype, scope=shared)
                Ss = T.alloc_buffer((BQ, BK), "float32", scope=shared)
                Ps = T.alloc_buffer((BQ, BK), "float32", scope=shared)
                # output accumulator: registers, thread tx owns rows/cols (i * NT + tx) // D, % D
                Oacc = T.alloc_buffer((own_rows, per_q), "float32", scope=local)
                m = T.alloc_buffer((BQ,), "float32", scope=shared)
                l = T.alloc_buffer((BQ,), "float32", scope=shared)
                alpha = T.alloc_buffer((BQ,), "float32", scope=shared)
                # load the query tile, zero the accumulator
                for tx in block(NT, "threadIdx.x"):
                    for i in T.unroll(per_q):
                        if i * NT + tx < BQ * D:
                            r = (i * NT + tx) // D
                            c = (i * NT + tx) % D
                            row = qt * BQ + r
                            Qs[r, c] = T.if_then_else(row < S, Q[bh // H, T.min(row, S - 1), bh % H, c], T.cast(0, dtype))
                            Oacc[tx * own, i] = T.float32(0)
                for tx in block(NT, "threadIdx.x"):
                    if tx < BQ:
                        m[tx] = T.float32(NEG)
                        l[tx] = T.float32(0)
                for kt in range(n_k_tiles):
                    # load the key and value tiles
                    for tx in block(NT, "threadIdx.x"):
                        for i in range(per_k):
                            if i * NT + tx < BK * D:
                                j = (i * NT + tx) // D
                                c = (i * NT + tx) % D
                                key = T.min(kt * BK + j, S - 1)
                                Ks[j, c] = K[bh // H, key, bh % H, c]
                                Vs[j, c] = V[bh // H, key, bh % H, c]
                    # scores = q . k * scale (float32), padding keys -> NEG
                    for tx in block(NT, "threadIdx.x"):
                        acc = T.alloc_buffer((1,), "float32", scope=local)
                        for i in range(per_s):
                            acc[0] = T.float32(0)
                            for c in range(D):
                                acc[0] = acc[0] + T.cast(Qs[(i * NT + tx) // BK, c], "float32") * T.cast(
                                    Ks[(i * NT + tx) % BK, c], "float32"
                                )
                            Ss[(i * NT + tx) // BK, (i * NT + tx) % BK] = T.if_then_else(
                                kt * BK + (i * NT + tx) % BK < S, acc[0] * T.float32(scale_f), T.float32(NEG)
                            )
                    # online softmax: new running max, rescale factor, p = exp(s - max)
                    for tx in block(NT, "threadIdx.x"):
                        if tx < BQ:
                            mx = T.alloc_buffer((3,), "float32", scope=local)  # max, sum, scratch
                            mx[0] = m[tx]
                            for j in range(BK):
                                mx[0] = T.max(mx[0], Ss[tx, j])
                            mx[1] = T.float32(0)
                            for j in range(BK):
                                mx[2] = T.exp(Ss[tx, j] - mx[0])
                                Ps[tx, j] = mx[2]
                                mx[1] = mx[1] + mx[2]
                            mx[2] = T.exp(m[tx] - mx[0])
                            alpha[tx] = mx[2]
                            l[tx] = l[tx] * mx[2] + mx[1]
                            m[tx] = mx[0]
                    # out = out * alpha + p @ v
                    for tx in block(NT, "threadIdx.x"):
                        for i in T.unroll(per_q):
                            if i * NT + tx < BQ * D:
                                Oacc[tx * own, i] = Oacc[tx * own, i] * alpha[(i * NT + tx) // D]
                                for j in range(BK):
                                    Oacc[tx * own, i] = Oacc[tx * own, i] + Ps[(i * NT + tx) // D, j] * T.cast(
                                        Vs[j, (i * NT + tx) % D], "float32"
                                    )
                # normalize and store
                for tx in block(NT, "threadIdx.x"):
                    for i in T.unroll(per_q):
                        if i * NT + tx < BQ * D:
                            if qt * BQ + (i * NT + tx) // D < S:
                                O[bh // H, qt * BQ + (i * NT + tx) // D, bh % H, (i * NT + tx) % D] = T.cast(
                                    Oacc[tx * own, i] / l[(i * NT + tx) // D], dtype
                                )

    return kernel


# ---------------------------------------------------------------------- Relax pass


def _static_int(expr):
    return int(expr) if isinstance(expr, tvm.tirx.IntImm) else None


def plain_attention_shape(call):
    """``(seq, heads, head_dim, dtype, scale)`` of a plain ``R.nn.attention``, else None.

    Plain: no bias, causal mask or window; q, k, v of one static shape
    ``[batch, seq, heads, head_dim]`` (batch may be symbolic) and one dtype.
    The fused kernels (this file's for CUDA, cpu_attention.py's) take exactly
    these; each adds its own limits in its ``kernel_for``.
    """
    if len(call.args) != 3 or call.attrs.causal_mask is not None:
        return None
    if getattr(call.attrs, "window_size", None) is not None:
        return None
    tys = [a.ty for a in call.args]
    if not all(isinstance(t, relax.TensorType) and t.ndim == 4 and t.shape is not None for t in tys):
        return None
    dtype = tys[0].dtype
    if any(t.dtype != dtype for t in tys):
        return None
    dims = [[_static_int(x) for x in t.shape.values[1:]] for t in tys]
    if any(dims[i] != dims[0] for i in (1, 2)) or None in dims[0]:
        return None
    seq, heads, head_dim = dims[0]
    scale = call.attrs.scale
    return seq, heads, head_dim, dtype, 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


@relax.expr_functor.mutator
class _AttentionKernelRewriter(relax.PyExprMutator):  # pylint: disable=abstract-method
    """``R.nn.attention(q, k, v)`` -> ``call_tir(kernel, [q, k, v])`` wherever ``kernel_for`` offers one.

    ``kernel_for(shape)`` takes ``plain_attention_shape``'s tuple and returns
    ``(name, make_primfunc)`` or None; one PrimFunc is added per name.
    """

    def __init__(self, mod, kernel_for):
        super().__init__(mod)
        self.op = tvm.ir.Op.get("relax.nn.attention")
        self.kernel_for = kernel_for
        self.kernels = {}

    def visit_call_(self, call):  # noqa: D102
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or not call.op.same_as(self.op):
            return call
        shape = plain_attention_shape(call)
        kernel = self.kernel_for(shape) if shape is not None else None
        if kernel is None:
            return call
        name, make = kernel
        if name not in self.kernels:
            self.kernels[name] = self.builder_.add_func(make(), name)
        return relax.call_tir(self.kernels[name], list(call.args), call.args[0].ty)


def rewrite_relax_functions(mod, mutator):
    """Run ``mutator`` (a ``relax.PyExprMutator`` built on ``mod``) over every Relax function of ``mod``."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def replace_attention(mod, kernel_for):
    """Replace every plain ``R.nn.attention`` for which ``kernel_for`` offers a kernel (others stay)."""
    return rewrite_relax_functions(mod, _AttentionKernelRewriter(mod, kernel_for))


def _cuda_kernel_for(shape):
    """This file's flash kernel: fp16/fp32 and a head_dim whose tiles fit in shared memory (<= 128)."""
    seq, heads, head_dim, dtype, _ = shape
    if dtype not in ("float16", "float32") or head_dim > MAX_HEAD_DIM:
        return None
    if shared_bytes(head_dim, dtype, block_k(head_dim, dtype)) > SHARED_BYTES:
        return None
    return f"fused_attention_s{seq}_h{heads}_d{head_dim}_{dtype}", lambda: flash_attention_kernel(*shape)


@tvm.transform.module_pass(opt_level=0, name="FuseAttentionCUDA")
def fuse_attention(mod, _ctx):
    """Replace every eligible ``R.nn.attention`` with our fused kernel (others are left as they are).

    ``gpu_relax_pipeline`` runs it only for modules built with
    ``attention="fused"`` (``--attention fused``): on an H100 it matched the
    split path (cosine 0.9999999) but was 5-50 % slower (CUDA cores only), so
    the split path stays the default.
    """
    return replace_attention(mod, _cuda_kernel_for)


# ---- the portable lowering: split into matmul / softmax / matmul ------------------------------
#
# Every target's pipeline runs this (after a fused kernel took what it can): TVM
# 0.27's own legalization of R.nn.attention multiplies fp16 scores by a float32
# scale and the next matmul fails to type-check, and our CPU GEMM rule
# schedules the resulting batched matmuls. CUDA's opt-in "tensorcore" mode uses
# its own variant (split_attention_cuda): no permutes, our softmax kernel; the
# matmuls go to tensor cores through build._matmul_rule.


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
        self.op = tvm.ir.Op.get("relax.nn.attention")
        self.cuda = cuda
        self.softmax_kernels = {}

    def softmax(self, s):
        """``softmax(s, axis=-1)``: our warp-per-row kernel on CUDA where it applies, else the Relax op."""
        ty = s.ty
        dims = [_static_int(x) for x in ty.shape.values[1:]] if ty.shape is not None and ty.ndim == 4 else [None]
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
            if _static_int(d) is None:
                return call
            scale = 1.0 / float(_static_int(d)) ** 0.5
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
    * The softmax is our warp-per-row kernel (``compiler/softmax.py``):
      dlight's schedule was 10-12 % of the H100 time (a 256-thread block per
      row, three passes over global memory, fp16 max and sum); ours reads the
      row once into registers and reduces in fp32 with warp shuffles.
    * The matmuls reach tensor cores through ``build._matmul_rule``.
    """
    return _split(mod, cuda=True)


def _split(mod, cuda: bool):
    return rewrite_relax_functions(mod, _AttentionSplitter(mod, cuda=cuda))
