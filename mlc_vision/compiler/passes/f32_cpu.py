"""fp32 CPU libraries on AVX-512 and AVX2 CPUs: linear layers -> the C GEMM (``kernels/cpu_f32_gemm.c``).

:func:`f32_linear_cpu_pass` (the CPU pipeline's first phase, only when the
library's CPU has AVX-512F or AVX2 + FMA; ``kernels/cpu_f32_gemm.uses_f32_kernel``) rewrites every fp32
``matmul(x, permute_dims(w))`` with a static 2-D weight ``w [n, k]`` (the
checkpoint's ``[out, in]`` layout, read as stored) into a call of the C
kernel; in a bf16 library (for a CPU without bf16 arithmetic: the bf16
passes left it alone) ``w`` is a cast of a bf16 parameter, and the kernel
reads the bf16 parameter itself, widening it as it packs. The rows (batch x tokens) may be symbolic (native-resolution towers).
Then the kernel's epilogue absorbs what the TIR GEMM rule would have fused:

* ``+ bias[n]``;
* ``* scale[n]``: a layer scale (DINOv2, InternViT ``x + ls * f(x)``);
* ``+ residual`` of the output's shape (attention out-projection, fc2);
* an activation of the output: GELU (erf or tanh), CLIP's quick GELU
  ``y * sigmoid(1.702 y)``, SiLU;
* SwiGLU's ``silu(gate(x)) * up(x)``: the gate projection's kernel multiplies
  by the up projection's output.

The unfused calls are then dead and removed. Linear layers of one input with
nothing past the bias (a layer's q, k and v projections; any of them may lack
the bias) then become one call of the kernel's group entry: one launch and one
split of their panels over the threads instead of three, the weights read as
stored (no concatenation). Every other matmul (attention's
batched products, fp16, the bf16 kernel's libraries, CPUs without AVX2) is left to the
TIR schedule of ``schedules/cpu.py``.

With ``prepack`` (:func:`f32_linear_cpu_pass`; fp32 libraries, recorded in
their metadata) every entry ``F`` (a function with ``num_input``) gets a twin
``F_prepacked`` whose kernels read weights packed by ``pack_primfunc``, and
the packing is lifted out of the twins (``relax.transform.LiftTransformParams``)
into one function, ``prepack_params(params) -> prepacked``, that a runtime
calls once after loading the weights: the twins take ``prepacked`` where
``F`` takes ``params``, and no call packs weights any more. ``F`` itself is
unchanged (the calling convention of DESIGN.md).

:func:`f32_attention_cpu` (with ``--attention fused``, the fp32 default):
plain fp32 ``R.nn.attention`` with head_dim <= 128 becomes the same C file's
attention (per image and head: k^T and v packed once, 48 queries at a time:
scores on a 6 x 64 register tile, softmax in place, p . v on a tile as wide
as the head; on AVX2 both products on 6 x 16 ymm tiles) instead of the TIR
fused kernel (``kernels/cpu_attention.py``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import tvm
from tvm import relax

from ..kernels.cpu_f32_gemm import (
    ATTENTION_MAX_HEAD_DIM,
    GROUP_MAX_PARTS,
    attention_primfunc,
    has_vector_path,
    linear_group_primfunc,
    linear_primfunc,
    pack_primfunc,
    packed_floats,
)
from .fuse_attention import replace_attention
from .relax_rewrite import (
    BF16,
    F32,
    LinearLayerRewriter,
    add_kernel_once,
    llvm_cpu_features,
    rewrite_relax_functions,
    same_f32_shape,
    static_int,
)

#: Relax ops that are one of the kernel's activations of their argument.
ACTIVATION_OPS = {"relax.nn.gelu": "gelu", "relax.nn.gelu_tanh": "gelu_tanh", "relax.nn.silu": "silu"}
#: With ``prepack``: the function that packs the weights once, and the suffix of each entry's twin.
PREPACK_FUNCTION = "prepack_params"
PREPACKED_SUFFIX = "_prepacked"


def target_runs_f32_kernel(target) -> bool:
    """Whether the LLVM CPU target ``target`` (mcpu and mattr) has one of the C kernel's vector paths."""
    features = llvm_cpu_features(target)
    return features is not None and has_vector_path(features)


