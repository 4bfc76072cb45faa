"""bf16 CPU libraries: bf16 weights and matmuls, everything else in fp32.

A CPU library compiled with ``--dtype bfloat16`` takes its inputs and params
in bf16 (the params from ``convert --dtype bfloat16``) and returns bf16, like
a GPU bf16 library. Inside, only the linear layers run in bf16:

1. :func:`bf16_interface` (applied by ``module.build_module`` to the model
   built in fp32): every fp32 tensor a function takes (pixels, packed params)
   becomes bf16 and is cast to fp32 where it enters; every fp32 output is cast
   to bf16 where it leaves. LayerNorm, softmax, GELU, attention and the
   residual stream stay fp32.
2. :func:`bf16_linear_cpu` (the CPU pipeline's first phase): every
   ``matmul(x, permute_dims(cast(w_bf16)))`` (+ a bias vector) becomes a call
   of the C kernel ``kernels/cpu_bf16_gemm.c`` on ``cast(x, bf16)`` and the
   bf16 weight as stored: bf16 x bf16 products, fp32 accumulation, fp32
   bias and output; a residual added to the result (out-projection, fc2) is
   added by the kernel too. The activation cast fuses into the kernel that
   produces x (LayerNorm), the weight cast disappears. A linear layer whose
   only consumer is the next one's input through an activation the kernel
   knows (``cpu_bf16_gemm.ACTIVATIONS``: CLIP's quick GELU, GELU with erf or tanh), e.g. the
   MLP's fc1, applies the activation and the bf16 cast in its own epilogue and
   writes bf16: no fp32 ``[tokens, intermediate]`` tensor, no GELU kernel.
3. :func:`bf16_attention_cpu`: in a bf16 library, every plain ``R.nn.attention``
   (fp32 q, k, v, even head_dim) becomes the C kernel's attention: q . k^T and
   p . v on the same bf16 register tile as the linear layers, the softmax in
   fp32. fp32 libraries keep the fp32 fused kernel (``kernels/cpu_attention.py``).
   When q, k and v are each a reshape of one of our linear layers, or of a part
   of one split into three (InternViT's qkv), used nowhere else, those layers
   store bf16 and the kernel reads bf16: half the bytes written and read, no
   conversion in the kernel. When the attention's output is only reshaped and
   cast to bf16 (the out-projection's input), the kernel writes bf16 and the
   cast disappears.
"""

from __future__ import annotations

import re

import tvm
from tvm import relax

from ..kernels.cpu_bf16_gemm import attention_primfunc, linear_primfunc, uses_bf16_kernel
from .relax_rewrite import (
    ATTENTION_OP,
    BF16,
    F32,
    LinearLayerRewriter,
    llvm_cpu_features,
    plain_attention_shape,
    rewrite_relax_functions,
    same_f32_shape,
    static_int,
)

#: Relax ops that are one of the kernel's activations (``cpu_bf16_gemm.ACTIVATIONS``) of their argument.
ACTIVATION_OPS = {"relax.nn.gelu": "gelu", "relax.nn.gelu_tanh": "gelu_tanh"}


# ---------------------------------------------------------------- interface


def _retype(ty, dtype_from: str, dtype_to: str):
    """``ty`` with every tensor of ``dtype_from`` (also inside tuples) made ``dtype_to``."""
    if isinstance(ty, relax.TensorType) and ty.dtype == dtype_from:
        return relax.TensorType(ty.shape, dtype_to) if ty.shape is not None else relax.TensorType(ndim=ty.ndim, dtype=dtype_to)
    if isinstance(ty, tvm.ir.TupleType):
        return tvm.ir.TupleType([_retype(f, dtype_from, dtype_to) for f in ty.fields])
    return ty


def _cast(expr, ty, dtype: str):
    """``expr`` (of type ``ty``) with every tensor cast to ``dtype``; tuples rebuilt field by field."""
    if isinstance(ty, relax.TensorType):
        return relax.op.astype(expr, dtype)
    if isinstance(ty, tvm.ir.TupleType):
        return relax.Tuple([_cast(relax.TupleGetItem(expr, i), f, dtype) for i, f in enumerate(ty.fields)])
    return expr


