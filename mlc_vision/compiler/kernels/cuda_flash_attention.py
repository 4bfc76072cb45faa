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

It runs on CUDA cores (``--attention tensorcore``, ``passes/split_attention.py``'s
``split_attention_cuda``, is the split path with its two matmuls on tensor cores).
``passes/fuse_attention.py`` decides where it replaces ``R.nn.attention``. Phases that
touch shared memory are separate thread loops; TVM's ``ThreadSync`` pass puts
``__syncthreads()`` between them.

``cpu=True`` builds the same algorithm with serial loops and global scratch
buffers, so the numerics can be checked on the CPU against numpy: each phase is
data-parallel over the threads, so running the threads one after another within
a phase is what the GPU computes.
"""

from __future__ import annotations


from tvm.script import tirx as T


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