class _Key(NamedTuple):
    """What one of our kernels computes; its ``call_tir`` arguments are
    ``[x, w, (bias), (scale), (residual or gate)]``."""

    lead_ndim: int
    k: int
    n: int
    bias: bool = False
    scale: bool = False
    residual: bool = False
    gate: bool = False
    act: str | None = None
    weight_dtype: str = "float32"

    def name(self) -> str:
        flags = [f for f in ("bias", "scale", "residual") if getattr(self, f)] + (["gated"] if self.gate else [])
        weights = "_bf16w" if self.weight_dtype == BF16 else ""
        return "_".join([f"f32_linear{weights}_k{self.k}_n{self.n}", *flags] + ([self.act] if self.act else []))

    def bare(self) -> bool:
        """Nothing after the bias yet: a scale, residual, activation or gate can still be folded in."""
        return not (self.scale or self.residual or self.gate or self.act)


@relax.expr_functor.mutator
class _F32LinearRewriter(LinearLayerRewriter):  # pylint: disable=abstract-method
    """``matmul(x, permute_dims(w))`` and its epilogue -> ``call_tir(f32_linear, ...)``.

    Each kernel is named by its :class:`_Key`.
    """

    def __init__(self, mod):
        super().__init__(mod)
        self.ops = {name: tvm.ir.Op.get(f"relax.{name}") for name in ("matmul", "add", "multiply")}

    # -- matching helpers
    def _weight(self, b):
        """The ``[n, k]`` weight (static n and k) behind a matmul's right operand ``permute_dims(w)``, else None.

        An fp32 ``w`` is the weight; so is the bf16 tensor ``w`` is cast from (a bf16 library's
        parameter, possibly reshaped after the cast: the kernel widens it as it packs).
        """
        w = self._transposed_weight(b)
        source = self._bf16_source(w) if w is not None else None
        return w if source is None else source

    def _kernel(self, key: _Key):
        if key not in self.kernels:
            func = linear_primfunc(key.lead_ndim, key.k, key.n, key.bias, key.scale, key.residual, key.gate, key.act,
                                   key.weight_dtype)  # fmt: skip
            self.kernels[key] = self.builder_.add_func(func, key.name())
        return self.kernels[key]

    def _call(self, key, args, ty):
        return relax.call_tir(self._kernel(key), args, relax.TensorType(ty.shape.values, F32))

    def _linear(self, expr):
        """``(key, args)`` when ``expr`` is a var bound to one of our kernels' ``call_tir``, else None."""
        found = self._kernel_call(expr)
        return (found[0], list(found[1].args[1].fields)) if found is not None else None

    def _bare(self, expr):
        """Like :meth:`_linear`, for a kernel with nothing after its bias yet (:meth:`_Key.bare`)."""
        found = self._linear(expr)
        return found if found is not None and found[0].bare() else None

    @staticmethod
    def _column_vector(expr, n) -> bool:
        """Whether ``expr`` is an fp32 ``[n]`` tensor."""
        t = expr.ty
        ok = isinstance(t, relax.TensorType) and t.dtype == F32 and t.ndim == 1 and t.shape is not None
        return ok and static_int(t.shape.values[0]) == n

    # -- rewrites
    def visit_call_(self, call):  # noqa: D102
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
            return call
        if call.op.same_as(self.ops["matmul"]):
            return self._rewrite_matmul(call)
        if call.op.same_as(self.ops["add"]):
            folded = self._fold_bias(call)
            return folded if folded is not call else self._fold_residual(call)
        if call.op.same_as(self.ops["multiply"]):
            for fold in (self._fold_quick_gelu, self._fold_scale, self._fold_gate):
                folded = fold(call)
                if folded is not call:
                    return folded
            return call
        for op, act in ACTIVATION_OPS.items():
            if call.op.same_as(tvm.ir.Op.get(op)):
                return self._fold_activation(call, call.args[0], act)
        return call

    def _rewrite_matmul(self, call):
        x, b = call.args
        xt = x.ty
        if not isinstance(xt, relax.TensorType) or xt.dtype != F32 or xt.ndim < 2 or xt.shape is None:
            return call
        w = self._weight(b)
        k = static_int(xt.shape.values[-1])
        if w is None or k is None or static_int(w.ty.shape.values[1]) != k:
            return call
        n = static_int(w.ty.shape.values[0])
        return self._call(_Key(xt.ndim - 1, k, n, weight_dtype=w.ty.dtype), [x, w], call.ty)

    def _fold_bias(self, call):
        """``add(linear(x, w), bias[n])`` -> the kernel adding the bias."""
        y, bias = call.args
        found = self._bare(y)
        if found is None or found[0].bias or not self._column_vector(bias, found[0].n):
            return call
        key, args = found
        return self._call(key._replace(bias=True), args + [bias], y.ty)

    def _fold_scale(self, call):
        """``linear(...) * s[n]`` (either order; a layer scale) -> the kernel scaling its columns."""
        for y, scale in (call.args, call.args[::-1]):
            found = self._bare(y)
            if found is not None and self._column_vector(scale, found[0].n):
                key, args = found
                return self._call(key._replace(scale=True), args + [scale], y.ty)
        return call

    def _fold_residual(self, call):
        """``add(r, linear(...))`` (either order) -> the kernel adding ``r`` in its epilogue."""
        for y, residual in (call.args, call.args[::-1]):
            found = self._linear(y)
            if found is None or not found[0]._replace(scale=False).bare() or not same_f32_shape(residual.ty, y.ty):
                continue
            key, args = found
            return self._call(key._replace(residual=True), args + [residual], y.ty)
        return call

    def _fold_activation(self, call, y, act):
        """``act(linear(...))`` -> the kernel applying ``act``."""
        found = self._bare(y)
        if found is None:
            return call
        key, args = found
        return self._call(key._replace(act=act), args, y.ty)

    def _fold_quick_gelu(self, call):
        """``y * sigmoid(y * 1.702)`` (any operand order) of a linear layer's output -> quick GELU epilogue."""
        y = self._quick_gelu_input(call)
        return call if y is None else self._fold_activation(call, y, "quick_gelu")

    def _fold_gate(self, call):
        """``act(linear_g(x)) * u`` (either order; SwiGLU) -> the gate kernel multiplying by ``u``."""
        for y, u in (call.args, call.args[::-1]):
            found = self._linear(y)
            if found is None or found[0].act is None or found[0].residual or found[0].gate:
                continue
            if not same_f32_shape(u.ty, y.ty):
                continue
            key, args = found
            return self._call(key._replace(gate=True), args + [u], y.ty)
        return call