def _has_dtype(ty, dtype: str) -> bool:
    if isinstance(ty, relax.TensorType):
        return ty.dtype == dtype
    if isinstance(ty, tvm.ir.TupleType):
        return any(_has_dtype(f, dtype) for f in ty.fields)
    return False


def _bf16_function(func: relax.Function) -> relax.Function:
    """``func`` with fp32 params and results in bf16, cast at the boundary."""
    params, entry = [], []
    for old in func.params:
        if not _has_dtype(old.ty, F32):
            params.append(old)
            continue
        new = relax.Var(old.name, _retype(old.ty, F32, BF16))
        params.append(new)
        entry.append(relax.VarBinding(old, _cast(new, new.ty, F32)))
    body = func.body
    result = body.body
    if _has_dtype(result.ty, F32):
        out = relax.Var("output_bf16", _retype(result.ty, F32, BF16))
        blocks = [relax.BindingBlock(entry), *body.blocks, relax.BindingBlock([relax.VarBinding(out, _cast(result, result.ty, BF16))])]
        result = out
    else:
        blocks = [relax.BindingBlock(entry), *body.blocks]
    return relax.Function(params, relax.SeqExpr(blocks, result), _retype(body.body.ty, F32, BF16), func.is_pure, func.attrs)


def bf16_interface(mod: tvm.IRModule) -> tvm.IRModule:
    """Every Relax function's fp32 inputs and outputs in bf16 (the compute stays fp32)."""
    updates = {gv: _bf16_function(f) for gv, f in mod.functions_items() if isinstance(f, relax.Function) and f.params}
    for gv, func in updates.items():
        mod[gv] = func
    return relax.transform.Normalize()(mod)


# ---------------------------------------------------------------- linear layers


