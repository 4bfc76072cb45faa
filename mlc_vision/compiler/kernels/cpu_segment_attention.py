"""Segmented attention of CPU libraries: a C kernel (``cpu_segment_attention.c``) called from TIR.

The native-resolution towers (Qwen2-VL, Qwen2.5-VL) attend within an image
or a window of a symbolic number of patches. The kernel takes q, k, v
``[n, heads, head_dim]`` fp32 and per-patch segment ids ``[n]`` (contiguous
runs) and runs flash-style attention per (segment, block of queries, head),
so its cost is the sum of the squared segment lengths, not ``n^2``, and no
``[n, n]`` mask or score matrix exists. Like the bf16 GEMM it is compiled with
the host C compiler at export and linked into the library, which then needs
nothing besides TVM's runtime at load time.
"""

from __future__ import annotations

from pathlib import Path

from .c_objects import compile_c, raise_unless_zero

SOURCE = Path(__file__).with_suffix(".c")
ENTRY = "mlcv_segment_attention"
MAX_HEAD_DIM = 128  # the C kernel's MAX_HEAD_DIM; larger head dims keep the masked lowering
#: What ``mlcv_segment_attention_best_path()`` returns, by number (the C file's ``PATH_*``).
PATHS = {0: "generic", 1: "avx2", 2: "avx512"}
#: The C kernel's error codes and what they mean for the caller.
ERRORS = {
    -1: "out of memory",
    -2: "segment ids must be non-decreasing in attention order (every image and window one contiguous run)",
    -3: f"head_dim must be 1..{MAX_HEAD_DIM}",
}


def segment_attention_primfunc(heads: int, head_dim: int, scale: float):
    """PrimFunc ``(q, k, v fp32 [n, heads, head_dim], segments int32 [n], out fp32 [n, heads, head_dim])``, n symbolic.

    It calls the C kernel and turns its status into a runtime error (the ids
    come from the caller, so a bad order is the caller's error, reported in one line).
    """
    from tvm import te, tirx

    n = tirx.Var("n", "int64")
    q, k, v = (te.placeholder([n, heads, head_dim], "float32", name=name) for name in "qkv")
    segments = te.placeholder([n], "int32", name="segments")

    def body(ins, outs):
        sizes = [n, tirx.const(heads, "int64"), tirx.const(head_dim, "int64"), tirx.const(scale, "float32")]
        status = tirx.call_extern("int32", ENTRY, *[b.data for b in ins], outs[0].data, *sizes)
        return raise_unless_zero(status, f"segment attention failed: {ERRORS[-2]}, or {ERRORS[-1]}")

    out = te.extern([n, heads, head_dim], [q, k, v, segments], body, dtype="float32", name="segment_attention")
    return te.create_prim_func([q, k, v, segments, out]).with_attr("tir.is_scheduled", True)


def compile_object(workdir: Path) -> Path:
    """Compile ``cpu_segment_attention.c`` to a position-independent object in ``workdir`` (reused when unchanged)."""
    return compile_c(SOURCE, workdir, "the segmented attention CPU kernel")
