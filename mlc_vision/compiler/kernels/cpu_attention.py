"""Fused attention for the CPU: the scores of a tile of queries never leave the core's cache.

Split attention (matmul -> softmax -> matmul) writes ``[batch, heads, seq, seq]``
scores to memory and reads them back twice: for InternViT's 1025 tokens that is
67 MB per image per layer, and the softmax alone cost a third of the attention
time, moving bytes. Here one task is (image, head, tile of ``TILE_Q`` queries):

* ``scores[TILE_Q, seq]`` = q_tile . k^T, in register tiles of ``rows x 64``
  keys (k is first transposed to ``[batch, heads, head_dim, seq]`` and scaled,
  so 64 consecutive keys are 4 AVX-512 vectors);
* a row softmax in place (max, exp, sum; vectorized exp from fast_exp.py), the
  normalization deferred to the output;
* out[rows, head_dim] = p . v / sum, again a register tile (v rows are
  contiguous ``head_dim`` floats in the ``[batch, seq, heads, head_dim]`` layout).

The scores tile is ``TILE_Q x seq x 4`` bytes (200 KB for 1025 tokens), in L2.
Tasks run on TVM's thread pool; q, k, v and the output stay in the
``[batch, seq, heads, head_dim]`` layout that ``R.nn.attention`` takes, so no
permutes around it. fp32 only (the CPU library's dtype); other dtypes and
masked/causal attention keep the split lowering.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .fast_exp import exp_f32

KEYS = 64  # keys per register tile: 4 x 16 fp32 lanes
ACCUMULATORS = 24  # vector registers given to one register tile (of 32)
TILE_Q = 48  # queries per task: a multiple of every register tile's rows (6, 4, 2)
NEG = -1.0e30  # score of a padding key; exp() makes it 0
MAX_HEAD_DIM = 128  # larger head dims keep the split lowering (a v row would exceed 8 vectors)
STACK_BYTES = 1024  # TVM puts a CPU buffer on the stack (registers, after LLVM) only below this size


def _half_tile_rows(row_floats: int) -> int:
    """Rows of each of the two halves of a register tile (``rows x row_floats`` fp32 each).

    A register tile is two buffers: TVM gives a "global" buffer under
    STACK_BYTES a stack slot that LLVM promotes to registers, and sends bigger
    ones (or any "local" one) to the workspace allocator, where every update is
    a load and a store. Both halves together stay within ACCUMULATORS vectors.
    """
    vectors = (row_floats + 15) // 16
    fits = [r for r in (3, 2, 1) if r * row_floats * 4 < STACK_BYTES and 2 * r * vectors <= ACCUMULATORS]
    return fits[0] if fits else 1


def cpu_attention_kernel(seq: int, heads: int, head_dim: int, scale: float):
    """A scheduled PrimFunc ``(q, k, v, out)``, all fp32 ``[batch, seq, heads, head_dim]``, batch symbolic."""
    S, H, D = seq, heads, head_dim
    SP = (S + KEYS - 1) // KEYS * KEYS  # keys padded to whole register tiles
    QR = _half_tile_rows(KEYS)  # 3: q . k^T tiles are 2 x 3 rows x 64 keys
    DP = (D + 15) // 16 * 16  # v rows padded to whole vectors (SigLIP's 72 -> 80)
    VR = _half_tile_rows(DP)  # 3 for d64, 2 for d72..96, 1 for d112..128
    assert TILE_Q % (2 * QR) == 0 and TILE_Q % (2 * VR) == 0
    n_q_tiles = (S + TILE_Q - 1) // TILE_Q
    scale_f = float(scale)

    @T.prim_func(private=True)
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        b = T.int64()
        Q = T.match_buffer(q_h, (b, S, H, D), "float32")
        K = T.match_buffer(k_h, (b, S, H, D), "float32")
        V = T.match_buffer(v_h, (b, S, H, D), "float32")
        O = T.match_buffer(o_h, (b, S, H, D), "float32")
        KT = T.alloc_buffer((b * H, D, SP), "float32")
        VP = T.alloc_buffer((b * H, S, DP), "float32")
        # per head: k^T * scale (padding keys = 0; their scores are masked below), v with rows padded to DP
        for bh in T.parallel(b * H):
            for c, j in T.grid(D, SP):
                KT[bh, c, j] = T.if_then_else(
                    j < S, K[bh // H, T.min(j, S - 1), bh % H, c] * T.float32(scale_f), T.float32(0)
                )
            for j, c in T.grid(S, DP):
                VP[bh, j, c] = T.if_then_else(c < D, V[bh // H, j, bh % H, T.min(c, D - 1)], T.float32(0))
        for task in T.parallel(b * H * n_q_tiles):
            scores = T.alloc_buffer((TILE_Q, SP), "float32")
            row_sum = T.alloc_buffer((TILE_Q,), "float32")
            # scores = q . k^T (scaled), register tiles of 2 x QR rows x KEYS keys
            for r0, j0 in T.grid(TILE_Q // (2 * QR), SP // KEYS):
                lo = T.alloc_buffer((QR, KEYS), "float32")
                hi = T.alloc_buffer((QR, KEYS), "float32")
                for i in T.unroll(QR):
                    for jj in T.vectorized(KEYS):
                        lo[i, jj] = T.float32(0)
                        hi[i, jj] = T.float32(0)
                for c in range(D):
                    for i in T.unroll(QR):
                        for jj in T.vectorized(KEYS):
                            lo[i, jj] = lo[i, jj] + Q[
                                task // n_q_tiles // H,
                                T.min(task % n_q_tiles * TILE_Q + r0 * 2 * QR + i, S - 1),
                                task // n_q_tiles % H,
                                c,
                            ] * KT[task // n_q_tiles, c, j0 * KEYS + jj]
                            hi[i, jj] = hi[i, jj] + Q[
                                task // n_q_tiles // H,
                                T.min(task % n_q_tiles * TILE_Q + r0 * 2 * QR + QR + i, S - 1),
                                task // n_q_tiles % H,
                                c,
                            ] * KT[task // n_q_tiles, c, j0 * KEYS + jj]
                for i in T.unroll(QR):
                    for jj in T.vectorized(KEYS):
                        scores[r0 * 2 * QR + i, j0 * KEYS + jj] = T.if_then_else(
                            j0 * KEYS + jj < S, lo[i, jj], T.float32(NEG)
                        )
                        scores[r0 * 2 * QR + QR + i, j0 * KEYS + jj] = T.if_then_else(
                            j0 * KEYS + jj < S, hi[i, jj], T.float32(NEG)
                        )
            # softmax numerators in place; the sum divides the output later
            for r in range(TILE_Q):
                lanes = T.alloc_buffer((16,), "float32")
                top = T.alloc_buffer((2,), "float32")
                for l in T.vectorized(16):
                    lanes[l] = T.float32(NEG)
                for j0 in range(SP // 16):
                    for l in T.vectorized(16):
                        lanes[l] = T.max(lanes[l], scores[r, j0 * 16 + l])
                top[0] = lanes[0]
                for l in range(1, 16):
                    top[0] = T.max(top[0], lanes[l])
                for l in T.vectorized(16):
                    lanes[l] = T.float32(0)
                for j0 in range(SP // 16):
                    for l in T.vectorized(16):
                        scores[r, j0 * 16 + l] = exp_f32(scores[r, j0 * 16 + l] - top[0])
                        lanes[l] = lanes[l] + scores[r, j0 * 16 + l]
                top[1] = T.float32(0)
                for l in range(16):
                    top[1] = top[1] + lanes[l]
                row_sum[r] = top[1]
            # out = p . v / sum, register tiles of 2 x VR rows x DP
            for r0 in range(TILE_Q // (2 * VR)):
                lo = T.alloc_buffer((VR, DP), "float32")
                hi = T.alloc_buffer((VR, DP), "float32")
                # 16-lane vectors: LLVM keeps <16 x float> in registers, not <80 x float>
                for i, c0 in T.grid(VR, DP // 16):
                    for l in T.vectorized(16):
                        lo[i, c0 * 16 + l] = T.float32(0)
                        hi[i, c0 * 16 + l] = T.float32(0)
                for j in range(S):
                    for i in T.unroll(VR):
                        for c0 in T.unroll(DP // 16):
                            for l in T.vectorized(16):
                                lo[i, c0 * 16 + l] = (
                                    lo[i, c0 * 16 + l] + scores[r0 * 2 * VR + i, j] * VP[task // n_q_tiles, j, c0 * 16 + l]
                                )
                                hi[i, c0 * 16 + l] = (
                                    hi[i, c0 * 16 + l]
                                    + scores[r0 * 2 * VR + VR + i, j] * VP[task // n_q_tiles, j, c0 * 16 + l]
                                )
                for i in T.unroll(VR):
                    if task % n_q_tiles * TILE_Q + r0 * 2 * VR + i < S:
                        for c in T.vectorized(D):
                            O[
                                task // n_q_tiles // H, task % n_q_tiles * TILE_Q + r0 * 2 * VR + i, task // n_q_tiles % H, c
                            ] = lo[i, c] / row_sum[r0 * 2 * VR + i]
                    if task % n_q_tiles * TILE_Q + r0 * 2 * VR + VR + i < S:
                        for c in T.vectorized(D):
                            O[
                                task // n_q_tiles // H,
                                task % n_q_tiles * TILE_Q + r0 * 2 * VR + VR + i,
                                task // n_q_tiles % H,
                                c,
                            ] = hi[i, c] / row_sum[r0 * 2 * VR + VR + i]

    return kernel
