"""Row softmax of the attention scores on CUDA: one warp per row, the row held in registers.

The split attention path (``attention.split_attention``) writes the scores
``[batch, heads, seq, seq]`` to global memory; the softmax over them was 10-12 %
of the CUDA time on an H100 (CLIP-L/336 and InternViT at batch 32). dlight's
``GeneralReduction`` rule gives every row a block of 256 threads that reads the
row from global memory three times (max, sum of exp, normalize) and keeps the
max and the sum in fp16. Our kernel:

* one warp per row, ``ROWS`` rows per block (``threadIdx.y``); lane ``t`` holds
  elements ``t, t + 32, t + 64, ...`` of its row in ``float32`` registers
  (``ceil(seq / 32)`` of them: 19 for 577 tokens, 33 for 1025), so the row is
  read once and written once, both coalesced;
* max and sum are reduced across the warp with ``__shfl_xor_sync`` (no shared
  memory, no ``__syncthreads``), in ``float32``;
* blocks: ``blockIdx.x`` walks ``batch x heads`` (batch is symbolic),
  ``blockIdx.y`` the tiles of ``ROWS`` query rows.

Only the last axis is reduced and only static ``heads``, ``seq`` and row length
are supported: that is what the attention split produces.
"""

from __future__ import annotations

from tvm.script import tirx as T

WARP = 32
ROWS = 4  # rows (warps) per thread block
MAX_ROW = 4096  # 128 registers per lane: beyond this the row would spill
NEG = -1.0e30  # padding lanes; finite, so exp(NEG - max) is 0 and never nan


def supports(row: int, dtype: str) -> bool:
    """Whether :func:`warp_softmax_kernel` handles rows of ``row`` elements in ``dtype``."""
    return 0 < row <= MAX_ROW and dtype in ("float16", "float32")


def warp_softmax_kernel(heads: int, rows: int, row: int, dtype: str):
    """A PrimFunc ``(x, y)``: ``y = softmax(x, axis=-1)``, both ``[batch, heads, rows, row]``, batch symbolic."""
    if not supports(row, dtype):
        raise ValueError(f"warp softmax supports rows of 1..{MAX_ROW} fp16/fp32 elements (got {row}, {dtype})")
    H, S, N, R = heads, rows, row, ROWS
    per_lane = (N + WARP - 1) // WARP
    steps = [16, 8, 4, 2, 1]  # butterfly: after these xor shuffles every lane holds the warp's result

    @T.prim_func(private=True, s_tir=True)
    def kernel(x_h: T.handle, y_h: T.handle):
        # op_pattern 8 (opaque): never fused with its neighbours.
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        b = T.int64()
        X = T.match_buffer(x_h, (b, H, S, N), dtype)
        Y = T.match_buffer(y_h, (b, H, S, N), dtype)
        # A root block, as scheduled TIR has: Relax's reshape detection (one input,
        # one output of the same shape) expects one.
        with T.sblock("root"):
            for bh in T.thread_binding(b * H, thread="blockIdx.x"):
                for rt in T.thread_binding((S + R - 1) // R, thread="blockIdx.y"):
                    for ty in T.thread_binding(R, thread="threadIdx.y"):
                        for tx in T.thread_binding(WARP, thread="threadIdx.x"):
                            vals = T.alloc_buffer((per_lane,), "float32", scope="local")
                            acc = T.alloc_buffer((2,), "float32", scope="local")  # max, sum
                            if rt * R + ty < S:  # a whole warp is in or out: the shuffles see all 32 lanes
                                for i in T.unroll(per_lane):
                                    vals[i] = T.if_then_else(
                                        i * WARP + tx < N,
                                        T.cast(X[bh // H, bh % H, rt * R + ty, T.min(i * WARP + tx, N - 1)], "float32"),
                                        T.float32(NEG),
                                    )
                                acc[0] = T.float32(NEG)
                                for i in T.unroll(per_lane):
                                    acc[0] = T.max(acc[0], vals[i])
                                for s in T.unroll(len(steps)):
                                    acc[0] = T.max(
                                        acc[0],
                                        T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), acc[0], 16 >> s, WARP, WARP),
                                    )
                                acc[1] = T.float32(0)
                                for i in T.unroll(per_lane):
                                    vals[i] = T.exp(vals[i] - acc[0])
                                    acc[1] = acc[1] + vals[i]
                                for s in T.unroll(len(steps)):
                                    acc[1] = acc[1] + T.tvm_warp_shuffle_xor(
                                        T.tvm_warp_activemask(), acc[1], 16 >> s, WARP, WARP
                                    )
                                acc[1] = T.float32(1) / acc[1]
                                for i in T.unroll(per_lane):
                                    if i * WARP + tx < N:
                                        Y[bh // H, bh % H, rt * R + ty, i * WARP + tx] = T.cast(vals[i] * acc[1], dtype)

    return kernel
