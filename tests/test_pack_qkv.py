"""One QKV projection for the CUDA flash attention (``passes/pack_qkv.py``), checked on the CPU.

The pass rewrites a fp16 encoder as the CUDA pipeline sees it; here the
rewritten module runs on the CPU with the flash kernel's CPU build (the same
TVMScript, lanes run one after another) and must give what the module without
the rewrite gives: a wrong weight order, a missing k bias or a wrong view of
the packed projection changes the output.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import tvm
from tvm import relax

from mlc_vision.bench import _random_params
from mlc_vision.compiler.kernels.cuda_tc_flash_attention import tc_flash_attention_packed_kernel
from mlc_vision.compiler.module import build_module
from mlc_vision.compiler.passes.pack_qkv import pack_qkv
from mlc_vision.compiler.passes.split_attention import split_attention
from mlc_vision.config import load_preset

#: presets covering the projection forms: q/k/v linear layers with biases (CLIP), no k bias
#: (EVA-CLIP), one qkv projection split in three (InternViT)
PRESETS = ("clip-vit-base-patch16", "eva-clip", "internvit-300m-448px")

#: the CPU runs here check numbers, not speed: LLVM's default O3 spends tens of seconds on the unscheduled
#: fp16 matmul-GELU of a legalized module, O1 compiles the whole module in about a second
CHECK_TARGET = tvm.target.Target({"kind": "llvm", "opt-level": 1})


def tiny(preset: str):
    """Two layers of width 64 (4 heads of 16), 16 patches."""
    config = load_preset(preset)
    return dataclasses.replace(
        config, hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
        image_size=4 * config.patch_size, select_layer=-1, feature="cls_patch", projector=None,
    )  # fmt: skip


def cpu_kernel(seq, heads, head_dim, dtype, scale):
    return tc_flash_attention_packed_kernel(seq, heads, head_dim, dtype, scale, cpu=True)


def calls(mod, op_name: str) -> int:
    """How many calls of the Relax operator ``op_name`` ``encode`` makes."""
    op = tvm.ir.Op.get(op_name)
    found = []
    relax.analysis.post_order_visit(mod["encode"], lambda e: found.append(e) if isinstance(e, relax.Call) and e.op.same_as(op) else None)
    return len(found)


def run(mod, metadata, pixels):
    """``encode`` of ``mod`` on the CPU, fp16, with seeded params (attention left unpacked is split into
    matmul, softmax, matmul: TVM's own legalization of a fp16 attention returns fp32)."""
    lib = tvm.compile(split_attention(mod), target=CHECK_TARGET)
    vm = relax.VirtualMachine(lib, tvm.cpu())
    params = [tvm.runtime.tensor(p.astype("float16")) for p in _random_params(metadata, seed=3)]
    return vm["encode"](tvm.runtime.tensor(pixels), params).numpy().astype("float64")


@pytest.mark.parametrize("preset", PRESETS)
def test_packed_qkv_matches_the_three_projections(preset):
    config = tiny(preset)
    built = build_module(config, "float16", "cuda")
    packed = pack_qkv(built.mod, cpu_kernel)
    assert calls(built.mod, "relax.nn.attention") == 2 and calls(packed, "relax.nn.attention") == 0
    # one QKV matmul per layer instead of three: two fewer in each of the two layers (InternViT's qkv was
    # one matmul already)
    saved = 0 if preset.startswith("internvit") else 2 * config.num_hidden_layers
    assert calls(packed, "relax.matmul") == calls(built.mod, "relax.matmul") - saved
    assert calls(packed, "relax.split") == 0
    names = [gv.name_hint for gv in packed.functions]
    assert sum(n.startswith("flash_attention_qkv_") for n in names) == 1, names
    size = config.image_size
    pixels = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype("float16")
    expected, got = run(built.mod, built.metadata, pixels), run(packed, built.metadata, pixels)
    cosine = float((expected * got).sum() / np.linalg.norm(expected) / np.linalg.norm(got))
    assert cosine > 0.9999, cosine
    assert np.abs(got - expected).max() <= 1e-2 * np.abs(expected).max()


def test_one_projection_per_layer_in_the_cuda_library():
    """CLIP through the whole CUDA pipeline with ``--attention flash``: the packed flash kernel, fed by the
    weight and bias concatenations of the one QKV projection."""
    from mlc_vision.compiler.export import compile_module, generated_source

    config = dataclasses.replace(load_preset("clip-vit-base-patch16"), num_hidden_layers=1, select_layer=-1)
    built = build_module(config, "float16", "cuda", attention="flash")
    source = generated_source(compile_module(built.mod, "cuda", attention="flash", arch="sm_80"))
    names = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", source))  # declared, defined
    assert "flash_attention_qkv_s197_h12_d64_float16_kernel" in names
    assert sum(n.startswith("concatenate") for n in names) == 2, names  # weights, biases
