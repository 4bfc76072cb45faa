"""The Relax pipeline of each target, as named phases in order.

``tvm.compile(mod, target, relax_pipeline=relax_pipeline(name, target, attention))``
runs, for every target:

0. ``linear`` (CPU): linear layers whose weights are stored in bf16
   become calls of the bf16 C kernel, and so does a bf16 library's attention
   with ``--attention fused`` (``passes/bf16_cpu.py``; for a CPU without bf16
   arithmetic but with AVX2 or AVX-512 the fp32 kernel takes them instead,
   on the bf16 weights); on a CPU with
   AVX-512F or AVX2 + FMA the fp32 linear layers, with their bias, layer scale, residual, activation
   and SwiGLU product, become calls of the fp32 C GEMM
   (``passes/f32_cpu.py``, ``kernels/cpu_f32_gemm.c``) when the caller asks
   for it (``f32_gemm=True``: ``export.compile_module`` does for a CPU spec
   with either, and the export links the kernel in; an executable used
   straight from ``tvm.compile`` has no C kernel to call); with
   ``--attention fused`` so does fp32 attention (the same C file's kernel).
   With ``prepack=True`` as well (fp32 libraries: ``metadata["prepack"]``)
   each entry gets a ``_prepacked`` twin reading weights that
   ``prepack_params`` packs once, when the library is loaded.
1. ``lower_attention``: ``R.nn.attention`` becomes one of our fused kernels
   where the chosen lowering has one (``passes/fuse_attention.py``); anything
   left is split into matmul -> softmax -> matmul (``passes/split_attention.py``).
   The segmented attention of native-resolution towers becomes the CPU's
   segment kernel, with CUDA ``flash`` the segmented tensor-core flash kernel
   (``passes/segment_attention_cuda.py``), or anywhere else a ``[n, n]`` mask
   lowering (``passes/segment_attention.py``).
2. ``legalize``: ``matmul(x, permute_dims(w))`` becomes one NT matmul (weights
   are read in their checkpoint ``[out, in]`` layout, no transpose kernel),
   then every op becomes a TIR PrimFunc (on the CPU with our vectorizable
   exp / GELU legalizers, ``passes/legalize_cpu.py``).
3. ``fuse``: bias, activation and residual become the epilogue of their
   matmul; LayerNorm and softmax become single kernels.
4. ``schedule``: every PrimFunc is scheduled: our rules on the CPU
   (``schedules/cpu.py``: TVM's stock llvm pipeline would leave kernels
   unscheduled, one thread), dlight's on GPUs (``schedules/gpu.py``).
5. ``lower``: the VM lowering (memory planning, builtins, shapes).

The attention lowering is an argument (``--attention``), checked against the
target by ``targets.resolve_attention`` and recorded in the metadata:

* CPU ``fused`` (default in fp32): the C kernel of ``kernels/cpu_f32_gemm.c``
  on AVX-512 and AVX2 CPUs (exported libraries), else ``kernels/cpu_attention.py``;
  either way the scores of a tile of queries stay in cache; ``split`` otherwise.
* CUDA ``split`` (default): dlight schedules the matmuls and the softmax.
  ``fused``: ``kernels/cuda_flash_attention.py`` (CUDA cores; slower than
  split on an H100). ``tensorcore``: the split without permutes, both matmuls
  on tensor cores and our warp softmax (``kernels/warp_softmax.py``).
  ``flash`` (fp16/bf16): ``kernels/cuda_tc_flash_attention.py``, one kernel on
  tensor cores (``mma.sync``), scores in registers, fed by one QKV GEMM where
  q, k and v are projections of one input (``passes/pack_qkv.py``); attention it
  cannot take gets the ``tensorcore`` split. ``tensorcore`` and ``flash`` are not yet timed
  on a GPU.
* Other GPU targets: ``split``.

The matmul schedule is an argument too (``--gemm``, recorded in the metadata):
CUDA fp16 ``dlight`` (default: dlight's WMMA rule) or ``mma``
(``schedules/gpu_mma.py``: ``mma.sync`` + ldmatrix, cp.async pipeline,
swizzled shared memory; not yet timed on a GPU).
"""

from __future__ import annotations

import tvm
from tvm import relax

from .passes.bf16_cpu import bf16_attention_cpu, bf16_linear_cpu
from .passes.f32_cpu import f32_attention_cpu, f32_linear_cpu_pass
from .passes.fuse_attention import fuse_attention_cpu, fuse_attention_cuda, fuse_attention_cuda_tc
from .passes.legalize_cpu import LEGALIZE_OVERRIDES
from .passes.pack_qkv import pack_qkv_flash_cuda
from .passes.segment_attention import lower_segment_attention_cpu, lower_segment_attention_masked
from .passes.segment_attention_cuda import lower_segment_attention_cuda_flash
from .passes.split_attention import split_attention, split_attention_cuda