@relax.expr_functor.mutator
class _Bf16LinearRewriter(LinearLayerRewriter):  # pylint: disable=abstract-method
    """``matmul(x, permute_dims(astype(w_bf16)))`` (+ bias) -> ``call_tir(bf16_linear, ...)``."""

    def __init__(self, mod):
        super().__init__(mod)
        self.matmul = tvm.ir.Op.get("relax.matmul")
        self.add = tvm.ir.Op.get("relax.add")
        self.multiply = tvm.ir.Op.get("relax.multiply")
        self.bf16_inputs = {}

    # -- matching helpers
    def _bf16_weight(self, b):
        """The stored bf16 ``[n, k]`` weight behind a matmul's right operand ``permute_dims(w)``, else None."""
        w = self._transposed_weight(b)
        return self._bf16_source(w) if w is not None else None

    def _kernel(self, lead_ndim: int, k: int, n: int, bias: bool, residual: bool = False, act: str | None = None):
        key = (lead_ndim, k, n, bias, residual, act)
        if key not in self.kernels:
            name = f"bf16_linear_k{k}_n{n}" + ("_bias" if bias else "") + ("_residual" if residual else "")
            name += f"_{act}" if act else ""
            self.kernels[key] = self.builder_.add_func(linear_primfunc(lead_ndim, k, n, bias, residual, act), name)
        return self.kernels[key]

    def _linear_call(self, expr):
        """``(key, call)`` when ``expr`` is a var bound to one of our fp32-output linear kernels' ``call_tir``
        (not one with an activation epilogue), else None."""
        found = self._kernel_call(expr)
        return found if found is not None and found[0][5] is None else None

    def _activation(self, x):
        """``(name, y)`` when ``x`` stands for the activation ``name`` (of ``ACTIVATION_OPS`` or quick GELU) of ``y``, else None."""
        value = self._value(x)
        if not isinstance(value, relax.Call):
            return None
        for op, name in ACTIVATION_OPS.items():
            if value.op.same_as(tvm.ir.Op.get(op)):
                return name, value.args[0]
        y = self._quick_gelu_input(value) if value.op.same_as(self.multiply) else None
        return ("quick_gelu", y) if y is not None else None

    def _linear_with_activation(self, x):
        """``x = act(linear(...))`` in bf16 by one kernel with the activation epilogue, else None."""
        found = self._activation(x)
        linear = self._linear_call(found[1]) if found is not None else None
        if linear is None or linear[0][4]:  # not our kernel, or one adding a residual
            return None
        (lead_ndim, k, n, bias, _, _), call = linear
        out_ty = relax.TensorType(x.ty.shape.values, BF16)
        kernel = self._kernel(lead_ndim, k, n, bias, act=found[0])
        return self.builder_.emit(relax.call_tir(kernel, list(call.args[1].fields), out_ty))

    def _x_bf16(self, x):
        """``astype(x, bf16)``, emitted once per activation tensor (by the producing linear layer's
        epilogue when it can)."""
        if x not in self.bf16_inputs:
            fused = self._linear_with_activation(x)
            self.bf16_inputs[x] = fused if fused is not None else self.builder_.emit(relax.op.astype(x, BF16))
        return self.bf16_inputs[x]

    def _linear(self, x, w16, bias=None):
        xt = x.ty
        n, k = (static_int(d) for d in w16.ty.shape.values)
        out_ty = relax.TensorType([*xt.shape.values[:-1], n], F32)
        args = [self._x_bf16(x), w16] + ([bias] if bias is not None else [])
        return relax.call_tir(self._kernel(xt.ndim - 1, k, n, bias is not None), args, out_ty)

    # -- rewrites
    def visit_call_(self, call):  # noqa: D102
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call):
            return call
        if call.op.same_as(self.matmul):
            return self._rewrite_matmul(call)
        if call.op.same_as(self.add):
            folded = self._fold_bias(call)
            return folded if folded is not call else self._fold_residual(call)
        return call

    def _rewrite_matmul(self, call):
        x, b = call.args
        xt = x.ty
        if not isinstance(xt, relax.TensorType) or xt.dtype != F32 or xt.ndim < 2 or xt.shape is None:
            return call
        k = static_int(xt.shape.values[-1])
        w16 = self._bf16_weight(b)
        if w16 is None or k is None or k % 2:
            return call
        n_k = [static_int(d) for d in w16.ty.shape.values]
        if None in n_k or n_k[1] != k:
            return call
        return self._linear(x, w16)

    def _fold_bias(self, call):
        """``add(bf16_linear(x, w), bias[n])`` -> ``bf16_linear(x, w, bias)`` (the unbiased call is then dead)."""
        y, bias = call.args
        found = self._linear_call(y)
        if found is None or found[0][3] or found[0][4]:  # already has a bias or a residual
            return call
        linear = found[1]
        bt = bias.ty
        n = static_int(y.ty.shape.values[-1])
        if not isinstance(bt, relax.TensorType) or bt.dtype != F32 or bt.ndim != 1 or static_int(bt.shape.values[0]) != n:
            return call
        x16, w16 = linear.args[1].fields
        xt = x16.ty
        k = static_int(w16.ty.shape.values[1])
        out_ty = relax.TensorType([*xt.shape.values[:-1], n], F32)
        return relax.call_tir(self._kernel(xt.ndim - 1, k, n, True), [x16, w16, bias], out_ty)


    def _fold_residual(self, call):
        """``add(r, bf16_linear(...))`` (either order) -> the kernel adding ``r`` in its epilogue."""
        for y, residual in (call.args, call.args[::-1]):
            found = self._linear_call(y)
            if found is None or found[0][4]:
                continue
            (lead_ndim, k, n, bias, _, _), linear = found
            if not same_f32_shape(residual.ty, y.ty):
                continue
            args = list(linear.args[1].fields) + [residual]
            return relax.call_tir(self._kernel(lead_ndim, k, n, bias, True), args, y.ty)
        return call


def target_uses_bf16_kernel(target) -> bool:
    """Whether bf16 libraries for ``target`` (the current one when None) call the bf16 C kernel
    (``cpu_bf16_gemm.uses_bf16_kernel``); the others' bf16 weights go to the fp32 kernel
    (``passes/f32_cpu.py``), and their attention stays fp32."""
    features = llvm_cpu_features(target or tvm.target.Target.current(allow_none=True))
    return features is None or uses_bf16_kernel(features)


