"""The fp32 linear layer of CPU libraries on AVX-512 and AVX2 CPUs: a C kernel (``cpu_f32_gemm.c``) called from TIR.

A GEMM of packed weight slices (K blocks sized from the detected L2, the
accumulators of a register tile of fp32 FMAs kept over the whole block: 6 x 64
in zmm on AVX-512, 6 x 16 in ymm on AVX2 + FMA),
with the linear layer's epilogue: bias, layer scale, residual, an activation
(quick GELU, GELU erf / tanh, SiLU) and SwiGLU's product with the up projection. Compiled
with the host C compiler at export and linked into the library
(``export_library(addons=[object])``); the PrimFunc here calls it with
``call_extern``. The weights are read as stored, or packed once when the
library is loaded (:func:`pack_primfunc`, the ``packed`` PrimFuncs; the library's
``prepack_params``, docs/internals.md). ``passes/f32_cpu.py`` routes fp32 linear layers to it where
the library's CPU has one of its vector paths (:data:`VECTOR_PATH_FEATURES`); elsewhere the TIR schedule
(``schedules/cpu.py``) keeps them. The same file holds the fp32 attention of
those libraries (:func:`attention_primfunc`).
"""

from __future__ import annotations

from pathlib import Path

from .c_objects import compile_c, flat_rows, null_pointer, raise_unless_zero

SOURCE = Path(__file__).with_suffix(".c")
ENTRY = "mlcv_f32_linear"
#: The entry taking bf16 weights (their raw 16-bit words), widened to fp32 as they are packed.
ENTRY_BF16_WEIGHTS = "mlcv_f32_linear_bf16w"
#: The entry computing two or three linear layers of one input as one job, and its form for bf16 weights.
GROUP_ENTRY = "mlcv_f32_linear_group"
GROUP_ENTRY_BF16_WEIGHTS = "mlcv_f32_linear_group_bf16w"
#: Linear layers one group call takes at most.
GROUP_MAX_PARTS = 3
#: The entries taking weights packed by :data:`PACK_ENTRY` (``mlcv_f32_pack_weights``).
ENTRY_PACKED = "mlcv_f32_linear_packed"
GROUP_ENTRY_PACKED = "mlcv_f32_linear_group_packed"
PACK_ENTRY = "mlcv_f32_pack_weights"
#: Packed weights fill their columns up to a multiple of this (the widest panel of any path), then a
#: header of PACK_HEADER_FLOATS follows (``F32_PACK_COLUMNS``, ``F32_PACK_HEADER_FLOATS`` in the C file).
PACK_COLUMNS = 64
PACK_HEADER_FLOATS = 16
#: Activations of the epilogue by the numbers of ``cpu_f32_gemm.c``'s ``F32_ACT_*``; the keys are
#: the names ``passes/f32_cpu.py`` matches.
ACTIVATIONS = {"quick_gelu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
#: What ``mlcv_f32_best_path()`` returns, by number.
PATHS = {0: "generic", 1: "avx512", 2: "avx2"}
#: The instruction sets (LLVM names) of each vector path: a CPU with all of one set runs that path.
VECTOR_PATH_FEATURES = {"avx512": {"avx512f"}, "avx2": {"avx2", "fma"}}


def has_vector_path(cpu_features) -> bool:
    """Whether a CPU with ``cpu_features`` (LLVM names) runs one of the kernel's vector paths."""
    features = set(cpu_features or ())
    return any(needed <= features for needed in VECTOR_PATH_FEATURES.values())


def uses_f32_kernel(target_name: str, cpu_features) -> bool:
    """Whether a library may call the fp32 C GEMM (and links it): a CPU library for a CPU with a
    vector path (``cpu_features``: ``metadata["cpu"]["features"]``, LLVM names; the pass decides from
    the target made of the same spec). Other CPUs keep the TIR GEMM, which LLVM vectorizes for them."""
    return target_name == "cpu" and has_vector_path(cpu_features)


#: What a failed linear call means: out of memory for its packing buffers, or (status -2) weights packed
#: for another CPU path or shape.
LINEAR_FAILED = (
    "fp32 linear: out of memory for the packing buffers, or weights packed for another CPU or shape "
    "(pass the params that this process's prepack_params returned)"
)


def _check_weight_dtype(weight_dtype: str, packed: bool = False) -> None:
    if weight_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"weights must be float32 or bfloat16, not {weight_dtype}")
    if packed and weight_dtype != "float32":
        raise ValueError("only float32 weights are packed")


