"""The bf16 linear layer (and attention) of CPU libraries: a C kernel (``cpu_bf16_gemm.c``) called from TIR.

TVM's LLVM codegen does not reach ``vdpbf16ps`` or the AMX tile instructions,
so the bf16 x bf16 -> fp32 GEMM is a small C file with intrinsics. It is
compiled with the host C compiler when the library is exported and linked
into the same shared library (``export_library(addons=[object])``); the
PrimFunc here calls it with ``call_extern``, so the library needs nothing
besides TVM's runtime at load time (the C++ loader loads only the ``.so``).
The C code picks AMX, AVX512-BF16 or plain C from the CPU it runs on.
"""

from __future__ import annotations

from pathlib import Path

from .c_objects import c_compiler as _compiler  # noqa: F401 (the tests link the object with it)
from .c_objects import compile_c

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
#: What ``mlcv_bf16_best_path()`` returns, by number (``cpu_bf16_gemm.c``'s ``PATH_*``).
PATHS = {0: "generic", 1: "avx512_bf16", 2: "amx_bf16"}


def linear_primfunc(lead_ndim: int, k: int, n: int, bias: bool, residual: bool = False, act: str | None = None):
    """PrimFunc ``(x bf16 [..., k], w bf16 [n, k], (bias f32 [n]), (residual f32 [..., n]), y f32 [..., n])``.

    It calls the C kernel: ``y = x . w^T (+ bias) (+ residual)``; with ``act``
    (a key of :data:`ACTIVATIONS`; no residual then) ``y = bf16(act(x . w^T (+ bias)))``,
    in bf16. The ``lead_ndim`` leading axes of x (batch, tokens) are symbolic and flattened into M.
    """
    import tvm
    from tvm import te, tirx

    lead = [tirx.Var(f"d{i}", "int64") for i in range(lead_ndim)]
    x = te.placeholder([*lead, k], "bfloat16", name="x")
    w = te.placeholder([n, k], "bfloat16", name="w")
    inputs = [x, w] + ([te.placeholder([n], "float32", name="bias")] if bias else [])
    if residual:
        inputs.append(te.placeholder([*lead, n], "float32", name="residual"))
    rows = tirx.const(1, "int64")
    for d in lead:
        rows = rows * d

    null = tirx.reinterpret("handle", tirx.const(0, "uint64"))

    def body(ins, outs):
        pointers = [b.data for b in ins]
        if (residual or act) and not bias:
            pointers.insert(2, null)  # NULL bias
        sizes = [rows, tirx.const(n, "int64"), tirx.const(k, "int64")]
        if act is not None:
            code = tirx.const(ACTIVATIONS[act], "int32")
            status = tirx.call_extern("int32", "mlcv_bf16_linear_act", *pointers, outs[0].data, *sizes, code)
        else:
            status = tirx.call_extern("int32", ENTRIES[(bias, residual)], *pointers, outs[0].data, *sizes)
        # The FFI constructor directly: in TVM 0.27 the Python wrapper passes
        # (kind, condition) where the constructor takes (condition, kind).
        return tirx._ffi_api.AssertStmt(  # pylint: disable=protected-access
            status == 0, tvm.ir.StringImm("RuntimeError"),
            [tvm.ir.StringImm("bf16 linear: out of memory for its scratch buffers")], None,
        )  # fmt: skip

    if act is not None and residual:
        raise ValueError("the activation epilogue takes no residual")
    y = te.extern([*lead, n], inputs, body, dtype="bfloat16" if act else "float32", name="bf16_linear")
    func = te.create_prim_func([*inputs, y])
    return func.with_attr("tir.is_scheduled", True)


def compile_object(workdir: Path) -> Path:
    """Compile ``cpu_bf16_gemm.c`` to a position-independent object in ``workdir`` (reused when unchanged)."""
    return compile_c(SOURCE, workdir, "the bf16 CPU kernel")


def attention_primfunc(seq: int, heads: int, head_dim: int, scale: float):
    """PrimFunc ``(q, k, v, out)``, all fp32 ``[batch, seq, heads, head_dim]`` (batch symbolic), calling
    the C kernel's ``out = softmax(scale q . k^T) v`` (bf16 products, fp32 softmax; head_dim even)."""
    import tvm
    from tvm import te, tirx

    batch = tirx.Var("batch", "int64")
    shape = [batch, seq, heads, head_dim]
    q, k, v = (te.placeholder(shape, "float32", name=n) for n in ("q", "k", "v"))

    def body(ins, outs):
        sizes = [batch, *(tirx.const(x, "int64") for x in (seq, heads, head_dim))]
        pointers = [b.data for b in ins] + [outs[0].data]
        status = tirx.call_extern("int32", "mlcv_bf16_attention", *pointers, *sizes, tirx.const(scale, "float32"))
        return tirx._ffi_api.AssertStmt(  # pylint: disable=protected-access
            status == 0, tvm.ir.StringImm("RuntimeError"),
            [tvm.ir.StringImm("bf16 attention: out of memory for its scratch buffers")], None,
        )  # fmt: skip

    out = te.extern(shape, [q, k, v], body, dtype="float32", name="bf16_attention")
    return te.create_prim_func([q, k, v, out]).with_attr("tir.is_scheduled", True)