@tvm.transform.module_pass(opt_level=0, name="Bf16LinearCPU")
def bf16_linear_cpu(mod, _ctx):
    """Linear layers with bf16 weights -> the bf16 C kernel (fp32 models, and bf16 libraries for CPUs
    that compute them in fp32, are left as they are)."""
    if not target_uses_bf16_kernel(None):
        return mod
    mod = rewrite_relax_functions(mod, _Bf16LinearRewriter(mod))
    return relax.transform.DeadCodeElimination()(mod)


def _has_bf16_params(mod: tvm.IRModule) -> bool:
    """Whether a Relax function of ``mod`` takes bf16 tensors: a bf16 library (``bf16_interface``)."""
    return any(
        _has_dtype(p.ty, BF16)
        for _, f in mod.functions_items()
        if isinstance(f, relax.Function)
        for p in f.params
    )


#: The name of one of our linear kernels with an fp32 output and neither residual nor activation.
PLAIN_LINEAR_NAME = re.compile(r"bf16_linear_k(\d+)_n(\d+)(_bias)?")


def _use_counts(mod: tvm.IRModule) -> dict:
    """How often each Relax variable of ``mod`` is used (definitions not counted)."""
    counts = {}

    def count(expr):
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, count)
    return counts


@relax.expr_functor.mutator
class _Bf16AttentionRewriter(relax.PyExprMutator):  # pylint: disable=abstract-method
    """``R.nn.attention`` -> ``call_tir(bf16_attention, ...)`` with bf16 inputs and output where the
    linear layers around it allow (see the module docstring)."""

    def __init__(self, mod):
        super().__init__(mod)
        self.uses = _use_counts(mod)
        self.kernels = {}  # (seq, heads, head_dim, scale, bf16_in, bf16_out) -> GlobalVar
        self.attention_of = {}  # GlobalVar -> its key in self.kernels
        self.bf16_linears = {}

    def _only_use(self, var) -> bool:
        return isinstance(var, relax.Var) and self.uses.get(var, 0) == 1

    def _bound(self, var, op: str):
        """The call ``op(...)`` bound to ``var``, else None."""
        value = self.lookup_binding(var) if isinstance(var, relax.Var) else None
        if isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get(op)):
            return value
        return None

    def _attention_kernel(self, key):
        if key not in self.kernels:
            seq, heads, head_dim, scale, bf16_in, bf16_out = key
            name = f"bf16_attention_s{seq}_h{heads}_d{head_dim}" + ("_in16" if bf16_in else "")
            name += "_out16" if bf16_out else ""
            gv = self.builder_.add_func(attention_primfunc(*key), name)
            self.kernels[key], self.attention_of[gv] = gv, key
        return self.kernels[key]

    def _plain_linear(self, var):
        """The call of one of our plain linear kernels (``PLAIN_LINEAR_NAME``) bound to ``var``, used
        only once, else None."""
        linear = self._bound(var, "relax.call_tir") if self._only_use(var) else None
        callee = linear.args[0] if linear is not None else None
        if not (isinstance(callee, tvm.ir.GlobalVar) and PLAIN_LINEAR_NAME.fullmatch(callee.name_hint)):
            return None
        return linear

    def _emit_bf16_linear(self, linear):
        """``linear`` (a plain linear kernel's call) again, by its twin that stores bf16."""
        callee = linear.args[0]
        match = PLAIN_LINEAR_NAME.fullmatch(callee.name_hint)
        x16 = linear.args[1].fields[0]
        key = (x16.ty.ndim - 1, int(match[1]), int(match[2]), match[3] is not None)
        if key not in self.bf16_linears:
            func = linear_primfunc(*key, bf16_out=True)
            self.bf16_linears[key] = self.builder_.add_func(func, callee.name_hint + "_bf16")
        out_ty = relax.TensorType(linear.ty.shape.values, BF16)
        return self.builder_.emit(relax.call_tir(self.bf16_linears[key], list(linear.args[1].fields), out_ty))

    def _split_source(self, var):
        """``(split call, index, split var)`` when ``var`` (used once) is ``split(y)[index]`` and the
        split's outputs are used once each, else None."""
        item = self.lookup_binding(var) if self._only_use(var) else None
        if not isinstance(item, relax.TupleGetItem):
            return None
        split = self._bound(item.tuple_value, "relax.split")
        if split is None or self.uses.get(item.tuple_value, 0) != len(split.ty.fields):
            return None
        return split, item.index, item.tuple_value

    def _bf16_inputs(self, args):
        """q, k, v re-emitted from bf16-output linear layers, when each is ``reshape(linear)`` or
        ``reshape(split(linear)[i])``, every intermediate used only there; else None."""
        plans = []
        for arg in args:
            reshape = self._bound(arg, "relax.reshape") if self._only_use(arg) else None
            if reshape is None:
                return None
            split = self._split_source(reshape.args[0])
            linear = self._plain_linear(split[0].args[0] if split is not None else reshape.args[0])
            if linear is None:
                return None
            plans.append((reshape, split, linear))
        out, splits = [], {}
        for reshape, split, linear in plans:
            if split is None:
                source = self._emit_bf16_linear(linear)
            else:
                call, index, split_var = split
                if split_var not in splits:
                    sections = call.attrs.indices_or_sections
                    sections = int(sections) if isinstance(sections, tvm.tirx.IntImm) else [int(i) for i in sections]
                    y16 = self._emit_bf16_linear(linear)
                    splits[split_var] = self.builder_.emit(relax.op.split(y16, sections, int(call.attrs.axis)))
                source = self.builder_.emit(relax.TupleGetItem(splits[split_var], index))
            out.append(self.builder_.emit(relax.op.reshape(source, reshape.args[1])))
        return out

    def visit_call_(self, call):  # noqa: D102
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call):
            return call
        if call.op.same_as(tvm.ir.Op.get(ATTENTION_OP)):
            return self._attention(call)
        if call.op.same_as(tvm.ir.Op.get("relax.astype")) and call.attrs.dtype == BF16:
            return self._bf16_output(call)
        return call

    def _attention(self, call):
        shape = plain_attention_shape(call)
        if shape is None:
            return call
        seq, heads, head_dim, dtype, scale = shape
        if dtype != F32 or head_dim % 2:
            return call
        inputs = self._bf16_inputs(call.args)
        key = (seq, heads, head_dim, scale, inputs is not None, False)
        return relax.call_tir(self._attention_kernel(key), inputs or list(call.args), call.args[0].ty)

    def _bf16_output(self, call):
        """``astype(reshape(attention), bf16)`` (each used only there) -> ``reshape(attention with a bf16
        output)``; the fp32 attention is then dead."""
        reshape = self._bound(call.args[0], "relax.reshape") if self._only_use(call.args[0]) else None
        source = reshape.args[0] if reshape is not None else None
        attention = self._bound(source, "relax.call_tir") if self._only_use(source) else None
        key = self.attention_of.get(attention.args[0]) if attention is not None else None
        if key is None or key[5]:
            return call
        kernel = self._attention_kernel((*key[:5], True))
        out_ty = relax.TensorType(source.ty.shape.values, BF16)
        out16 = self.builder_.emit(relax.call_tir(kernel, list(attention.args[1].fields), out_ty))
        return relax.op.reshape(out16, reshape.args[1])


@tvm.transform.module_pass(opt_level=0, name="Bf16AttentionCPU")
def bf16_attention_cpu(mod, _ctx):
    """In a bf16 library, plain attention -> the bf16 C kernel (fp32 libraries are left as they are,
    and so are bf16 libraries for CPUs without bf16 arithmetic: see :func:`target_uses_bf16_kernel`)."""
    if not _has_bf16_params(mod) or not target_uses_bf16_kernel(None):
        return mod
    mod = rewrite_relax_functions(mod, _Bf16AttentionRewriter(mod))
    return relax.transform.DeadCodeElimination()(mod)
