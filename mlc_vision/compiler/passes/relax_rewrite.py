"""What the Relax rewrites share: recognizing a plain ``R.nn.attention``, the
mutator base that replaces such calls, following a value through its bindings,
the CPU features of the current target, and running a mutator over every Relax
function of a module."""

from __future__ import annotations

import math

import tvm
from tvm import relax

ATTENTION_OP = "relax.nn.attention"


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
