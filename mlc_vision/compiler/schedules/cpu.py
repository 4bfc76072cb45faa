"""Our schedule rules for CPU PrimFuncs (llvm, x86-64 AVX-512 / AVX2).

TVM's stock llvm pipeline leaves every kernel unscheduled (one thread, no
tiling). ``cpu_schedule_rules()`` are applied by ``compiler/pipeline.py``
after fusion, first match wins:

* ``GEMM``: dense and batched matmuls with their fused epilogue (bias,
  quick-GELU, residual, scale) in register tiles, B packed per panel;
  on CPUs with AVX-512F an exported library's fp32 linear layers do not get
  here: they call the C GEMM ``kernels/cpu_f32_gemm.c`` (weight slices packed
  per K block sized from the detected L2, accumulators in registers over the
  block, epilogues in the kernel; ``passes/f32_cpu.py``), and so does fp32
  attention (same file), so this rule schedules the linear layers of CPUs
  without AVX-512 (and of a plain ``tvm.compile``), fp32 attention's split
  matmuls and the other batched matmuls;
* ``RowReduction``: LayerNorm, RMSNorm, softmax: one parallel loop over rows,
  each row reduced and normalized while it is in L1;
* ``Fallback``: everything else (reshapes, transposes, adds; fp16/bf16
  GEMMs): parallel outer loops, vectorized inner loop.

Weights are NOT lifted: the GEMM kernels read ``[out, in]`` weights directly
and pack a 64-column panel per parallel task (one read of each weight per
call, ~1/M of the FLOPs), so the library takes the params exactly as stored.
Token counts need not be multiples of any tile (rows are padded inside the
kernel with ``pad_einsum``); the batch may be symbolic.

Debug: ``MLC_VISION_CPU_TRACE=1`` prints which rule scheduled which PrimFunc
(by block names). ``GEMM().strict = True`` makes the GEMM rule raise instead
of falling through to the next rule (tests use it).
"""

from __future__ import annotations

import os

from tvm import s_tir, tirx
from tvm.s_tir import dlight

# Register tile of the GEMM micro-kernel, fp32 AVX-512:
# MR rows x NR columns = MR * NR / 16 zmm accumulators. 6 x 64 -> 24 zmm
# accumulators + 4 B vectors + 1 A broadcast = 29 of 32 zmm registers; every k
# step does 4 vector loads + 6 broadcasts for 24 FMAs (12 x 32 needs 2 + 12).
# Measured with both threads on the ViT GEMMs (577 or 8 x 577 rows, K x N =
# 1024 x 4096, 4096 x 1024, 1024 x 1024; scripts/dev/gemm_tiles.py):
# 6x64 150-192 GFLOP/s, 4x64 about the same, 10x32 148-173, 12x32 111-125,
# 3x128 106-149, 12x16 107-132, 8x48 7 (the N tail is not a whole panel).
# Token counts (197, 257, 577, ...) are padded up to a multiple of MR (577 -> 582).
GEMM_MR = 6
GEMM_NR = 64
VEC = 16  # fp32 lanes of a zmm register


def _as_int(x):
    return int(x) if isinstance(x, (int, tirx.IntImm)) else None


def _loops(sch, block):
    return list(sch.get_loops(block))


def _extent(sch, loop):
    return _as_int(sch.get(loop).extent)


