"""Replace plain ``R.nn.attention`` calls with one of our fused kernels.

A kernel is offered per attention shape by a ``kernel_for(shape)`` hook (the
shape is :func:`relax_rewrite.plain_attention_shape`'s tuple), which returns
``(name, make_primfunc)`` or None; anything no kernel takes stays for
``split_attention``.

* CPU (``fuse_attention_cpu``): ``kernels/cpu_attention.py``, fp32, head_dim <= 128.
* CUDA (``fuse_attention_cuda``, ``--attention fused``):
  ``kernels/cuda_flash_attention.py`` on CUDA cores. On an H100 it matched the
  split path (cosine 0.9999999) but was 5-50 % slower, so it is opt-in.
* CUDA (``fuse_attention_cuda_tc``, ``--attention flash``):
  ``kernels/cuda_tc_flash_attention.py`` on tensor cores (fp16/bf16, head_dim a
  multiple of 8 up to 128). Not yet timed on a GPU, so it is opt-in.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..kernels.cpu_attention import MAX_HEAD_DIM as CPU_MAX_HEAD_DIM
from ..kernels.cpu_attention import cpu_attention_kernel
from ..kernels.cuda_flash_attention import MAX_HEAD_DIM as CUDA_MAX_HEAD_DIM
from ..kernels.cuda_flash_attention import SHARED_BYTES, block_k, flash_attention_kernel, shared_bytes
from ..kernels.cuda_tc_flash_attention import supports as tc_flash_supports
from ..kernels.cuda_tc_flash_attention import tc_flash_attention_kernel
from .relax_rewrite import AttentionCallRewriter, rewrite_relax_functions


@relax.expr_functor.mutator
class _AttentionKernelRewriter(AttentionCallRewriter):  # pylint: disable=abstract-method
    """``R.nn.attention(q, k, v)`` -> ``call_tir(kernel, [q, k, v])`` wherever ``kernel_for`` offers one."""

    def __init__(self, mod, kernel_for):
        super().__init__(mod)
        self.kernel_for = kernel_for

    def rewrite(self, call, shape):  # noqa: D102
        kernel = self.kernel_for(shape)
        if kernel is None:
            return call
        return relax.call_tir(self.kernel(*kernel), list(call.args), call.args[0].ty)


def replace_attention(mod, kernel_for):
    """Replace every plain ``R.nn.attention`` for which ``kernel_for`` offers a kernel (others stay)."""
    return rewrite_relax_functions(mod, _AttentionKernelRewriter(mod, kernel_for))


def cpu_kernel_for(shape):
    """The fused CPU kernel for fp32 attention with head_dim <= 128."""
    seq, heads, head_dim, dtype, scale = shape
    if dtype != "float32" or head_dim > CPU_MAX_HEAD_DIM:
        return None
    return f"attention_s{seq}_h{heads}_d{head_dim}", lambda: cpu_attention_kernel(seq, heads, head_dim, scale)


def cuda_kernel_for(shape):
    """The CUDA flash kernel: fp16/fp32 and a head_dim whose tiles fit in shared memory (<= 128)."""
    seq, heads, head_dim, dtype, _ = shape
    if dtype not in ("float16", "float32") or head_dim > CUDA_MAX_HEAD_DIM:
        return None
    if shared_bytes(head_dim, dtype, block_k(head_dim, dtype)) > SHARED_BYTES:
        return None
    return f"fused_attention_s{seq}_h{heads}_d{head_dim}_{dtype}", lambda: flash_attention_kernel(*shape)


def cuda_tc_kernel_for(shape):
    """The tensor-core flash kernel: fp16/bf16 with head_dim a multiple of 8 up to 128."""
    seq, heads, head_dim, dtype, _ = shape
    if not tc_flash_supports(head_dim, dtype):
        return None
    return f"flash_attention_s{seq}_h{heads}_d{head_dim}_{dtype}", lambda: tc_flash_attention_kernel(*shape)


@tvm.transform.module_pass(opt_level=0, name="FuseAttentionCPU")
def fuse_attention_cpu(mod, _ctx):
    """Every eligible ``R.nn.attention`` -> the fused CPU kernel."""
    return replace_attention(mod, cpu_kernel_for)


@tvm.transform.module_pass(opt_level=0, name="FuseAttentionCUDA")
def fuse_attention_cuda(mod, _ctx):
    """Every eligible ``R.nn.attention`` -> the CUDA flash kernel (``--attention fused``)."""
    return replace_attention(mod, cuda_kernel_for)


@tvm.transform.module_pass(opt_level=0, name="FuseAttentionCUDATensorCore")
def fuse_attention_cuda_tc(mod, _ctx):
    """Every eligible ``R.nn.attention`` -> the tensor-core flash kernel (``--attention flash``)."""
    return replace_attention(mod, cuda_tc_kernel_for)
