"""Flash attention on tensor cores (``--attention flash``): ``mma.sync`` m16n8k16, online softmax in registers.

One thread block per (batch x head, tile of ``BLOCK_Q`` = 64 queries), four
warps; warp ``w`` owns query rows ``16 w .. 16 w + 15`` of the tile. The block
walks the keys in tiles of ``BLOCK_K`` = 64:

1. the key and value tiles arrive in shared memory by ``cp.async`` (16 bytes
   per copy; rows past the sequence and the head_dim padding are zero-filled).
   Where two stages fit in 48 KiB (head_dim <= 80) tile ``kt + 1`` is copied
   while tile ``kt`` is used; at head_dim 128 the copy of the next tile is
   issued as soon as the current one is consumed;
2. ``S = Q K^T``: Q's A fragments were loaded once (``ldmatrix.x4``) and stay in
   registers; K's B fragments come from ``ldmatrix.x4`` (K rows are the
   ``col`` layout's columns); each warp gets a 16 x 64 score tile in
   ``mma.sync`` accumulators (fp32);
3. online softmax in those registers: scale (folded with ``log2 e`` so that
   ``exp2`` is the exponential), keys past the sequence set to ``NEG``, row
   max reduced over the four lanes that share a row (two ``shfl.xor``), the
   running max ``m`` and sum ``l`` updated, the output accumulator rescaled;
4. ``O += P V``: the accumulator layout of two adjacent n8 score tiles is the
   A-fragment layout of one k16 step, so P goes from accumulator to operand
   registers without touching shared memory (cast to fp16/bf16); V's B
   fragments come from ``ldmatrix.x4.trans`` (``.x2`` for an odd last n8 tile,
   head_dim 72).

The scores never leave registers; shared memory holds only the key and value
tiles (the query tile passes through the key buffer once). ``cp.async`` and its
commit/wait are plain copies and no-ops in the CPU build below. head_dim must be a
multiple of 8 and at most 128 (64, 72, 80, 128 are the ViT sizes); the Q·K^T
reduction is padded to a multiple of 16 with zeros. Any sequence length: the
last query tile's extra rows are computed and not stored, the last key tile's
extra keys are masked.

**Segmented** (:func:`tc_segment_attention_kernel`, the native-resolution
towers): the sequence length is symbolic and a ``bounds [n, 2]`` input gives
each position's segment (:func:`segment_bounds_kernel` makes it from sorted
ids). A block walks the keys from its first row's segment start to its last
row's segment end, tiles starting at that key, and masks each score to its
row's segment (bounds of the 64 rows in shared memory: in registers they
pushed head_dim 72/80 into spills on sm_80). Everything else is the kernel
above; the dense kernel's generated code does not change.

**CPU check of the same TVMScript.** ``cpu=True`` builds this kernel with the
warp's lanes run one after another and every per-thread register array given a
thread index. The warp-wide instructions become their definitions, computed
from the *same* addresses and fragment indices: ``ldmatrix`` (lane ``8 j + r``
gives the address of row ``r`` of matrix ``j``; lane ``t`` receives elements
``(t / 4, 2 (t % 4) + e)``, transposed for ``.trans``), ``mma.sync`` (the PTX
fragment layout of m16n8k16) and the quad reduction. Every step that reads
another lane's registers is its own thread loop, so all lanes have written
them before. A wrong fragment index or address gives wrong numbers on the CPU,
not only on the GPU (``tests/test_fused_attention.py``).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

BLOCK_Q = 64  # query rows per block: 16 per warp
BLOCK_K = 64  # keys per step
WARPS = 4
WARP = 32
THREADS = WARPS * WARP
MAX_HEAD_DIM = 128
SHARED_BYTES = 48 * 1024  # static shared memory per block on every CUDA GPU
DTYPES = ("float16", "bfloat16")
NEG = -1.0e30  # score of a padding key; finite, so exp2(NEG - max) is 0 and never nan
LOG2E = 1.4426950408889634
VEC = 8  # elements per 16-byte copy
PTX_TYPE = {"float16": "fp16", "bfloat16": "bf16"}


def supports(head_dim: int, dtype: str) -> bool:
    """Whether :func:`tc_flash_attention_kernel` takes this head_dim and dtype."""
    return str(dtype) in DTYPES and head_dim % 8 == 0 and 0 < head_dim <= MAX_HEAD_DIM


def padded_head_dim(head_dim: int) -> int:
    """The Q·K^T reduction length: head_dim rounded up to the mma's k of 16."""
    return (head_dim + 15) // 16 * 16