class _Sibling(NamedTuple):
    """A bare kernel call (bias at most) bound to ``var``: ``args`` = ``[x, w, (bias)]``."""

    var: relax.Var
    key: _Key
    args: list


def _sibling_groups(func, keys) -> list[list[_Sibling]]:
    """The groups of 2 to GROUP_MAX_PARTS bare kernel calls of ``func`` (``keys``: each kernel's
    GlobalVar -> its :class:`_Key`) that one group call can compute: one dataflow block, the same
    input variable, k, n and weight dtype, and weights and biases defined before the first member
    (where the group call goes: function parameters, or items of the params tuple bound earlier)."""
    order = {}
    for block in func.body.blocks:
        order.update((binding.var, len(order)) for binding in block.bindings)
    groups = []
    for block in func.body.blocks:
        by_input = {}
        for binding in block.bindings:
            value = binding.value
            if not (isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.call_tir"))):
                continue
            key = keys.get(value.args[0])
            if key is not None and key.bare():
                args = list(value.args[1].fields)
                same = (args[0], key.lead_ndim, key.k, key.n, key.weight_dtype)
                by_input.setdefault(same, []).append(_Sibling(binding.var, key, args))
        for members in by_input.values():
            while members:
                first, rest = members[0], members[1:]
                ready = [m for m in rest if all(order.get(a, -1) < order[first.var] for a in m.args[1:])]
                group = [first, *ready[: GROUP_MAX_PARTS - 1]]
                if len(group) > 1:
                    groups.append(group)
                members = [m for m in rest if all(m is not g for g in group)]
    return groups


@relax.expr_functor.mutator
class _SiblingLinearRewriter(relax.PyExprMutator):  # pylint: disable=abstract-method
    """Each group of :func:`_sibling_groups` -> one ``call_tir`` of the kernel's group entry, bound
    where the group's first member was; every member becomes an item of its result."""

    def __init__(self, mod, keys):
        super().__init__(mod)
        self.members = {}  # var -> (group, index)
        for func in mod.functions.values():
            if isinstance(func, relax.Function):
                for group in _sibling_groups(func, keys):
                    self.members.update((member.var, (group, index)) for index, member in enumerate(group))
        self.results = {}  # id(group) -> the group call's variable
        self.kernels = {}
        self.specs = {}  # GlobalVar -> (name, first member's key, biases)

    def _kernel(self, group):
        key = group[0].key
        biases = tuple(m.key.bias for m in group)
        name = f"f32_linear{'_bf16w' if key.weight_dtype == BF16 else ''}_group{len(group)}_k{key.k}_n{key.n}"
        if any(biases):  # which parts have one, where not all
            name += "_bias" + ("" if all(biases) else "".join("1" if b else "0" for b in biases))
        if name not in self.kernels:
            func = linear_group_primfunc(key.lead_ndim, key.k, key.n, biases, key.weight_dtype)
            self.kernels[name] = self.builder_.add_func(func, name)
            self.specs[self.kernels[name]] = (name, key, biases)
        return self.kernels[name]

    def visit_var_binding_(self, binding):  # noqa: D102
        found = self.members.get(binding.var)
        if found is None:
            return super().visit_var_binding_(binding)
        group, index = found
        if id(group) not in self.results:
            args = [self.visit_expr(group[0].args[0])] + [self.visit_expr(m.args[1]) for m in group]
            args += [self.visit_expr(m.args[2]) for m in group if m.key.bias]
            call = relax.call_tir(self._kernel(group), args, [m.var.ty for m in group])
            self.results[id(group)] = self.builder_.emit(call, "linear_group")
        item = self.builder_.normalize(relax.TupleGetItem(self.results[id(group)], index))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, item))
        return None