def cpu_phases(attention: str, f32_gemm: bool = False, prepack: bool = False) -> list[tuple[str, list]]:
    """The CPU pipeline's phases: ``[(name, [pass, ...]), ...]`` in order (``f32_gemm``: fp32
    linear layers call the C GEMM, which the caller links in; ``prepack``: with their weights packed
    once by ``prepack_params`` in the ``_prepacked`` twins of the entries)."""
    from tvm.s_tir import dlight

    from .schedules.cpu import cpu_schedule_rules

    t = relax.transform
    fused = [fuse_attention_cpu] if attention == "fused" else []
    bf16_fused = [bf16_attention_cpu] if attention == "fused" else []
    f32_linear = f32_linear_cpu_pass(prepack)
    f32_c_kernels = ([f32_linear] + ([f32_attention_cpu] if attention == "fused" else [])) if f32_gemm else []
    return [
        ("linear", [bf16_linear_cpu, *bf16_fused, *f32_c_kernels]),
        ("lower_attention", fused + [split_attention, lower_segment_attention_cpu, lower_segment_attention_masked]),
        (
            "legalize",
            [
                t.CanonicalizeBindings(),
                t.FuseTransposeMatmul(),
                t.LegalizeOps(customize_legalize_map=LEGALIZE_OVERRIDES),
                t.AnnotateTIROpPattern(),
                t.FoldConstant(),
            ],
        ),
        ("fuse", [t.FuseOps(), t.FuseTIR(), t.DeadCodeElimination()]),
        ("schedule", [dlight.ApplyDefaultSchedule(*cpu_schedule_rules())]),
        (
            "lower",
            [
                t.RewriteDataflowReshape(),
                t.ToNonDataflow(),
                t.RemovePurityChecking(),
                t.CallTIRRewrite(),
                t.StaticPlanBlockMemory(),
                t.LowerAllocTensor(),
                t.KillAfterLastUse(),
                t.LowerRuntimeBuiltin(),
                t.ComputePrimValue(),
                t.VMShapeLower(),
                t.AttachGlobalSymbol(),
            ],
        ),
    ]


def gpu_phases(target, attention: str, gemm: str = "dlight") -> list[tuple[str, list]]:
    """The GPU pipeline's phases: TVM's default GPU pipeline with our attention and scheduling steps."""
    from .schedules.gpu import gpu_schedule_pass

    # The per-backend modules, not tvm.relax.pipeline's dispatchers: in 0.27
    # relax.pipeline.dataflow_lower_passes(cuda) fails (not re-exported).
    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as backend
    else:
        from tvm.relax.backend.gpu_generic import pipeline as backend

    t = relax.transform
    lower_attention = {
        "split": [split_attention],
        "fused": [fuse_attention_cuda, split_attention],
        "tensorcore": [split_attention_cuda],
        "flash": [pack_qkv_flash_cuda, fuse_attention_cuda_tc, split_attention_cuda, lower_segment_attention_cuda_flash],
    }[attention]
    return [
        ("lower_attention", lower_attention + [lower_segment_attention_masked]),
        ("library_dispatch", list(backend.library_dispatch_passes(target))),
        ("legalize", [t.FuseTransposeMatmul(), t.LegalizeOps(), t.AnnotateTIROpPattern(), t.FoldConstant()]),
        ("fuse", [t.FuseOps(), t.FuseTIR()]),
        ("schedule", [gpu_schedule_pass(small_tensor_core=attention in ("tensorcore", "flash"), mma=gemm == "mma")]),
        ("lower", list(backend.dataflow_lower_passes(target)) + list(backend.finalize_passes(target))),
    ]


def phases(target_name: str, target, attention: str, gemm: str = "dlight", f32_gemm: bool = False,
           prepack: bool = False) -> list[tuple[str, list]]:
    """The named phases for ``target_name`` (``cpu`` or a GPU target)."""
    return cpu_phases(attention, f32_gemm, prepack) if target_name == "cpu" else gpu_phases(target, attention, gemm)


def relax_pipeline(target_name: str, target, attention: str, gemm: str = "dlight", f32_gemm: bool = False,
                   prepack: bool = False) -> tvm.transform.Pass:
    """One pass running every phase of :func:`phases` under ``target`` (``f32_gemm``, ``prepack``: see
    :func:`cpu_phases`)."""

    @tvm.transform.module_pass(opt_level=0, name=f"MlcVision_{target_name}")
    def _pipeline(mod, _ctx):
        with target:
            for _name, passes in phases(target_name, target, attention, gemm, f32_gemm, prepack):
                mod = tvm.transform.Sequential(passes)(mod)
        return mod

    return _pipeline
