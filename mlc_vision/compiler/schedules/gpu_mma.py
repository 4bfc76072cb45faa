"""CUDA fp16 matmuls on ``mma.sync`` m16n8k16 (``--gemm mma``): ldmatrix, cp.async pipeline, swizzled shared memory.

dlight's ``gpu.Matmul`` (TVM 0.27) puts fp16 matmuls on WMMA: fragments
loaded with ``wmma::load_matrix_sync`` from padded shared memory, the global
-> shared copies synchronous. :class:`MatmulMMA` schedules the same
normalized matmul ``C[b, i, j] += A[b, i, k] * B[b, j, k]`` (plus whatever
epilogue FuseOps fused in: bias, GELU, residual) with TVM's MMA tensor
intrinsics (``s_tir/tensor_intrin/cuda.py``):

* block tile ``BLOCK_M x BLOCK_N`` (128 x 128), 4 warps in 2 x 2, each warp a
  64 x 64 tile of 4 x 4 16 x 16 accumulators (each one pair of ``mma.sync``
  m16n8k16); k in steps of ``BLOCK_K`` (32);
* A and B tiles copied global -> shared with ``cp.async`` (16-byte vectors),
  ``STAGES`` copies in flight (``software_pipeline_stage`` with async stage 0;
  the copies become ``cp.async`` under ``tirx.use_async_copy``, which
  :func:`mma_pass_config` turns on);
* shared memory in TVM's permuted (XOR-swizzled) layout
  (``permuted_layout``, ``InjectPermutedLayout``): ``ldmatrix`` reads
  8 rows of 16 bytes that land in 8 different bank groups without padding;
* fragments ``ldmatrix`` (A row-major, B = the ``[out, in]`` weight, i.e. the
  ``col`` operand: ``trans_b``) into registers;
* the accumulators go through shared memory to global, with the fused
  epilogue applied on the way (16-byte vector stores), as dlight does.

Only fp16 inputs (TVM's ldmatrix intrinsics are fp16-only); the accumulator has the output's dtype.
Anything this rule cannot take (other dtypes, a failed tensorization) is left
to dlight's rules.
"""

from __future__ import annotations

BLOCK_M = 128
BLOCK_N = 128
BLOCK_K = 32
WARPS_M = 2
WARPS_N = 2
STAGES = 3  # global -> shared copies in flight
WARP = 32
VECTOR = 8  # fp16 elements per 16-byte copy
MMA_TILE = 16


def mma_pass_config() -> dict:
    """The PassContext config the MMA schedule needs: pipelined shared-memory copies become ``cp.async``."""
    return {"tirx.use_async_copy": True}