class _PackedTwin(NamedTuple):
    """How a kernel that reads fp32 weights as stored becomes one that reads them packed: the
    positions of its weights among its arguments, the name and PrimFunc of the packed kernel."""

    weights: tuple[int, ...]
    name: str
    make: Callable[[], tvm.tirx.PrimFunc]

    @staticmethod
    def of_linear(key: _Key) -> "_PackedTwin":
        fields = (key.lead_ndim, key.k, key.n, key.bias, key.scale, key.residual, key.gate, key.act)
        return _PackedTwin((1,), key.name() + "_packed", lambda: linear_primfunc(*fields, packed=True))

    @staticmethod
    def of_group(name: str, key: _Key, biases: tuple[bool, ...]) -> "_PackedTwin":
        weights = tuple(range(1, 1 + len(biases)))
        return _PackedTwin(weights, name + "_packed",
                           lambda: linear_group_primfunc(key.lead_ndim, key.k, key.n, biases, packed=True))  # fmt: skip


@relax.expr_functor.mutator
class _PackedWeightsRewriter(relax.PyExprMutator):  # pylint: disable=abstract-method
    """Each call of a kernel in ``twins`` (GlobalVar -> :class:`_PackedTwin`) -> its packed twin, its
    weights passed through ``pack_primfunc`` (once per weight and function)."""

    def __init__(self, mod, twins):
        super().__init__(mod)
        self.twins = twins
        self.kernels = {}
        self.packed = {}  # weight var -> its packed var, in the function being visited

    def _pack(self, w):
        if w not in self.packed:
            n, k = (int(d) for d in w.ty.shape.values)
            pack = add_kernel_once(self, self.kernels, f"f32_pack_weights_k{k}_n{n}", lambda: pack_primfunc(n, k))
            call = relax.call_tir(pack, [w], relax.TensorType([packed_floats(n, k)], F32))
            self.packed[w] = self.builder_.emit(call, "packed_weight")
        return self.packed[w]

    def visit_function_(self, func):  # noqa: D102
        self.packed = {}
        return super().visit_function_(func)

    def visit_call_(self, call):  # noqa: D102
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.call_tir"))):
            return call
        twin = self.twins.get(call.args[0])
        if twin is None:
            return call
        args = list(call.args[1].fields)
        for i in twin.weights:
            args[i] = self._pack(args[i])
        out = call.ty_args[0]
        out = list(out.fields) if isinstance(out, relax.TupleType) else out
        return relax.call_tir(add_kernel_once(self, self.kernels, twin.name, twin.make), args, out)


def _entries(mod) -> list[str]:
    """The names of ``mod``'s entries: its Relax functions with a ``num_input`` attribute."""
    return [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, relax.Function) and "num_input" in f.attrs]


def _keep_num_input(mod, names):
    """``mod`` with ``num_input`` dropped from every Relax function not in ``names``, and those
    functions' ``num_input`` values (to restore with :func:`_restore_num_input`)."""
    dropped = {}
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function) and "num_input" in func.attrs and gv.name_hint not in names:
            dropped[gv.name_hint] = func.attrs["num_input"]
            mod[gv] = func.without_attr("num_input")
    return mod, dropped


