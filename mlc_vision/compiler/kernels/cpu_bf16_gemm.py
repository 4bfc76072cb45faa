"""The bf16 linear layer (and attention) of CPU libraries: a C kernel (``cpu_bf16_gemm.c``) called from TIR.

TVM's LLVM codegen does not reach ``vdpbf16ps`` or the AMX tile instructions,
so the bf16 x bf16 -> fp32 GEMM is a small C file with intrinsics. It is
compiled with the host C compiler when the library is exported and linked
into the same shared library (``export_library(addons=[object])``); the
PrimFunc here calls it with ``call_extern``, so the library needs nothing
besides TVM's runtime at load time (the C++ loader loads only the ``.so``).
The C code picks AMX, AVX512-BF16 or plain C from the CPU it runs on.

A bf16 library for a CPU without bf16 arithmetic but with a vector path of the
fp32 kernel (AVX2 + FMA, or AVX-512F without AVX512-BF16) does not use this
kernel: its linear layers are the fp32 kernel's, reading the bf16 weights and
widening them as it packs (:func:`uses_bf16_kernel`). fp32 FMAs on such a CPU
are faster than this file's plain C path, and the weights stay half the size.
"""

from __future__ import annotations

from pathlib import Path

from .c_objects import c_compiler as _compiler  # noqa: F401 (the tests link the object with it)
from .c_objects import compile_c, flat_rows, null_pointer, raise_unless_zero
from .cpu_f32_gemm import has_vector_path

SOURCE = Path(__file__).with_suffix(".c")
#: C entry point by (bias, residual) (``cpu_bf16_gemm.c``); a residual comes with a bias
#: (the residual entry takes a NULL bias when it has none).
ENTRIES = {
    (True, False): "mlcv_bf16_linear",
    (False, False): "mlcv_bf16_linear_nobias",
    (True, True): "mlcv_bf16_linear_residual",
    (False, True): "mlcv_bf16_linear_residual",
}
#: Activations the kernel applies before a bf16 store (``mlcv_bf16_linear_act``), by the numbers of
#: ``cpu_bf16_gemm.c``'s ``ACT_*``; the keys are the names bf16_cpu.py matches.
ACTIVATIONS = {"quick_gelu": 1, "gelu": 2, "gelu_tanh": 3}
#: ``cpu_bf16_gemm.c``'s ``ACT_NONE``: the bf16 store without an activation.
ACT_NONE = 0
#: What ``mlcv_bf16_best_path()`` returns, by number (``cpu_bf16_gemm.c``'s ``PATH_*``).
PATHS = {0: "generic", 1: "avx512_bf16", 2: "amx_bf16"}
#: The instruction sets (LLVM names) that multiply bf16: one of them makes a vector path of this kernel.
BF16_ARITHMETIC_FEATURES = ("avx512bf16", "amx-bf16")


def has_bf16_arithmetic(cpu_features) -> bool:
    """Whether a CPU with ``cpu_features`` (LLVM names) runs this kernel's AVX512-BF16 or AMX path."""
    return any(f in set(cpu_features or ()) for f in BF16_ARITHMETIC_FEATURES)


def uses_bf16_kernel(cpu_features) -> bool:
    """Whether a bf16 library for a CPU with ``cpu_features`` calls this kernel: the CPU multiplies
    bf16, or it has no vector path of the fp32 kernel either (then this file's plain C path)."""
    return has_bf16_arithmetic(cpu_features) or not has_vector_path(cpu_features)


def linear_primfunc(
    lead_ndim: int, k: int, n: int, bias: bool, residual: bool = False, act: str | None = None, bf16_out: bool = False
):
    """PrimFunc ``(x bf16 [..., k], w bf16 [n, k], (bias f32 [n]), (residual f32 [..., n]), y f32 [..., n])``.

    It calls the C kernel: ``y = x . w^T (+ bias) (+ residual)``; with ``act``
    (a key of :data:`ACTIVATIONS`; no residual then) ``y = bf16(act(x . w^T (+ bias)))``,
    in bf16; with ``bf16_out`` (no residual) ``y = bf16(x . w^T (+ bias))``. The ``lead_ndim``
    leading axes of x (batch, tokens) are symbolic and flattened into M.
    """
    from tvm import te, tirx

    lead = [tirx.Var(f"d{i}", "int64") for i in range(lead_ndim)]
    x = te.placeholder([*lead, k], "bfloat16", name="x")
    w = te.placeholder([n, k], "bfloat16", name="w")
    inputs = [x, w] + ([te.placeholder([n], "float32", name="bias")] if bias else [])
    if residual:
        inputs.append(te.placeholder([*lead, n], "float32", name="residual"))
    rows, null = flat_rows(lead), null_pointer()

    to_bf16 = act is not None or bf16_out

    def body(ins, outs):
        pointers = [b.data for b in ins]
        if (residual or to_bf16) and not bias:
            pointers.insert(2, null)  # NULL bias
        sizes = [rows, tirx.const(n, "int64"), tirx.const(k, "int64")]
        if to_bf16:
            code = tirx.const(ACTIVATIONS[act] if act is not None else ACT_NONE, "int32")
            status = tirx.call_extern("int32", "mlcv_bf16_linear_act", *pointers, outs[0].data, *sizes, code)
        else:
            status = tirx.call_extern("int32", ENTRIES[(bias, residual)], *pointers, outs[0].data, *sizes)
        return raise_unless_zero(status, "bf16 linear: out of memory for its scratch buffers")

    if to_bf16 and residual:
        raise ValueError("the bf16 store epilogue takes no residual")
    y = te.extern([*lead, n], inputs, body, dtype="bfloat16" if to_bf16 else "float32", name="bf16_linear")
    func = te.create_prim_func([*inputs, y])
    return func.with_attr("tir.is_scheduled", True)


def compile_object(workdir: Path) -> Path:
    """Compile ``cpu_bf16_gemm.c`` to a position-independent object in ``workdir`` (reused when unchanged)."""
    return compile_c(SOURCE, workdir, "the bf16 CPU kernel")


def attention_primfunc(
    seq: int, heads: int, head_dim: int, scale: float, bf16_in: bool = False, bf16_out: bool = False
):
    """PrimFunc ``(q, k, v, out)``, all ``[batch, seq, heads, head_dim]`` (batch symbolic), calling
    the C kernel's ``out = softmax(scale q . k^T) v`` (bf16 products, fp32 softmax; head_dim even).
    q, k, v are fp32, or bf16 with ``bf16_in``; out fp32, or bf16 with ``bf16_out``."""
    from tvm import te, tirx

    batch = tirx.Var("batch", "int64")
    shape = [batch, seq, heads, head_dim]
    q, k, v = (te.placeholder(shape, "bfloat16" if bf16_in else "float32", name=n) for n in ("q", "k", "v"))

    def body(ins, outs):
        sizes = [batch, *(tirx.const(x, "int64") for x in (seq, heads, head_dim))]
        pointers = [b.data for b in ins] + [outs[0].data]
        io = [tirx.const(int(flag), "int32") for flag in (bf16_in, bf16_out)]
        status = tirx.call_extern(
            "int32", "mlcv_bf16_attention_io", *pointers, *sizes, tirx.const(scale, "float32"), *io
        )
        return raise_unless_zero(status, "bf16 attention: out of memory for its scratch buffers")

    out = te.extern(shape, [q, k, v], body, dtype="bfloat16" if bf16_out else "float32", name="bf16_attention")
    return te.create_prim_func([q, k, v, out]).with_attr("tir.is_scheduled", True)