def packed_floats(n: int, k: int) -> int:
    """Floats of fp32 weights ``[n, k]`` packed by the kernel (``mlcv_f32_packed_floats``): the
    panels of any path, then the header."""
    return -(-n // PACK_COLUMNS) * PACK_COLUMNS * k + PACK_HEADER_FLOATS


def _weight_placeholder(name: str, n: int, k: int, weight_dtype: str, packed: bool):
    """The weight argument of a linear PrimFunc: ``[n, k]`` as stored, or the packed floats."""
    from tvm import te

    return te.placeholder([packed_floats(n, k)] if packed else [n, k], weight_dtype, name=name)


def pack_primfunc(n: int, k: int):
    """PrimFunc ``(w [n, k], packed [packed_floats(n, k)])``, fp32: the weights packed for the path
    this CPU runs (the slices each call would otherwise pack). A library's ``prepack_params`` runs it
    once per linear layer; the ``packed`` linear PrimFuncs read its output."""
    from tvm import te, tirx

    w = te.placeholder([n, k], "float32", name="w")

    def body(ins, outs):
        sizes = [tirx.const(n, "int64"), tirx.const(k, "int64")]
        status = tirx.call_extern("int32", PACK_ENTRY, ins[0].data, outs[0].data, *sizes)
        return raise_unless_zero(status, "fp32 weight packing: the packed buffer is misaligned")

    packed = te.extern([packed_floats(n, k)], [w], body, dtype="float32", name="f32_pack_weights")
    return te.create_prim_func([w, packed]).with_attr("tir.is_scheduled", True)


def linear_primfunc(lead_ndim: int, k: int, n: int, bias: bool, scale: bool = False, residual: bool = False,
                    gate: bool = False, act: str | None = None, weight_dtype: str = "float32", packed: bool = False):
    """PrimFunc ``(x [..., k], w [n, k], (bias [n]), (scale [n]), (residual or gate [..., n]), y [..., n])``, fp32
    but for ``w``, which is ``weight_dtype`` (``float32`` or ``bfloat16``: a bf16 library on a CPU without
    bf16 arithmetic, its weights widened as the kernel packs them); ``packed``: ``w`` is fp32 packed by
    :func:`pack_primfunc`, ``[packed_floats(n, k)]``.

    It calls the C kernel: ``y = act((x . w^T (+ bias)) (* scale) (+ residual)) (* gate)``;
    ``act`` is a key of :data:`ACTIVATIONS` or None. The ``lead_ndim`` leading
    axes of x (batch, tokens) may be symbolic and are flattened into the rows.
    """
    from tvm import te, tirx

    if residual and gate:
        raise ValueError("the epilogue takes a residual or a gate, not both")
    _check_weight_dtype(weight_dtype, packed)
    lead = [tirx.Var(f"d{i}", "int64") for i in range(lead_ndim)]
    x = te.placeholder([*lead, k], "float32", name="x")
    w = _weight_placeholder("w", n, k, weight_dtype, packed)
    inputs = [x, w] + ([te.placeholder([n], "float32", name="bias")] if bias else [])
    inputs += [te.placeholder([n], "float32", name="scale")] if scale else []
    if residual or gate:
        inputs.append(te.placeholder([*lead, n], "float32", name="residual" if residual else "gate"))
    rows, null = flat_rows(lead), null_pointer()

    def body(ins, outs):
        data = [b.data for b in ins]
        pointers = [data[0], data[1], data[2] if bias else null, data[2 + bias] if scale else null]
        extra = data[-1] if (residual or gate) else null
        pointers += [extra, null] if residual else [null, extra]
        sizes = [rows, tirx.const(n, "int64"), tirx.const(k, "int64")]
        code = tirx.const(ACTIVATIONS[act] if act else 0, "int32")
        entry = ENTRY_PACKED if packed else ENTRY if weight_dtype == "float32" else ENTRY_BF16_WEIGHTS
        status = tirx.call_extern("int32", entry, *pointers, outs[0].data, *sizes, code)
        return raise_unless_zero(status, LINEAR_FAILED)

    y = te.extern([*lead, n], inputs, body, dtype="float32", name="f32_linear")
    return te.create_prim_func([*inputs, y]).with_attr("tir.is_scheduled", True)


def linear_group_primfunc(lead_ndim: int, k: int, n: int, biases: tuple[bool, ...], weight_dtype: str = "float32",
                          packed: bool = False):
    """PrimFunc ``(x [..., k], w_0 .. w_p [n, k], the biases [n] where ``biases[i]``, y_0 .. y_p [..., n])``
    for p + 1 = ``len(biases)`` (2 or 3) linear layers of one input, weights in ``weight_dtype`` (or
    packed, as :func:`linear_primfunc`'s): one call of the C kernel's group entry computing every
    ``y_i = x . w_i^T (+ bias_i)`` as one job."""
    from tvm import te, tirx

    parts = len(biases)
    if not 2 <= parts <= GROUP_MAX_PARTS:
        raise ValueError(f"a group has 2 to {GROUP_MAX_PARTS} linear layers, not {parts}")
    _check_weight_dtype(weight_dtype, packed)
    lead = [tirx.Var(f"d{i}", "int64") for i in range(lead_ndim)]
    x = te.placeholder([*lead, k], "float32", name="x")
    weights = [_weight_placeholder(f"w{i}", n, k, weight_dtype, packed) for i in range(parts)]
    bias_inputs = [te.placeholder([n], "float32", name=f"bias{i}") for i, has in enumerate(biases) if has]
    rows, null = flat_rows(lead), null_pointer()
    padding = [null] * (GROUP_MAX_PARTS - parts)

    def body(ins, outs):
        data = iter(b.data for b in ins[1 + parts :])
        bias_pointers = [next(data) if has else null for has in biases]
        pointers = [b.data for b in ins[1 : 1 + parts]] + padding + bias_pointers + padding
        pointers += [y.data for y in outs] + padding
        sizes = [rows, tirx.const(n, "int64"), tirx.const(k, "int64")]
        entry = GROUP_ENTRY_PACKED if packed else GROUP_ENTRY if weight_dtype == "float32" else GROUP_ENTRY_BF16_WEIGHTS
        status = tirx.call_extern("int32", entry, tirx.const(parts, "int32"), ins[0].data, *pointers, *sizes)
        return raise_unless_zero(status, LINEAR_FAILED)

    inputs = [x, *weights, *bias_inputs]
    ys = te.extern([[*lead, n]] * parts, inputs, body, dtype=["float32"] * parts, name="f32_linear_group")
    return te.create_prim_func([*inputs, *ys]).with_attr("tir.is_scheduled", True)


def compile_object(workdir: Path) -> Path:
    """Compile ``cpu_f32_gemm.c`` to a position-independent object in ``workdir`` (reused when unchanged)."""
    return compile_c(SOURCE, workdir, "the fp32 CPU GEMM kernel")


#: Largest head_dim the attention kernel takes (``ATT_MAX_D`` in the C file).
ATTENTION_MAX_HEAD_DIM = 128


def attention_primfunc(seq: int, heads: int, head_dim: int, scale: float):
    """PrimFunc ``(q, k, v, out)``, all fp32 ``[batch, seq, heads, head_dim]`` (batch symbolic), calling
    the C kernel's ``out = softmax(scale q . k^T) v`` (head_dim <= :data:`ATTENTION_MAX_HEAD_DIM`)."""
    from tvm import te, tirx

    batch = tirx.Var("batch", "int64")
    shape = [batch, seq, heads, head_dim]
    q, k, v = (te.placeholder(shape, "float32", name=n) for n in ("q", "k", "v"))

    def body(ins, outs):
        sizes = [batch, *(tirx.const(x, "int64") for x in (seq, heads, head_dim))]
        pointers = [b.data for b in ins] + [outs[0].data]
        status = tirx.call_extern("int32", "mlcv_f32_attention", *pointers, *sizes, tirx.const(scale, "float32"))
        return raise_unless_zero(status, "fp32 attention: out of memory for its scratch buffers")

    out = te.extern(shape, [q, k, v], body, dtype="float32", name="f32_attention")
    return te.create_prim_func([q, k, v, out]).with_attr("tir.is_scheduled", True)