def row_stride(head_dim: int) -> int:
    """Shared-memory row length in elements: 8 more than needed, so the 8 row
    addresses of one ``ldmatrix`` matrix fall in 8 different 16-byte bank groups."""
    return padded_head_dim(head_dim) + 8


def tile_bytes(head_dim: int) -> int:
    """One key tile and one value tile in shared memory (2-byte elements)."""
    return 2 * BLOCK_K * row_stride(head_dim) * 2


def kv_stages(head_dim: int) -> int:
    """Key/value tiles in shared memory: 2 (the next one arrives by ``cp.async`` while this one is
    used) where both fit in the 48 KiB of static shared memory, else 1 (head_dim 128)."""
    return 2 if 2 * tile_bytes(head_dim) <= SHARED_BYTES else 1


def shared_bytes(head_dim: int, segmented: bool = False) -> int:
    """Static shared memory per block (segmented: plus each query row's segment bounds, two int32)."""
    return kv_stages(head_dim) * tile_bytes(head_dim) + (2 * BLOCK_Q * 4 if segmented else 0)


def ldmatrix_lane_address(lane, row0, col0, stride, col_matrix_fast: bool):
    """Shared-memory offset that ``lane`` hands to ``ldmatrix.x4``: row ``lane % 8`` of matrix ``lane // 8``.

    The four 8 x 8 matrices cover a 16 x 16 tile at ``(row0, col0)``.
    ``col_matrix_fast``: matrices 0, 1 are the left and right halves of the top
    rows (K's B fragments: one n8 tile's two k halves); otherwise matrices 0, 1
    are the top and bottom halves of the left columns (Q's A fragment, and V
    through ``.trans``).
    """
    matrix, r = lane // 8, lane % 8
    if col_matrix_fast:
        return (row0 + r + 8 * (matrix // 2)) * stride + col0 + 8 * (matrix % 2)
    return (row0 + r + 8 * (matrix % 2)) * stride + col0 + 8 * (matrix // 2)


def tc_flash_attention_kernel(seq: int, heads: int, head_dim: int, dtype: str, scale: float, cpu: bool = False):
    """A PrimFunc ``(q, k, v, out)``, all ``[batch, seq, heads, head_dim]`` in ``dtype``, batch symbolic."""
    return _flash_kernel(seq, heads, head_dim, dtype, scale, cpu, segmented=False)


def tc_flash_attention_packed_kernel(seq: int, heads: int, head_dim: int, dtype: str, scale: float, cpu: bool = False):
    """A PrimFunc ``(qkv, out)``: ``qkv [batch, seq, 3, heads, head_dim]`` is one projection whose output
    channels are ``q | k | v`` (what one QKV GEMM writes), ``out [batch, seq, heads, head_dim]``.

    The kernel reads q, k and v in place as strided views of ``qkv`` (each row
    ``3 heads head_dim`` elements long), so nothing splits the projection into
    three tensors first. Everything else is :func:`tc_flash_attention_kernel`.
    """
    return _flash_kernel(seq, heads, head_dim, dtype, scale, cpu, segmented=False, packed=True)


def tc_segment_attention_kernel(heads: int, head_dim: int, dtype: str, scale: float, cpu: bool = False):
    """A PrimFunc ``(q, k, v, bounds, out)``: attention within segments, the sequence length symbolic.

    q, k, v, out ``[batch, n, heads, head_dim]`` in ``dtype`` (batch and ``n``
    symbolic); ``bounds [n, 2]`` int32: the first position of each position's
    segment and one past its last (:func:`segment_bounds_kernel`). Query ``i``
    attends to the keys ``bounds[i, 0] <= j < bounds[i, 1]``. A query tile
    walks only the keys from its first row's segment start to its last row's
    segment end (segments are contiguous runs), so a layer of windows costs
    about ``n x window`` scores, not ``n x n``.
    """
    return _flash_kernel(None, heads, head_dim, dtype, scale, cpu, segmented=True)


def _flash_kernel(seq, heads: int, head_dim: int, dtype: str, scale: float, cpu: bool, segmented: bool,
                  packed: bool = False):
    """The kernel of every entry: a static ``seq`` (every key), or ``segmented`` (``seq`` symbolic, key
    ranges from the ``bounds`` input); ``packed``: q, k, v read from one ``[batch, seq, 3, heads, head_dim]``
    input."""
    dtype = str(dtype)  # Relax hands a PrimType
    if not supports(head_dim, dtype):
        raise ValueError(
            f"tensor-core flash attention takes fp16/bf16 and head_dim a multiple of 8 up to {MAX_HEAD_DIM} "
            f"(got {head_dim}, {dtype})"
        )
    # ``N``: the buffers' sequence length; ``S``: the same in index arithmetic (int32: fewer registers)
    N = tvm.tirx.Var("n", "int64") if segmented else seq
    S = tvm.tirx.Cast("int32", N) if segmented else seq
    H, D = heads, head_dim
    DK = padded_head_dim(D)
    DS = row_stride(D)
    NK16 = DK // 16  # k16 steps of Q·K^T
    NS = BLOCK_K // 8  # n8 score tiles per warp and key tile
    ND8 = D // 8  # n8 output tiles
    ND16 = ND8 // 2  # pairs of output tiles loaded by one ldmatrix.x4.trans
    n_q_tiles = (S + BLOCK_Q - 1) // BLOCK_Q
    ROW_BOUNDS = (2 * BLOCK_Q,)  # segmented: first and one-past-last key of each row's segment
    n_k_tiles = (S + BLOCK_K - 1) // BLOCK_K
    copies = (BLOCK_K * DK // VEC + THREADS - 1) // THREADS  # 16-byte copies per thread per tile
    NT = THREADS
    STAGES = kv_stages(D)
    TILE = BLOCK_K * DS  # elements of one key (or value) tile in shared memory
    ptx = PTX_TYPE[dtype]
    scale_log2 = float(scale) * LOG2E
    shared = "global" if cpu else "shared"
    local = "global" if cpu else "local"
    # Registers: a GPU thread's local array is its own; the CPU build keeps one row per thread.
    own, rows = (1, NT) if cpu else (0, 1)
    unroll = T.serial if cpu else T.unroll

    def grid_axis(n, tag):
        return T.serial(n) if cpu else T.thread_binding(n, thread=tag)

    def threads():
        return T.serial(NT) if cpu else T.thread_binding(NT, thread="threadIdx.x")

    def q_address(lane, warp, kc):
        return ldmatrix_lane_address(lane, warp * 16, kc * 16, DS, False)

    def k_address(lane, j2, kc):
        return ldmatrix_lane_address(lane, j2 * 16, kc * 16, DS, True)

    def v_address(lane, kc, n16):
        return ldmatrix_lane_address(lane, kc * 16, n16 * 16, DS, False)

    # ---- the keys a block walks: all of them, or (segmented) its rows' segments ----

    def query_row(qt, tx, r):
        """The sequence position of row ``g + 8 r`` of lane ``tx``'s warp in query tile ``qt``."""
        return qt * BLOCK_Q + tx // WARP * 16 + tx % WARP // 4 + 8 * r

    def key_start(krange, tx):
        """The first key of the block's range (``krange``: this thread's copy of the range)."""
        return krange[tx * own, 0] if segmented else 0

    def key_end(krange, tx):
        return krange[tx * own, 1] if segmented else S

    def key_tiles(krange):
        """Key tiles the block walks (read outside the thread loops: thread 0's copy, the same in all)."""
        return (krange[0, 1] - krange[0, 0] + BLOCK_K - 1) // BLOCK_K if segmented else n_k_tiles

    def key_valid(key, rowb, tx, r):
        """Whether row ``g + 8 r`` of lane ``tx`` attends to ``key``: inside the sequence, or inside its
        segment (``rowb``: the tile's segment bounds in shared memory, two per row)."""
        if segmented:
            row = tx // WARP * 16 + tx % WARP // 4 + 8 * r
            return tvm.tirx.all(rowb[2 * row] <= key, key < rowb[2 * row + 1])
        return key < S

    # ---- warp-wide instructions: PTX on the GPU, their definition on the CPU ----

    @T.macro
    def barrier():
        if not cpu:
            T.evaluate(T.tvm_storage_sync("shared"))

    @T.macro
    def ldmatrix(frag, off, smem, base, tx, num, trans, address, a1, a2):
        """``frag[off:off + 2 num]`` of each lane <- ``ldmatrix.x{num}[.trans]``; lane ``l`` gives
        ``base + address(l, a1, a2)``."""
        if cpu:
            for j, e in T.grid(num, 2):
                if trans:
                    frag[tx, off + 2 * j + e] = smem[
                        base + address(8 * j + 2 * (tx % WARP % 4) + e, a1, a2) + tx % WARP // 4
                    ]
                else:
                    frag[tx, off + 2 * j + e] = smem[
                        base + address(8 * j + tx % WARP // 4, a1, a2) + 2 * (tx % WARP % 4) + e
                    ]
        else:
            T.evaluate(
                T.ptx_legacy.ldmatrix(
                    trans, num, ".b16", frag.data, off, smem.data, base + address(tx % WARP, a1, a2), dtype=dtype
                )
            )

    @T.macro
    def mma(c, c_off, a, a_off, b, b_off, tx):
        """``c[c_off:c_off+4] += A(16x16) B(16x8)`` with the m16n8k16 fragment layouts (row.col)."""
        if cpu:
            for i, kk in T.grid(4, 16):
                # lane tx holds C(row, col); A(row, kk) and B(kk, col) live in these lanes and slots
                c[tx, c_off + i] = c[tx, c_off + i] + T.cast(
                    a[
                        tx // WARP * WARP + 4 * ((tx % WARP // 4 + 8 * (i // 2)) % 8) + kk % 8 // 2,
                        a_off + 2 * ((tx % WARP // 4 + 8 * (i // 2)) // 8 + 2 * (kk // 8)) + kk % 2,
                    ],
                    "float32",
                ) * T.cast(
                    b[tx // WARP * WARP + 4 * (2 * (tx % WARP % 4) + i % 2) + kk % 8 // 2, b_off + 2 * (kk // 8) + kk % 2],
                    "float32",
                )
        else:
            T.evaluate(
                T.ptx_legacy.mma(
                    "m16n8k16", "row", "col", ptx, ptx, "fp32",
                    a.data, a_off, b.data, b_off, c.data, c_off, False, dtype="float32",
                )  # fmt: skip
            )

    @T.macro
    def quad_reduce(dst, src, tx, combine):
        """``dst[.., r] = combine`` over the 4 lanes of a quad (they hold the same two rows) of ``src[.., r]``."""
        for r in range(2):
            if cpu:
                dst[tx, r] = combine(
                    combine(src[tx // 4 * 4, r], src[tx // 4 * 4 + 1, r]),
                    combine(src[tx // 4 * 4 + 2, r], src[tx // 4 * 4 + 3, r]),
                )
            else:
                dst[0, r] = combine(src[0, r], T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), src[0, r], 1, WARP, WARP))
                dst[0, r] = combine(dst[0, r], T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), dst[0, r], 2, WARP, WARP))

    def add(x, y):
        return x + y

    # ---- the kernel ----

    @T.macro
    def copy_tile(dst, base, src, bh, row0, end, tx):
        """``dst[base + r DS + c] = src[batch, row0 + r, head, c]`` for a 64 x DK tile; zeros from row ``end``
        on and past head_dim."""
        for i in T.unroll(copies):
            if i * NT + tx < BLOCK_K * DK // VEC:
                r = (i * NT + tx) // (DK // VEC)
                c8 = (i * NT + tx) % (DK // VEC)
                if row0 + r < end and c8 < D // VEC:
                    for e in T.vectorized(VEC):
                        dst[base + r * DS + c8 * VEC + e] = src[bh // H, row0 + r, bh % H, c8 * VEC + e]
                else:
                    for e in T.vectorized(VEC):
                        dst[base + r * DS + c8 * VEC + e] = T.cast(0, dtype)

    @T.macro
    def copy_tile_async(dst, base, src, bh, row0, end, tx):
        """``copy_tile`` into ``dst[base:]`` by ``cp.async`` (16 bytes, zero-filled from row ``end`` on and past
        head_dim), one commit group; on the CPU a plain copy."""
        if cpu:
            copy_tile(dst, base, src, bh, row0, end, tx)
        else:
            for i in T.unroll(copies):
                if i * NT + tx < BLOCK_K * DK // VEC:
                    T.evaluate(
                        T.ptx["cp.async.cg.shared.global"](
                            T.address_of(dst[base + (i * NT + tx) // (DK // VEC) * DS + (i * NT + tx) % (DK // VEC) * VEC]),
                            T.address_of(
                                src[
                                    bh // H,
                                    T.min(row0 + (i * NT + tx) // (DK // VEC), S - 1),
                                    bh % H,
                                    T.min((i * NT + tx) % (DK // VEC), D // VEC - 1) * VEC,
                                ]
                            ),
                            16,
                            T.cast(
                                T.if_then_else(
                                    row0 + (i * NT + tx) // (DK // VEC) < end and (i * NT + tx) % (DK // VEC) < D // VEC,
                                    16,
                                    0,
                                ),
                                "uint32",
                            ),
                        )
                    )

    @T.macro
    def commit():
        if not cpu:
            T.evaluate(T.ptx["cp.async.commit_group"]())

    @T.macro
    def wait(pending):
        """Until at most ``pending`` commit groups of this thread are in flight."""
        if not cpu:
            T.evaluate(T.ptx["cp.async.wait_group"](pending))

    @T.macro
    def key_ranges(krange, rowb, bounds, qt, tx):
        """Segmented: the block's key range (first row's segment start, last row's segment end) in this
        thread's registers, and each row's segment bounds in shared memory (in shared memory they cost
        no registers across the key loop; rows past the sequence take the last one's)."""
        if segmented:
            krange[tx * own, 0] = bounds[qt * BLOCK_Q, 0]
            krange[tx * own, 1] = bounds[T.min(qt * BLOCK_Q + BLOCK_Q - 1, S - 1), 1]
            if tx < BLOCK_Q:
                for e in T.unroll(2):
                    rowb[2 * tx + e] = bounds[T.min(qt * BLOCK_Q + tx, S - 1), e]

    @T.macro
    def attention(Q, K, V, O, bounds):
        for bh in grid_axis(Q.shape[0] * H, "blockIdx.y"):
            for qt in grid_axis(n_q_tiles, "blockIdx.x"):
                Ks = T.alloc_buffer((STAGES * TILE,), dtype, scope=shared)
                Vs = T.alloc_buffer((STAGES * TILE,), dtype, scope=shared)
                q_frag = T.alloc_buffer((rows, NK16 * 8), dtype, scope=local)  # A fragments of Q, all k16 steps
                k_frag = T.alloc_buffer((rows, 8), dtype, scope=local)  # B fragments of two n8 key tiles
                v_frag = T.alloc_buffer((rows, 8), dtype, scope=local)  # B fragments of two n8 head_dim tiles
                p_frag = T.alloc_buffer((rows, 8), dtype, scope=local)  # A fragment of P, one k16 step
                s_acc = T.alloc_buffer((rows, NS * 4), "float32", scope=local)
                o_acc = T.alloc_buffer((rows, ND8 * 4), "float32", scope=local)
                stat = T.alloc_buffer((rows, 4), "float32", scope=local)  # running max, sum of rows g, g + 8
                part = T.alloc_buffer((rows, 2), "float32", scope=local)  # this lane's share of a row reduction
                full = T.alloc_buffer((rows, 2), "float32", scope=local)  # the quad's
                # segmented: the block's keys, each row's segment (dense: unused registers, which vanish)
                krange = T.alloc_buffer((rows, 2), "int32", scope=local)
                rowb = T.alloc_buffer(ROW_BOUNDS if segmented else (1,), "int32", scope=shared if segmented else local)
                # the query tile passes through Ks into registers
                for tx in threads():
                    key_ranges(krange, rowb, bounds, qt, tx)
                    copy_tile(Ks, 0, Q, bh, qt * BLOCK_Q, S, tx)
                barrier()
                for kc in unroll(NK16):
                    for tx in threads():
                        ldmatrix(q_frag, kc * 8, Ks, 0, tx, 4, False, q_address, tx // WARP, kc)
                barrier()  # every warp has its Q fragments: Ks may be refilled
                for tx in threads():
                    copy_tile_async(Ks, 0, K, bh, key_start(krange, tx), key_end(krange, tx), tx)
                    copy_tile_async(Vs, 0, V, bh, key_start(krange, tx), key_end(krange, tx), tx)
                    commit()
                for tx in threads():
                    for i in T.unroll(ND8 * 4):
                        o_acc[tx * own, i] = T.float32(0)
                    for r in T.unroll(2):
                        stat[tx * own, r] = T.float32(NEG)
                        stat[tx * own, 2 + r] = T.float32(0)
                for kt in T.serial(key_tiles(krange)):
                    # tile kt arrived (with two stages, tile kt + 1 is on its way meanwhile)
                    for tx in threads():
                        if STAGES == 2:
                            if kt + 1 < key_tiles(krange):
                                copy_tile_async(
                                    Ks, (kt + 1) % 2 * TILE, K, bh, key_start(krange, tx) + (kt + 1) * BLOCK_K,
                                    key_end(krange, tx), tx,
                                )  # fmt: skip
                                copy_tile_async(
                                    Vs, (kt + 1) % 2 * TILE, V, bh, key_start(krange, tx) + (kt + 1) * BLOCK_K,
                                    key_end(krange, tx), tx,
                                )  # fmt: skip
                            commit()
                            wait(1)
                        else:
                            wait(0)
                    barrier()
                    for tx in threads():
                        for i in T.unroll(NS * 4):
                            s_acc[tx * own, i] = T.float32(0)
                    # S = Q K^T: two n8 key tiles per ldmatrix.x4
                    for j2 in unroll(NS // 2):
                        for kc in unroll(NK16):
                            for tx in threads():
                                ldmatrix(k_frag, 0, Ks, kt % STAGES * TILE, tx, 4, False, k_address, j2, kc)
                            for tx in threads():
                                mma(s_acc, 8 * j2, q_frag, 8 * kc, k_frag, 0, tx)
                                mma(s_acc, 8 * j2 + 4, q_frag, 8 * kc, k_frag, 4, tx)
                    # scale, mask the keys outside the sequence (segmented: outside the row's segment),
                    # this lane's row maxima
                    for tx in threads():
                        for r in T.unroll(2):
                            part[tx * own, r] = T.float32(NEG)
                        for i in T.unroll(NS * 4):
                            s_acc[tx * own, i] = T.if_then_else(
                                key_valid(
                                    key_start(krange, tx) + kt * BLOCK_K + i // 4 * 8 + 2 * (tx % WARP % 4) + i % 2,
                                    rowb, tx, i % 4 // 2,
                                ),
                                s_acc[tx * own, i] * T.float32(scale_log2),
                                T.float32(NEG),
                            )  # fmt: skip
                            part[tx * own, i % 4 // 2] = T.max(part[tx * own, i % 4 // 2], s_acc[tx * own, i])
                    for tx in threads():
                        quad_reduce(full, part, tx, T.max)
                    # online softmax: new max, rescale the sum and the output, p = exp2(s - max). A row whose
                    # keys so far were all masked has max NEG and sums exp2(0) terms; its first real key
                    # rescales them by exp2(NEG - max) = 0.
                    for tx in threads():
                        for r in T.unroll(2):
                            full[tx * own, r] = T.max(full[tx * own, r], stat[tx * own, r])  # new max
                            part[tx * own, r] = T.exp2(stat[tx * own, r] - full[tx * own, r])  # rescale factor
                            stat[tx * own, r] = full[tx * own, r]
                            stat[tx * own, 2 + r] = stat[tx * own, 2 + r] * part[tx * own, r]
                        for i in T.unroll(ND8 * 4):
                            o_acc[tx * own, i] = o_acc[tx * own, i] * part[tx * own, i % 4 // 2]
                        for i in T.unroll(NS * 4):
                            s_acc[tx * own, i] = T.exp2(s_acc[tx * own, i] - stat[tx * own, i % 4 // 2])
                            stat[tx * own, 2 + i % 4 // 2] = stat[tx * own, 2 + i % 4 // 2] + s_acc[tx * own, i]
                    # O += P V, one k16 step (two n8 score tiles) at a time
                    for kc in unroll(NS // 2):
                        for tx in threads():
                            for i in T.unroll(8):
                                p_frag[tx * own, i] = T.cast(s_acc[tx * own, kc * 8 + i], dtype)
                        for n16 in unroll(ND16):
                            for tx in threads():
                                ldmatrix(v_frag, 0, Vs, kt % STAGES * TILE, tx, 4, True, v_address, kc, n16)
                            for tx in threads():
                                mma(o_acc, 8 * n16, p_frag, 0, v_frag, 0, tx)
                                mma(o_acc, 8 * n16 + 4, p_frag, 0, v_frag, 4, tx)
                        if ND8 % 2 == 1:
                            for tx in threads():
                                ldmatrix(v_frag, 0, Vs, kt % STAGES * TILE, tx, 2, True, v_address, kc, ND16)
                            for tx in threads():
                                mma(o_acc, 4 * (ND8 - 1), p_frag, 0, v_frag, 0, tx)
                    barrier()  # every warp is done with this stage before it is refilled
                    if STAGES == 1:
                        for tx in threads():
                            if kt + 1 < key_tiles(krange):
                                copy_tile_async(
                                    Ks, 0, K, bh, key_start(krange, tx) + (kt + 1) * BLOCK_K, key_end(krange, tx), tx
                                )
                                copy_tile_async(
                                    Vs, 0, V, bh, key_start(krange, tx) + (kt + 1) * BLOCK_K, key_end(krange, tx), tx
                                )
                            commit()
                # normalize by the row sums (reduced over the quad now) and store the rows inside seq
                for tx in threads():
                    for r in T.unroll(2):
                        part[tx * own, r] = stat[tx * own, 2 + r]
                for tx in threads():
                    quad_reduce(full, part, tx, add)
                for tx in threads():
                    for i2 in T.unroll(ND8 * 2):
                        if query_row(qt, tx, i2 % 2) < S:
                            for e in T.vectorized(2):
                                O[
                                    bh // H,
                                    query_row(qt, tx, i2 % 2),
                                    bh % H,
                                    i2 // 2 * 8 + 2 * (tx % WARP % 4) + e,
                                ] = T.cast(o_acc[tx * own, i2 // 2 * 4 + i2 % 2 * 2 + e] / full[tx * own, i2 % 2], dtype)

    if segmented:

        @T.prim_func(private=True)
        def segment_kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, bounds_h: T.handle, o_h: T.handle):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            b = T.int64()
            Q = T.match_buffer(q_h, (b, N, H, D), dtype)
            K = T.match_buffer(k_h, (b, N, H, D), dtype)
            V = T.match_buffer(v_h, (b, N, H, D), dtype)
            bounds = T.match_buffer(bounds_h, (N, 2), "int32")
            O = T.match_buffer(o_h, (b, N, H, D), dtype)
            attention(Q, K, V, O, bounds)

        return segment_kernel

    if packed:
        # q, k, v: views of one row-major [b, N, 3, H, D] tensor, rows of 3 H D elements, k and v H D and
        # 2 H D elements in (16-byte aligned for cp.async: H D is a multiple of 8)
        row = 3 * H * D
        view_strides = (N * row, row, D, 1)

        @T.prim_func(private=True, check_well_formed=False)  # thread loops inside the root block
        def packed_kernel(qkv_h: T.handle, o_h: T.handle):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            b = T.int64()
            QKV = T.match_buffer(qkv_h, (b, N, 3, H, D), dtype)
            O = T.match_buffer(o_h, (b, N, H, D), dtype)
            with T.sblock("root"):  # TVM's reshape detection (one input, one output) expects a root block
                Q = T.decl_buffer((b, N, H, D), dtype, data=QKV.data, strides=view_strides, elem_offset=0)
                K = T.decl_buffer((b, N, H, D), dtype, data=QKV.data, strides=view_strides, elem_offset=H * D)
                V = T.decl_buffer((b, N, H, D), dtype, data=QKV.data, strides=view_strides, elem_offset=2 * H * D)
                attention(Q, K, V, O, None)

        return packed_kernel

    @T.prim_func(private=True)
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        b = T.int64()
        Q = T.match_buffer(q_h, (b, N, H, D), dtype)
        K = T.match_buffer(k_h, (b, N, H, D), dtype)
        V = T.match_buffer(v_h, (b, N, H, D), dtype)
        O = T.match_buffer(o_h, (b, N, H, D), dtype)
        attention(Q, K, V, O, None)

    return kernel


BOUNDS_THREADS = 256
SEARCH_STEPS = 32  # halvings that bring any int32-sized range to one position


def segment_bounds_kernel(cpu: bool = False):
    """A PrimFunc ``(ids, bounds)``: ``ids [n]`` int32 non-decreasing, ``bounds [n, 2]`` int32 the first
    position of ``ids[i]``'s run and one past its last.

    One thread per position, two binary searches over the whole ``ids`` (lower
    and upper bound of ``ids[i]``): every position independent, no scan. The
    flash kernel reads a block's key range from two rows of ``bounds`` instead
    of searching per block. Needs the ids sorted, which the native-resolution
    runtime gives in the order the blocks see the patches (images in order,
    windows numbered in window order; docs/native_resolution.md).
    """
    n = tvm.tirx.Var("n", "int64")
    local = "global" if cpu else "local"

    def axis(extent, tag):
        return T.serial(extent) if cpu else T.thread_binding(extent, thread=tag)

    @T.macro
    def search(ids, span, key, strict):
        """``span = [lo, hi)`` narrowed to the first position whose id is ``> key`` (``strict``) or ``>= key``."""
        for _ in T.serial(SEARCH_STEPS):
            if span[0] < span[1]:
                if (ids[(span[0] + span[1]) // 2] <= key) if strict else (ids[(span[0] + span[1]) // 2] < key):
                    span[0] = (span[0] + span[1]) // 2 + 1
                else:
                    span[1] = (span[0] + span[1]) // 2

    @T.prim_func(private=True, check_well_formed=False)  # thread loops inside the root block
    def bounds_kernel(ids_h: T.handle, bounds_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        ids = T.match_buffer(ids_h, (n,), "int32")
        bounds = T.match_buffer(bounds_h, (n, 2), "int32")
        with T.sblock("root"):  # TVM's reshape detection (one input, one output) expects a root block
            for blk in axis((n + BOUNDS_THREADS - 1) // BOUNDS_THREADS, "blockIdx.x"):
                for tx in axis(BOUNDS_THREADS, "threadIdx.x"):
                    if blk * BOUNDS_THREADS + tx < n:
                        span = T.alloc_buffer((2,), "int64", scope=local)
                        span[0] = T.int64(0)
                        span[1] = blk * BOUNDS_THREADS + tx
                        search(ids, span, ids[blk * BOUNDS_THREADS + tx], False)
                        bounds[blk * BOUNDS_THREADS + tx, 0] = T.cast(span[0], "int32")
                        span[0] = blk * BOUNDS_THREADS + tx + 1
                        span[1] = n
                        search(ids, span, ids[blk * BOUNDS_THREADS + tx], True)
                        bounds[blk * BOUNDS_THREADS + tx, 1] = T.cast(span[0], "int32")

    return bounds_kernel
