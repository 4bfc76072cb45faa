"""What the Relax rewrites share: recognizing a plain ``R.nn.attention``, the
mutator base that replaces such calls, the one that matches linear layers and
their epilogues, following a value through its bindings, the CPU features of
the current target, and running a mutator over every Relax function of a
module."""

from __future__ import annotations

import math

import tvm
from tvm import relax

ATTENTION_OP = "relax.nn.attention"
F32 = "float32"
BF16 = "bfloat16"
#: quick GELU is ``y * sigmoid(QUICK_GELU_SCALE * y)`` (layers.quick_gelu).
QUICK_GELU_SCALE = 1.702


def llvm_cpu_features(target) -> set[str] | None:
    """The instruction-set extensions (LLVM names) of the LLVM CPU target ``target`` (its mcpu and
    mattr); None for no target or another kind. What the CPU passes route by."""
    if target is None or target.kind.name != "llvm":
        return None
    return set(tvm.get_global_func("target.llvm_get_cpu_features")(target).keys())


def bound_value(mutator: relax.PyExprMutator, expr):
    """What ``expr`` stands for in ``mutator``'s bindings: variables, aliases and ``Tuple(...)[i]``
    followed (a bf16 library's weights are fields of a tuple of casts)."""
    for _ in range(16):
        if isinstance(expr, relax.Var) and mutator.lookup_binding(expr) is not None:
            expr = mutator.lookup_binding(expr)
        elif isinstance(expr, relax.TupleGetItem):
            tup = bound_value(mutator, expr.tuple_value)
            if not isinstance(tup, relax.Tuple):
                return expr
            expr = tup.fields[expr.index]
        else:
            return expr
    return expr


def static_int(expr):
    """The value of a static TIR integer, None for a symbolic one."""
    return int(expr) if isinstance(expr, tvm.tirx.IntImm) else None


def same_dim(a, b) -> bool:
    """Two shape dims are the same: equal constants, or one symbolic variable."""
    if static_int(a) is not None or static_int(b) is not None:
        return static_int(a) == static_int(b)
    return a.same_as(b)


def same_f32_shape(a, b) -> bool:
    """``a`` and ``b`` are the types of fp32 tensors of one shape (symbolic dims compared by variable)."""
    ok = all(isinstance(t, relax.TensorType) and t.dtype == F32 and t.shape is not None for t in (a, b))
    return ok and a.ndim == b.ndim and all(same_dim(x, y) for x, y in zip(a.shape.values, b.shape.values))


def plain_attention_shape(call):
    """``(seq, heads, head_dim, dtype, scale)`` of a plain ``R.nn.attention``, else None.

    Plain: no bias, causal mask or window; q, k, v of one static shape
    ``[batch, seq, heads, head_dim]`` (batch may be symbolic) and one dtype.
    The fused kernels take exactly these; each adds its own limits.
    """
    if len(call.args) != 3 or call.attrs.causal_mask is not None:
        return None
    if getattr(call.attrs, "window_size", None) is not None:
        return None
    tys = [a.ty for a in call.args]
    if not all(isinstance(t, relax.TensorType) and t.ndim == 4 and t.shape is not None for t in tys):
        return None
    dtype = tys[0].dtype
    if any(t.dtype != dtype for t in tys):
        return None
    dims = [[static_int(x) for x in t.shape.values[1:]] for t in tys]
    if any(dims[i] != dims[0] for i in (1, 2)) or None in dims[0]:
        return None
    seq, heads, head_dim = dims[0]
    scale = call.attrs.scale
    return seq, heads, head_dim, dtype, 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def add_kernel_once(mutator: relax.PyExprMutator, kernels: dict, name: str, make):
    """The GlobalVar of the PrimFunc ``make()`` added to ``mutator``'s module under ``name`` on first
    use (``kernels``: name -> GlobalVar, the ones added so far)."""
    if name not in kernels:
        kernels[name] = mutator.builder_.add_func(make(), name)
    return kernels[name]