def is_mma_matmul(func, target) -> bool:
    """A CUDA PrimFunc whose reduction block is an fp16 x fp16 matmul (fp16 or fp32 accumulator)."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import get_in_out_dtypes, get_index_map, get_reduction_blocks

    if target.kind.name != "cuda" or not isinstance(func, tirx.PrimFunc):
        return False
    if "dlight.do_not_tensorize" in func.attrs:
        return False
    try:
        sch = s_tir.Schedule(func)
        blocks = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
        if not blocks or len(blocks) != 1:
            return False
        block = sch.get(blocks[0])
        return get_index_map(block) is not None and get_in_out_dtypes(block)[0] == "float16"
    except Exception:  # pylint: disable=broad-except
        return False


def schedule_mma_matmul(func, target):
    """The schedule of ``func`` on ``mma.sync`` (see the module docstring), or None where it does not apply."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import (
        auto_inline_consumer_chain,
        auto_inline_producers,
        get_in_out_dtypes,
        get_index_map,
        get_reduction_blocks,
    )
    from tvm.s_tir.tensor_intrin.cuda import get_mma_intrin_group, shared_16x16_to_ldmatrix_32x8_layout

    if not is_mma_matmul(func, target):
        return None
    sch = s_tir.Schedule(func)
    main_block = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))[0]

    # Normalize to C[b, i, j] += A[b, i, k] * B[b, j, k], padded to whole tiles.
    reindex_a = sch.reindex(main_block, ("read", 0))
    reindex_b = sch.reindex(main_block, ("read", 1))
    reindex_c = sch.reindex(main_block, ("write", 0))
    matmul_map, a_map, b_map, c_map = get_index_map(sch.get(main_block))
    sch.transform_layout(reindex_a, ("write", 0), a_map)
    sch.transform_layout(reindex_b, ("write", 0), b_map)
    sch.transform_layout(reindex_c, ("read", 0), c_map)
    sch.transform_block_layout(main_block, matmul_map)
    sch.pad_einsum(main_block, [1, BLOCK_M, BLOCK_N, BLOCK_K])

    warp_tiles_m = BLOCK_M // WARPS_M // MMA_TILE
    warp_tiles_n = BLOCK_N // WARPS_N // MMA_TILE
    batch, i, j, k = sch.get_loops(main_block)
    i, i_tile = sch.split(i, [None, MMA_TILE])
    j, j_tile = sch.split(j, [None, MMA_TILE])
    k, k_tile = sch.split(k, [None, MMA_TILE])
    sch.reorder(i, j, k, i_tile, j_tile, k_tile)
    block_inner = main_block
    block_outer = sch.blockize(i_tile)
    i0, i1, i2 = sch.split(i, [None, WARPS_M, warp_tiles_m])
    j0, j1, j2 = sch.split(j, [None, WARPS_N, warp_tiles_n])
    k0, k1 = sch.split(k, [None, BLOCK_K // MMA_TILE])
    sch.reorder(i0, j0, i1, j1, k0, k1, i2, j2)
    block_x = sch.fuse(i0, j0)
    warp_id = sch.fuse(i1, j1)
    sch.bind(batch, "blockIdx.z")
    sch.bind(block_x, "blockIdx.x")
    sch.bind(warp_id, "threadIdx.y")
    num_warps = WARPS_M * WARPS_N

    def to_shared(index):
        copy = sch.cache_read(block_outer, index, "shared.dyn")
        sch.compute_at(copy, k0)
        fused = sch.fuse(*sch.get_loops(copy)[-2:])
        _, ty, tx, vec = sch.split(fused, [None, num_warps, WARP, VECTOR])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vec)
        sch.annotate(copy, "permuted_layout", 1)
        return copy

    a_g2s = to_shared(0)
    b_g2s = to_shared(1)
    auto_inline_producers(sch, a_g2s)
    auto_inline_producers(sch, b_g2s)

    def ldmatrix_layout(*index):
        *outer, r, c = index
        return (*outer, r // MMA_TILE, c // MMA_TILE, *shared_16x16_to_ldmatrix_32x8_layout(r % MMA_TILE, c % MMA_TILE))

    def to_registers(index):
        frag = sch.cache_read(block_outer, index, "warp")
        sch.compute_at(frag, k1)
        return frag

    a_frag = to_registers(0)
    b_frag = to_registers(1)

    c_shared = sch.cache_write(block_outer, 0, "shared.dyn")
    c_frag = sch.cache_write(block_outer, 0, "warp")
    sch.reverse_compute_at(c_frag, warp_id)
    sch.reverse_compute_at(c_shared, block_x)
    init = sch.decompose_reduction(block_outer, k0)
    init_inner = sch.get_child_blocks(init)[0]

    # The accumulator has the matmul output's dtype: Relax's fp16 matmul sums in fp16 (as dlight's WMMA does).
    out_dtype = str(get_in_out_dtypes(sch.get(block_inner))[1])
    intrins = get_mma_intrin_group(
        load_scope="shared.dyn", store_scope="shared.dyn", in_dtype="float16", out_dtype=out_dtype,
        trans_a=False, trans_b=True,
    )  # fmt: skip
    for frag, intrin in ((a_frag, intrins["load_a"]), (b_frag, intrins["load_b"])):
        r, c = sch.get_loops(frag)[-2:]
        r0, r1 = sch.split(r, [None, MMA_TILE])
        c0, c1 = sch.split(c, [None, MMA_TILE])
        sch.reorder(r0, c0, r1, c1)
        sch.transform_layout(frag, ("write", 0), ldmatrix_layout)
        sch.tensorize(r1, intrin)
    r, c = sch.get_loops(c_frag)[-2:]
    r0, r1 = sch.split(r, [None, MMA_TILE])
    c0, c1 = sch.split(c, [None, MMA_TILE])
    sch.reorder(r0, c0, r1, c1)
    sch.transform_layout(c_frag, ("read", 0), ldmatrix_layout)
    sch.tensorize(r1, intrins["store"])
    sch.tensorize(sch.get_loops(init_inner)[-2], intrins["init"])
    sch.tensorize(sch.get_loops(block_inner)[-3], intrins["compute"])

    # the epilogue (bias, activation, residual) runs on the tile in shared memory
    auto_inline_consumer_chain(sch, c_shared)
    fused = sch.fuse(*sch.get_loops(c_shared)[-2:])
    _, ty, tx, vec = sch.split(fused, [None, num_warps, WARP, VECTOR // 2])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)

    # STAGES - 1 tiles ahead: the two copies in stage 0 (async), fragments and mma after
    sch.annotate(k0, "software_pipeline_stage", [0, 0, STAGES - 1, STAGES - 1, STAGES - 1])
    sch.annotate(k0, "software_pipeline_order", [0, 1, 2, 3, 4])
    sch.annotate(k0, "software_pipeline_async_stages", [0])
    sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])
    sch.annotate(k1, "software_pipeline_order", [0, 1, 2])
    return sch

