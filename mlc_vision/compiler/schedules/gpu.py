"""dlight's GPU schedule rules as our pipelines apply them.

* ``gpu.Matmul`` tries tensor cores (WMMA) only for CUDA fp16 matmuls whose
  every extent is above 64, and raises "is not a stage pipeline" on one
  without an epilogue (the patch embedding). ``MatmulWithFallback`` retries
  such a function with ``dlight.do_not_tensorize`` so that the others keep
  their tensor cores, and (``--attention tensorcore``) also tensorizes the
  attention matmuls with head_dim 64 as K or N.
* ``preload_tensor_intrinsics`` makes the import of TVM's tensor intrinsics
  (which the CUDA/Metal matmul rules need) several times faster.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def _matmul_rule(small_tensor_core: bool = False, mma: bool = False):
    """dlight's GPU matmul rule, retried without tensor cores where tensorizing fails.

    ``small_tensor_core``: also put fp16 CUDA matmuls with an extent of 32..64
    (the attention matmuls) on tensor cores; see :func:`_small_fp16_cuda_matmul`.
    ``mma``: CUDA fp16 matmuls get ``schedules/gpu_mma.py``'s ``mma.sync``
    schedule first (dlight's where it does not apply).
    """
    from tvm.s_tir import dlight as dl

    class MatmulWithFallback(dl.gpu.Matmul):
        """``gpu.Matmul`` that marks a function ``dlight.do_not_tensorize`` when WMMA fails.

        Only CUDA fp16 matmuls with every extent above 64 try tensor cores;
        of those, a matmul without epilogue is "not a stage pipeline" for the
        WMMA rule. Retrying with the attribute keeps the other matmuls on
        tensor cores instead of dropping tensor cores for the whole model.
        """

        def apply(self, func, target, tunable):
            if mma:
                sch = _try_mma(func, target)
                if sch is not None:
                    return sch
            if small_tensor_core and _small_fp16_cuda_matmul(func, target):
                try:
                    sch = dl.gpu.matmul.MatmulTensorization().apply(func, target, tunable)
                except Exception as err:  # pylint: disable=broad-except
                    logger.debug("tensor-core attention matmul failed (%s)", err)
                    sch = None
                if sch is not None:
                    return sch
            try:
                return super().apply(func, target, tunable)
            except Exception as err:  # pylint: disable=broad-except
                if "dlight.do_not_tensorize" in func.attrs:
                    raise
                name = func.attrs.get("global_symbol", "?")
                logger.debug("%s: tensor-core matmul failed (%s); scheduling without", name, err)
                return super().apply(func.with_attr("dlight.do_not_tensorize", True), target, tunable)

    return MatmulWithFallback()


def _try_mma(func, target):
    """``schedules/gpu_mma.py``'s schedule of ``func``, or None (and a debug line) where it fails."""
    from .gpu_mma import schedule_mma_matmul

    try:
        return schedule_mma_matmul(func, target)
    except Exception as err:  # pylint: disable=broad-except
        logger.debug("mma matmul schedule failed (%s); dlight's rule takes it", err)
        return None


#: Smallest static extent (rows, columns or reduction) that we still put on tensor cores.
MIN_TENSOR_CORE_EXTENT = 32


def _small_fp16_cuda_matmul(func, target) -> bool:
    """True for a CUDA fp16 matmul that dlight leaves on CUDA cores only for its size.

    ``gpu.Matmul`` tensorizes only when every static extent of the normalized
    ``[batch, I, J, K]`` matmul is above 64. The attention matmuls of a ViT
    have head_dim 64 as K (Q·K^T) or as J (P·V), so with that rule they ran at
    a tenth of the tensor-core matmuls' speed (18 vs ~180 TFLOP/s on an H100).
    WMMA tiles are 16 x 16 x 16 and dlight's WMMA schedule pads every extent
    (128 x 128 output tiles, K in steps of 64), so an extent of 64 wastes at
    most half a tile: still several times faster than CUDA cores. Below
    ``MIN_TENSOR_CORE_EXTENT`` we leave dlight's choice alone.
    """
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import get_in_out_dtypes, get_index_map, get_reduction_blocks

    if target.kind.name != "cuda" or not isinstance(func, tirx.PrimFunc):
        return False
    if "dlight.do_not_tensorize" in func.attrs:  # (every CUDA arch we accept is sm_70+)
        return False
    try:
        sch = s_tir.Schedule(func)
        blocks = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
        if not blocks:
            return False
        block = sch.get(blocks[0])
        maps = get_index_map(block)
        if maps is None or get_in_out_dtypes(block) not in (("float16", "float16"), ("float16", "float32")):
            return False
        sch.transform_block_layout(blocks[0], maps[0])  # -> [batch, I, J, K], as gpu.Matmul does
        normalized = [iv.dom.extent for iv in sch.get(blocks[0]).iter_vars[1:]]
    except Exception:  # pylint: disable=broad-except
        return False
    static = [int(e) for e in normalized if isinstance(e, tirx.IntImm)]
    return bool(static) and min(static) <= 64 and min(static) >= MIN_TENSOR_CORE_EXTENT


def gpu_schedule_pass(small_tensor_core: bool = False, mma: bool = False):
    """dlight's default GPU rules (Matmul, GEMV, Reduction, GeneralReduction, Fallback)."""
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(
        _matmul_rule(small_tensor_core, mma),
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    )


def preload_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` quickly (about 3.5x faster).

    dlight's CUDA/Metal matmul rules import that package, which parses ~500
    TVMScript functions; each parse calls ``inspect.stack()``, and for every
    frame whose "file" is not a file (``<frozen runpy>``, ``<frozen
    importlib._bootstrap>``, ``<ast>``, ``<string>``) ``inspect.getmodule``
    rescans all of ``sys.modules``. Recording in inspect's own cache that
    those names belong to no module gives the answer the scan gives (None),
    without the scan.
    """
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    pseudo_files = {"<ast>", "<string>", "<stdin>"}
    pseudo_files.update(
        f"<frozen {name}>"
        for name, module in list(sys.modules.items())
        if getattr(getattr(module, "__spec__", None), "origin", None) == "frozen"
    )
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_filename.startswith("<"):
            pseudo_files.add(frame.f_code.co_filename)
        frame = frame.f_back
    for pseudo_file in pseudo_files:
        inspect.modulesbyfile.setdefault(pseudo_file, "<no module>")
    import tvm.s_tir.tensor_intrin  # noqa: F401