def _restore_num_input(mod, dropped):
    for name, value in dropped.items():
        mod[mod.get_global_var(name)] = mod[name].with_attr("num_input", value)
    return mod


def _flat_params_function(func, name: str):
    """``func(wrapped)`` whose one argument is a 1-tuple around the params tuple (what
    LiftTransformParams makes of a tuple parameter) as ``name(params)`` taking the params tuple."""
    (wrapped,) = func.params
    params = relax.Var("params", wrapped.ty.fields[0])
    bind = relax.BindingBlock([relax.VarBinding(wrapped, relax.Tuple([params]))])
    body = relax.SeqExpr([bind, *func.body.blocks], func.body.body)
    flat = relax.Function([params], body, func.ret_ty, func.is_pure, func.attrs)
    return flat.without_attr("num_input").with_attr("global_symbol", name)


def _add_prepacked_entries(mod, twins):
    """Each entry ``F`` of ``mod`` -> ``F`` and ``F_prepacked`` (packed kernels), the packing of every
    weight lifted into :data:`PREPACK_FUNCTION` (one for all twins), whose result the twins take."""
    entries = _entries(mod)
    rewriter = _PackedWeightsRewriter(mod, twins)
    for name in entries:
        twin = rewriter.visit_expr(mod[name]).with_attr("global_symbol", name + PREPACKED_SUFFIX)
        rewriter.builder_.add_func(twin, name + PREPACKED_SUFFIX)
    mod = relax.transform.DeadCodeElimination()(rewriter.builder_.get())
    twin_names = [name + PREPACKED_SUFFIX for name in entries]
    mod, dropped = _keep_num_input(mod, twin_names)
    mod = relax.transform.LiftTransformParams(shared_transform=True)(mod)
    lifted = mod["transform_params"]
    del mod["transform_params"]
    mod = relax.transform.BundleModelParams("prepacked")(mod)  # each twin: (inputs, prepacked tuple)
    mod[PREPACK_FUNCTION] = _flat_params_function(lifted, PREPACK_FUNCTION)
    return _restore_num_input(mod, dropped)


def f32_linear_cpu_pass(prepack: bool = False) -> tvm.transform.Pass:
    """fp32 linear layers (and their epilogues) -> the fp32 C kernel, when the current target has
    AVX-512F or AVX2 + FMA; unchanged otherwise. Then the linear layers of one input with no
    epilogue past the bias (a layer's q, k and v projections) -> one call of the kernel's group entry.
    ``prepack``: then also the ``_prepacked`` twins and ``prepack_params`` (module docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="F32LinearCPU")
    def _pass(mod, _ctx):
        if not target_runs_f32_kernel(tvm.target.Target.current(allow_none=True)):
            return mod
        rewriter = _F32LinearRewriter(mod)
        mod = relax.transform.DeadCodeElimination()(rewrite_relax_functions(mod, rewriter))
        keys = {gv: key for key, gv in rewriter.kernels.items()}
        siblings = _SiblingLinearRewriter(mod, keys)
        mod = relax.transform.DeadCodeElimination()(rewrite_relax_functions(mod, siblings))
        if not prepack:
            return mod
        twins = {gv: _PackedTwin.of_linear(key) for gv, key in keys.items() if key.weight_dtype == F32}
        for gv, (name, key, biases) in siblings.specs.items():
            if key.weight_dtype == F32:
                twins[gv] = _PackedTwin.of_group(name, key, biases)
        return _add_prepacked_entries(mod, twins)

    return _pass



def _attention_kernel(shape):
    """The C kernel's attention for fp32 q, k, v with head_dim <= 128, else None."""
    seq, heads, head_dim, dtype, scale = shape
    if dtype != F32 or head_dim > ATTENTION_MAX_HEAD_DIM:
        return None
    return f"f32_attention_s{seq}_h{heads}_d{head_dim}", lambda: attention_primfunc(seq, heads, head_dim, scale)


@tvm.transform.module_pass(opt_level=0, name="F32AttentionCPU")
def f32_attention_cpu(mod, _ctx):
    """Plain fp32 attention -> the C kernel's, when the current target has one of its vector paths."""
    if not target_runs_f32_kernel(tvm.target.Target.current(allow_none=True)):
        return mod
    return replace_attention(mod, _attention_kernel)
