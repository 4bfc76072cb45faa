"""One QKV projection feeding the tensor-core flash kernel (CUDA ``--attention flash``).

A layer's q, k and v projections read the same normalized input. As three
GEMMs of ``hidden`` output channels each, at batch 1 none of them fills an
H100 (a CLIP-L/336 projection is 5 x 8 tiles of 128 x 128 for 132 SMs); as one
GEMM of ``3 hidden`` channels the same work runs in one wave and one launch.

For every plain ``R.nn.attention(q, k, v)`` the flash kernel takes, where q, k
and v are

* three linear layers of one input, ``reshape(matmul(x, permute_dims(w_i)) [+ b_i])``
  (CLIP, SigLIP, EVA-CLIP: the weights as stored, ``[out, in]``), or
* the three parts of one projection, ``reshape(split(y, 3, axis=-1)[i])``
  (InternViT's ``qkv``),

this pass emits the single projection ``y = matmul(x, permute_dims(concat(w_q, w_k, w_v))) + concat(b_q, b_k, b_v)``
(a missing bias counts as zeros: EVA-CLIP has no k bias) and calls
:func:`tc_flash_attention_packed_kernel` on ``reshape(y, [b, s, 3, heads, head_dim])``,
which reads q, k and v in place. The weights stay as stored (the calling
convention passes them as the checkpoint has them), so the concatenation is a
copy of the three weight matrices per call: 6 MiB per CLIP-L layer in fp16,
microseconds at HBM speed. The three projections left unused are removed.
Attention of any other form is left to ``fuse_attention_cuda_tc``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..kernels.cuda_tc_flash_attention import supports as tc_flash_supports
from ..kernels.cuda_tc_flash_attention import tc_flash_attention_packed_kernel
from .relax_rewrite import AttentionCallRewriter, rewrite_relax_functions, static_int


def _bound_call(mutator, expr, op_name: str):
    """The call to ``op_name`` that ``expr`` (a variable) is bound to, else None."""
    if not isinstance(expr, relax.Var):
        return None
    value = mutator.lookup_binding(expr)
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == op_name:
        return value
    return None


def _linear_parts(mutator, projection):
    """``(x, weight, bias or None)`` when ``projection`` is ``matmul(x, permute_dims(weight, [1, 0])) [+ bias]``."""
    bias = None
    add = _bound_call(mutator, projection, "relax.add")
    if add is not None:
        projection, bias = add.args
    matmul = _bound_call(mutator, projection, "relax.matmul")
    if matmul is None or str(matmul.attrs.out_dtype) not in ("", "void", "None"):
        return None
    x, weight_t = matmul.args
    permute = _bound_call(mutator, weight_t, "relax.permute_dims")
    if permute is None:
        return None
    weight = permute.args[0]
    axes = permute.attrs.axes  # None: reversed, the transpose of a matrix
    if weight.ty.ndim != 2 or (axes is not None and [int(a) for a in axes] != [1, 0]):
        return None
    if bias is not None and (bias.ty.ndim != 1 or bias.ty.dtype != weight.ty.dtype):
        return None
    return x, weight, bias


def _split_source(mutator, parts):
    """``y`` when ``parts`` are ``split(y, 3, axis=-1)[0], [1], [2]`` in order, else None."""
    sources = []
    for index, part in enumerate(parts):
        value = mutator.lookup_binding(part) if isinstance(part, relax.Var) else None
        if not isinstance(value, relax.TupleGetItem) or value.index != index:
            return None
        split = _bound_call(mutator, value.tuple_value, "relax.split")
        if split is None:
            return None
        y = split.args[0]
        sections = split.attrs.indices_or_sections
        axis = int(split.attrs.axis)
        if not isinstance(sections, tvm.tirx.IntImm) or int(sections) != 3 or axis not in (-1, y.ty.ndim - 1):
            return None
        sources.append(y)
    return sources[0] if all(s.same_as(sources[0]) for s in sources) else None


@relax.expr_functor.mutator
class _PackedQKVRewriter(AttentionCallRewriter):  # pylint: disable=abstract-method
    """``R.nn.attention`` of three projections of one input -> one projection + the packed flash kernel."""

    def __init__(self, mod, make_kernel):
        super().__init__(mod)
        self.make_kernel = make_kernel

    def rewrite(self, call, shape):  # noqa: D102
        if not tc_flash_supports(shape[2], shape[3]):
            return call
        projections = [self._unreshaped(arg) for arg in call.args]
        if any(p is None for p in projections):
            return call
        packed = _split_source(self, projections)
        if packed is None:
            packed = self._one_projection(projections)
        if packed is None or packed.ty.ndim != 3:
            return call
        seq, heads, head_dim, dtype, scale = shape
        batch = call.args[0].ty.shape.values[0]
        qkv = self.builder_.emit(relax.op.reshape(packed, relax.ShapeExpr([batch, seq, 3, heads, head_dim])))
        name = f"flash_attention_qkv_s{seq}_h{heads}_d{head_dim}_{dtype}"
        kernel = self.kernel(name, lambda: self.make_kernel(seq, heads, head_dim, dtype, scale))
        return relax.call_tir(kernel, [qkv], call.args[0].ty)

    def _unreshaped(self, arg):
        """The ``[b, s, heads x head_dim]`` tensor that the attention operand ``arg`` is a reshape of."""
        reshape = _bound_call(self, arg, "relax.reshape")
        return None if reshape is None else reshape.args[0]

    def _one_projection(self, projections):
        """``x . concat(w)^T + concat(b)`` when the three projections are linear layers of one ``x``."""
        parts = [_linear_parts(self, p) for p in projections]
        if any(p is None for p in parts):
            return None
        x = parts[0][0]
        if not all(p[0].same_as(x) for p in parts):
            return None
        weights = [p[1] for p in parts]
        shapes = [[static_int(n) for n in w.ty.shape.values] for w in weights]
        if None in shapes[0] or any(s != shapes[0] for s in shapes):
            return None
        emit = self.builder_.emit
        weight = emit(relax.op.concat(weights, axis=0))
        y = emit(relax.op.matmul(x, emit(relax.op.permute_dims(weight, [1, 0]))))
        if all(p[2] is None for p in parts):
            return y
        dtype = str(weights[0].ty.dtype)
        biases = [p[2] if p[2] is not None else relax.const(np.zeros(shapes[0][0], dtype), dtype) for p in parts]
        return emit(relax.op.add(y, emit(relax.op.concat(biases, axis=0))))


def pack_qkv(mod, make_kernel=tc_flash_attention_packed_kernel):
    """Attention of three projections of one input -> one QKV projection and ``make_kernel(seq, heads,
    head_dim, dtype, scale)`` (the packed flash kernel; the tests pass its CPU build)."""
    mod = rewrite_relax_functions(mod, _PackedQKVRewriter(mod, make_kernel))
    return relax.transform.DeadCodeElimination()(mod)


@tvm.transform.module_pass(opt_level=0, name="PackQKVFlashCUDA")
def pack_qkv_flash_cuda(mod, _ctx):
    """:func:`pack_qkv` with the CUDA flash kernel."""
    return pack_qkv(mod)