def rewrite_relax_functions(mod, mutator):
    """Run ``mutator`` (a ``relax.PyExprMutator`` built on ``mod``) over every Relax function of ``mod``."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


class AttentionCallRewriter(relax.PyExprMutator):  # pylint: disable=abstract-method
    """Base of the mutators that replace plain ``R.nn.attention`` calls.

    A subclass (decorated with ``@relax.expr_functor.mutator``) implements
    ``rewrite(call, shape)``, called for every plain attention with
    :func:`plain_attention_shape`'s tuple, returning the replacement or ``call``;
    :meth:`kernel` adds a PrimFunc to the module once per name.
    """

    def __init__(self, mod):
        super().__init__(mod)
        self.op = tvm.ir.Op.get(ATTENTION_OP)
        self.kernels = {}

    def visit_call_(self, call):  # noqa: D102
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or not call.op.same_as(self.op):
            return call
        shape = plain_attention_shape(call)
        return call if shape is None else self.rewrite(call, shape)

    def rewrite(self, call, shape):
        """The replacement of the plain attention ``call`` of ``shape`` (``call`` to keep it)."""
        raise NotImplementedError

    def kernel(self, name, make):
        """The GlobalVar of the PrimFunc ``make()`` under ``name``, added on first use."""
        return add_kernel_once(self, self.kernels, name, make)


class LinearLayerRewriter(relax.PyExprMutator):  # pylint: disable=abstract-method
    """Base of the mutators that replace linear layers, ``matmul(x, permute_dims(w))``, and the
    epilogues after them by calls of a C kernel (``passes/f32_cpu.py``, ``passes/bf16_cpu.py``):
    the patterns both match.

    A subclass (decorated with ``@relax.expr_functor.mutator``) keeps the kernels it added in
    ``self.kernels``, a dict from what each computes (its key) to its GlobalVar.
    """

    def __init__(self, mod):
        super().__init__(mod)
        self.kernels = {}

    def _value(self, expr):
        """What ``expr`` stands for (:func:`bound_value`)."""
        return bound_value(self, expr)

    def _bound(self, expr, op: str):
        """The call ``op(...)`` that ``expr`` stands for, else None."""
        value = self._value(expr)
        if isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get(op)):
            return value
        return None

    def _kernel_call(self, expr):
        """``(key, call)`` when ``expr`` is a variable bound to a ``call_tir`` of one of
        ``self.kernels``, else None."""
        if not isinstance(expr, relax.Var):
            return None
        call = self.lookup_binding(expr)
        if not (isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.call_tir"))):
            return None
        key = next((key for key, gv in self.kernels.items() if gv.same_as(call.args[0])), None)
        return (key, call) if key is not None else None

    def _transposed_weight(self, b):
        """The fp32 ``[n, k]`` weight (static n and k) behind a matmul's right operand
        ``permute_dims(w)``, else None."""
        transpose = self._bound(b, "relax.permute_dims")
        if transpose is None:
            return None
        w = transpose.args[0]
        wt = w.ty
        if not isinstance(wt, relax.TensorType) or wt.ndim != 2 or wt.dtype != F32 or wt.shape is None:
            return None
        if transpose.attrs.axes is not None and [int(a) for a in transpose.attrs.axes] != [1, 0]:
            return None
        if None in [static_int(d) for d in wt.shape.values]:
            return None
        return w

    def _bf16_source(self, w):
        """The bf16 tensor, in ``w``'s shape, that fp32 ``w`` is cast from (``astype`` then maybe
        ``reshape``: a bf16 library's parameter), else None."""
        reshape = self._bound(w, "relax.reshape")
        cast = self._bound(reshape.args[0] if reshape is not None else w, "relax.astype")
        if cast is None or cast.args[0].ty.dtype != BF16:
            return None
        source = cast.args[0]
        return source if reshape is None else self.builder_.emit(relax.op.reshape(source, w.ty.shape))

    def _scaled(self, expr, y, scale: float) -> bool:
        """Whether ``expr`` stands for ``y * scale`` (a scalar constant, either order)."""
        mul = self._bound(expr, "relax.multiply")
        if mul is None:
            return False
        for a, c in (mul.args, mul.args[::-1]):
            if a.same_as(y) and isinstance(c, tvm.ir.Constant) and c.value.numpy().size == 1:
                return abs(float(c.value.numpy().reshape(())) - scale) < 1e-6
        return False

    def _quick_gelu_input(self, mul):
        """``y`` when the multiply ``mul`` is ``y * sigmoid(y * 1.702)`` (any operand order), else None."""
        for y, s in (mul.args, mul.args[::-1]):
            sigmoid = self._bound(s, "relax.sigmoid")
            if sigmoid is not None and self._scaled(sigmoid.args[0], y, QUICK_GELU_SCALE):
                return y
        return None