def _is_reduction(sch, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _vectorize_inner(sch, loop, max_lanes=VEC):
    """Vectorize ``loop`` if its extent is static, else split off a static tail.

    Splits by the largest power-of-two lane count <= ``max_lanes`` dividing the
    extent, so no predicate ends up inside the vector loop."""
    ext = _extent(sch, loop)
    if ext is None:
        return None
    lanes = max_lanes
    while lanes > 1 and ext % lanes:
        lanes //= 2
    if lanes <= 1:
        return None
    if ext == lanes:
        sch.vectorize(loop)
        return loop
    _, inner = sch.split(loop, [None, lanes])
    sch.vectorize(inner)
    return inner


# --------------------------------------------------------------------------- GEMM


def _single_var(expr):
    return expr if isinstance(expr, tirx.Var) else None


def _gemm_info(sch, block):
    """Recognize ``C[b.., m, n] += A[.., m, k] * B[.., n, k] (NT) or B[.., k, n] (NN)``.

    Returns a dict or None. n must be static; m (rows) and k may be symbolic
    (``None``: native-resolution towers, whose token count is an input), the
    batch too."""
    blk = sch.get(block)
    ivs = list(blk.iter_vars)
    if len(ivs) < 3 or ivs[-1].iter_type != tirx.IterVar.CommReduce:
        return None
    if any(iv.iter_type != tirx.IterVar.DataPar for iv in ivs[:-1]):
        return None
    if len(blk.reads) != 2 or len(blk.writes) != 1 or blk.init is None:
        return None
    store = blk.body
    if not isinstance(store, tirx.BufferStore):
        return None
    val = store.value
    if not isinstance(val, tirx.Add) or not isinstance(val.b, tirx.Mul):
        return None
    out_dtype = store.buffer.ty.dtype
    if out_dtype != "float32":
        return None
    vm, vn, vk = ivs[-3].var, ivs[-2].var, ivs[-1].var
    if [_single_var(i) for i in store.indices[-2:]] != [vm, vn]:
        return None
    exts = [_as_int(iv.dom.extent) for iv in ivs[-3:]]
    if exts[1] is None:
        return None
    a_idx = b_idx = None
    b_layout = None
    batch_vars = {iv.var for iv in ivs[:-3]}
    b_batched = False
    for i, reg in enumerate(blk.reads):
        idx = [r.min for r in reg.region]
        ext_ok = all(_as_int(r.extent) == 1 for r in reg.region)
        vars_ = [_single_var(x) for x in idx]
        if not ext_ok or any(v is None and _as_int(x) is None for v, x in zip(vars_, idx)):
            return None
        if reg.source.ty.dtype != "float32":
            return None
        if vars_[-2:] == [vm, vk]:
            a_idx = i
        elif vars_[-2:] == [vn, vk]:
            b_idx, b_layout = i, "NT"
            b_batched = any(v in batch_vars for v in vars_[:-2])
        elif vars_[-2:] == [vk, vn]:
            b_idx, b_layout = i, "NN"
            b_batched = any(v in batch_vars for v in vars_[:-2])
    if a_idx is None or b_idx is None:
        return None
    return {
        "m": exts[0], "n": exts[1], "k": exts[2], "nbatch": len(ivs) - 3,
        "a": a_idx, "b": b_idx, "b_layout": b_layout, "b_batched": b_batched,
    }


def _writer_of(sch, blocks, buf):
    for b in blocks:
        if any(w.source.same_as(buf) for w in sch.get(b).writes):
            return b
    return None


class GEMM(dlight.ScheduleRule):
    """Dense / batched GEMM with a fused epilogue (bias, quick-GELU, residual, scale).

    Loop nest (one parallel loop over N panels, or batch x N panels when B is
    batched as in attention)::

        parallel for n_o in N / NR:              # both cores, >= 12 panels for ViT-B
          pack B[n_o*NR : +NR, :] -> Bp[K, NR]   # contiguous panel, L2-resident
          for b, m_o in batch, ceil(M / MR):     # rows padded to MR (pad_einsum)
            acc[MR, NR] = 0                      # registers
            for k in K:
              for mi in MR (unrolled):
                acc[mi, :] += A[m, k] * Bp[k, :] # broadcast + 4 zmm FMAs
            out[m, n] = epilogue(acc)            # bias / gelu / residual, vectorized

    Weights keep their ``[out, in]`` layout: the panel pack reads each weight
    element once per call (1/M of the FLOPs), so no ``transform_params``.
    """

    def __init__(self, mr: int = GEMM_MR, nr: int = GEMM_NR):
        self.mr, self.nr = mr, nr

    def apply(self, func, target, tunable):  # noqa: D102
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root") if _has_root(sch) else None
        blocks = list(sch.get_child_blocks(root)) if root is not None else []
        gemms = [b for b in blocks if _is_reduction(sch, b)]
        if len(gemms) != 1:
            return None
        gemm = gemms[0]
        info = _gemm_info(sch, gemm)
        if info is None:
            return None
        if getattr(self, "strict", False):
            return self._schedule(sch, gemm, info)
        try:
            return self._schedule(sch, gemm, info)
        except Exception:  # noqa: BLE001  (schedule error: leave it to the next rule)
            return None

    def _schedule(self, sch, gemm, info):
        mr, nr = self.mr, self.nr
        nb = info["nbatch"]
        m, n = info["m"], info["n"]
        if m is not None and m < mr:
            mr = m
        # a symbolic row count is not padded: the split below guards the last rows instead
        pad_m = mr if m is not None and m % mr else 1
        pads = [1] * nb + [pad_m, nr if n % nr else 1, 1]
        if any(p > 1 for p in pads):
            sch.pad_einsum(gemm, pads)
        blk = sch.get(gemm)
        a_buf = blk.reads[info["a"]].source
        b_buf = blk.reads[info["b"]].source
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        gpos = [i for i, b in enumerate(blocks) if sch.get(b).same_as(sch.get(gemm))][0]
        a_src = _writer_of(sch, blocks[:gpos], a_buf)
        b_src = _writer_of(sch, blocks[:gpos], b_buf)
        keep = {sch.get(x) for x in (a_src, b_src) if x is not None}
        # producers of the producers (transposes, reshapes) -> inline
        for b in reversed(blocks[:gpos]):
            if sch.get(b) in keep:
                continue
            sch.compute_inline(b)
        # epilogue chain -> inline all but the last block
        post = blocks[gpos + 1:]
        for b in post[:-1]:
            sch.compute_inline(b)
        final = post[-1] if post else None

        # tile the GEMM
        loops = _loops(sch, gemm)
        batch_loops, lm, ln, lk = loops[:nb], loops[nb], loops[nb + 1], loops[nb + 2]
        mo, mi = sch.split(lm, [None, mr])
        no, ni = sch.split(ln, [None, nr])
        if info["b_batched"]:
            sch.reorder(*batch_loops, no, mo, lk, mi, ni)
            par = sch.fuse(*batch_loops, no) if batch_loops else no
        else:
            sch.reorder(no, *batch_loops, mo, lk, mi, ni)
            par = no
        sch.parallel(par)

        # pack B panel contiguously: Bp[.., n // nr, k, n % nr]
        if b_src is None:
            b_src = sch.cache_read(gemm, info["b"], "global")
        nbd = len(b_buf.ty.shape)
        if info["b_layout"] == "NT":
            imap = lambda *ix: (*ix[:-2], ix[-2] // nr, ix[-1], ix[-2] % nr)  # noqa: E731
        else:
            imap = lambda *ix: (*ix[:-2], ix[-1] // nr, ix[-2], ix[-1] % nr)  # noqa: E731
        sch.transform_layout(b_src, ("write", 0), tirx.IndexMap.from_func(imap, ndim=nbd, index_dtype=_index_dtype(b_buf)))
        sch.compute_at(b_src, par)
        bl = _loops(sch, b_src)[-2:]
        if info["b_layout"] == "NN":
            _vectorize_inner(sch, bl[-1])

        # A pad (ragged M) stays a separate, parallel copy
        if a_src is not None:
            _schedule_elementwise(sch, a_src)

        # accumulator in registers; epilogue at the tile
        if final is None:
            wb = sch.cache_write(gemm, 0, "local")
            final = wb
        else:
            sch.set_scope(gemm, 0, "local")
        sch.reverse_compute_at(final, mo)
        fl = _loops(sch, final)
        _vectorize_inner(sch, fl[-1])
        sch.unroll(mi)
        sch.vectorize(ni)
        init = sch.decompose_reduction(gemm, lk)
        il = _loops(sch, init)
        sch.unroll(il[-2])
        return sch


def _index_dtype(buf):
    shp = buf.ty.shape
    for d in shp:
        if hasattr(d, "dtype"):
            return str(d.dtype)
    return "int32"


def _has_root(sch):
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


#: Elementwise kernels with fewer (static) elements run on one thread: waking the
#: pool costs more than the work (casts of bias vectors, small adds), and a busy
#: machine can delay a woken thread far longer.
SERIAL_ELEMENTS = 32768


def _static_elements(sch, loops):
    """Product of the loop extents, None when one is symbolic (e.g. the batch)."""
    total = 1
    for loop in loops:
        ext = _extent(sch, loop)
        if ext is None:
            return None
        total *= ext
    return total


def _schedule_elementwise(sch, block):
    """Parallel over the fused outer loops, vectorize the innermost (static) loop."""
    loops = _loops(sch, block)
    if not loops:
        return
    elements = _static_elements(sch, loops)
    if elements is not None and elements < SERIAL_ELEMENTS:
        _vectorize_inner(sch, loops[-1])
        return
    inner = loops[-1]
    vec = _vectorize_inner(sch, inner) if len(loops) >= 1 else None
    loops = _loops(sch, block)
    outer = loops[:-2] if vec is not None and len(loops) >= 2 and loops[-2] is not None else loops[:-1]
    if vec is not None:
        # loops[-1] is the vector loop; everything before its parent stays outer
        outer = loops[:-1]
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


# ------------------------------------------------------------------ row reductions


class RowReduction(dlight.ScheduleRule):
    """LayerNorm / softmax / RMSNorm: every block shares the leading (row) loops.

    All leading spatial loops of the output block (batch x tokens, or
    batch x heads x queries) are fused into one parallel loop; every other
    block is computed at that row loop, so a row (768..4096 or 197..1025
    floats, in L1) is read from memory once and reduced + normalized while hot.
    Spatial blocks vectorize their inner loop (16 lanes). Reductions over the
    row are split into 16 partial sums (``rfactor``) accumulated as one vector,
    then added up: a scalar sum is one chain of dependent adds, so a 768-wide
    LayerNorm row cost two chains of 768 add latencies (``_vectorize_reduction``).
    """

    def apply(self, func, target, tunable):  # noqa: D102
        if not isinstance(func, tirx.PrimFunc) or not _has_root(func_sch := s_tir.Schedule(func)):
            return None
        sch = func_sch
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        if len(blocks) < 2 or not any(_is_reduction(sch, b) for b in blocks):
            return None
        out = blocks[-1]
        if _is_reduction(sch, out):
            return None
        try:
            loops = _loops(sch, out)
            if len(loops) < 2:
                return None
            # every reduction must reduce over exactly the innermost output axis
            for b in blocks:
                ivs = sch.get(b).iter_vars
                nred = sum(iv.iter_type == tirx.IterVar.CommReduce for iv in ivs)
                if nred > 1 or (nred == 1 and ivs[-1].iter_type != tirx.IterVar.CommReduce):
                    return None
            # inline pure elementwise producers that feed a single consumer
            for b in blocks[:-1]:
                if not _is_reduction(sch, b) and len(sch.get_consumers(b)) == 1:
                    try:
                        sch.compute_inline(b)
                    except Exception:  # noqa: BLE001
                        pass
            blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
            partials = [p for b in blocks if _is_reduction(sch, b) and (p := _lane_partials(sch, b)) is not None]
            blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
            out = blocks[-1]
            loops = _loops(sch, out)
            row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            sch.parallel(row)
            for b in reversed(blocks[:-1]):
                sch.compute_at(b, row, preserve_unit_loops=True)
            for b in partials:
                _vectorize_partials(sch, b)
            for b in blocks:
                if not _is_reduction(sch, b):
                    _vectorize_inner(sch, _loops(sch, b)[-1])
            return sch
        except Exception:  # noqa: BLE001
            return None


def _lane_partials(sch, block, lanes=VEC):
    """Reduce the innermost loop of ``block`` as ``lanes`` partial results, then the lanes.

    Splits the loop into ``[k / lanes, lanes]`` and ``rfactor``s the lanes: a
    new block reduces into a ``[..., lanes]`` buffer (returned; vectorized by
    ``_vectorize_partials`` once it is placed), ``block`` then reduces those
    ``lanes`` values. Before any ``compute_at`` (``rfactor`` wants the block
    at the top of its own loop nest). None, and nothing changed, for a
    symbolic extent or one not a multiple of ``lanes``. Changes the order of
    the fp32 additions (pairwise-like; no less accurate)."""
    inner = _loops(sch, block)[-1]
    ext = _extent(sch, inner)
    if ext is None or ext % lanes or ext == lanes:
        return None
    spatial = len(sch.get(block).iter_vars) - 1
    _, lane = sch.split(inner, [None, lanes])
    return sch.rfactor(lane, factor_axis=spatial)  # lanes last: one row's partials are contiguous


def _vectorize_partials(sch, partial):
    """The lane loop of an ``_lane_partials`` block made innermost, its initialisation vectorized.

    After ``compute_at`` the block's loops follow its iter vars: (row, lanes,
    unit loops..., k / lanes). The update's lane loop stays a plain innermost
    loop of 16 independent accumulators, which LLVM vectorizes (TIR refuses to
    vectorize a loop of a block that still has a reduction axis)."""
    loops = _loops(sch, partial)
    lane, outer = loops[1], loops[-1]
    if _extent(sch, lane) != VEC:
        return
    sch.reorder(outer, lane)
    init = sch.decompose_reduction(partial, outer)
    sch.vectorize(_loops(sch, init)[-1])


# ------------------------------------------------------------------- fallback


class Fallback(dlight.ScheduleRule):
    """Everything else (reshape/transpose/concat/pos-embedding add, fp16 GEMMs).

    Each root block: fuse its outer loops into one parallel loop and vectorize
    the innermost loop when its extent is static. Reduction blocks get their
    spatial outer loops parallelized. Never fails: a primitive that does not
    apply is skipped, leaving a correct (serial) loop."""

    def apply(self, func, target, tunable):  # noqa: D102
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        if not _has_root(sch):
            return None
        for b in list(sch.get_child_blocks(sch.get_sblock("root"))):
            try:
                if _is_reduction(sch, b):
                    ivs = sch.get(b).iter_vars
                    loops = _loops(sch, b)
                    nsp = 0
                    for iv in ivs:
                        if iv.iter_type != tirx.IterVar.DataPar:
                            break
                        nsp += 1
                    if nsp and len(loops) == len(ivs):
                        outer = loops[:nsp]
                        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
                else:
                    _schedule_elementwise(sch, b)
            except Exception:  # noqa: BLE001
                continue
        return sch


class _Traced(dlight.ScheduleRule):
    """Wraps a rule; with ``MLC_VISION_CPU_TRACE=1`` prints which rule took which PrimFunc."""

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func, target, tunable):  # noqa: D102
        sch = self.rule.apply(func, target, tunable)
        if sch is not None and os.environ.get("MLC_VISION_CPU_TRACE"):
            s0 = s_tir.Schedule(func)
            name = ",".join(s0.get(b).name_hint for b in s0.get_child_blocks(s0.get_sblock("root")))
            print(f"[cpu] {type(self.rule).__name__:12s} {name}")
        return sch


def cpu_schedule_rules():
    """The rules, in priority order (first one that returns a schedule wins)."""
    return [_Traced(r) for r in (GEMM(), RowReduction(), Fallback())]
