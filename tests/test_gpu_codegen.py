"""The CUDA path, checked from the generated code (no GPU here): a CLIP
encoder compiled in fp16 puts its big matmuls on tensor cores, and every
family compiles for CUDA."""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest

from mlc_vision.compiler.export import compile_module, generated_source
from mlc_vision.compiler.module import build_module
from mlc_vision.config import load_preset

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def cuda_source(preset: str, layers: int, dtype: str = "float16", attention: str = "split") -> str:
    config = dataclasses.replace(load_preset(preset), num_hidden_layers=layers, select_layer=-1)
    built = build_module(config, dtype, "cuda", attention=attention)
    return generated_source(compile_module(built.mod, "cuda", attention=attention, arch="sm_80"))


def kernel_names(source: str) -> list[str]:
    return re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", source)


@pytest.fixture(scope="module")
def clip_b16_fp16():
    return {layers: cuda_source("clip-vit-base-patch16", layers) for layers in (1, 2)}


@pytest.fixture(scope="module")
def clip_b16_tensorcore():
    """One CLIP-B/16 layer with ``--attention tensorcore``."""
    return cuda_source("clip-vit-base-patch16", 1, attention="tensorcore")


def test_fp16_matmuls_use_tensor_cores(clip_b16_fp16):
    source = clip_b16_fp16[1]
    assert "wmma::mma_sync" in source or "mma.sync" in source, "no tensor-core instruction in the CUDA source"
    tensorized = [name for name in kernel_names(source) if re.search(name + r"\b[\s\S]{0,20000}?mma_sync", source)]
    assert tensorized, "no kernel uses tensor cores"


def test_attention_matmuls_use_tensor_cores(clip_b16_tensorcore):
    """tensorcore: Q·K^T (K = head_dim 64) and P·V (N = 64) are on tensor cores too, not only the big GEMMs.

    dlight's own rule skips any matmul with a static extent <= 64; on an H100
    these two then ran at a tenth of the GEMMs' speed. Only the patch embedding
    (a matmul without epilogue, see schedules/gpu.py) may stay off.
    """
    from mlc_vision.bench import _tensorized_kernels

    names, tensorized = _tensorized_kernels(clip_b16_tensorcore)
    matmuls = [n for n in names if "matmul" in n]
    attention = [n for n in matmuls if "attn_" in n]
    assert len(attention) == 2, matmuls  # q·k^T * scale, p·v
    assert set(matmuls) - set(tensorized) <= {"NT_matmul_kernel"}, sorted(set(matmuls) - set(tensorized))


def test_attention_softmax_is_one_warp_per_row(clip_b16_tensorcore):
    """tensorcore: the softmax is ours (compiler/kernels/warp_softmax.py), not dlight's 3-pass block reduction."""
    from mlc_vision.bench import _tensorized_kernels

    source = clip_b16_tensorcore
    names, _ = _tensorized_kernels(source)
    assert "softmax_kernel" not in names
    softmax = [n for n in names if n.startswith("warp_softmax")]
    assert softmax == ["warp_softmax_h12_s197_n197_float16_kernel"], names
    start = re.search(softmax[0] + r"\([^)]*\)\s*\{", source).end()  # the definition, not the declaration
    body = source[start : source.index("\n}\n", start)]
    assert "__shfl_xor_sync" in body and "__syncthreads" not in body
    assert "float vals" in body  # the row is held (and reduced) in fp32 registers


def test_tensorcore_attention_needs_no_transposes():
    """tensorcore reads q, k, v in [batch, seq, heads, head_dim] and writes the output in it.

    The portable split permutes q, k, v and the output (4 transpose kernels
    per layer); tensorcore's two matmuls index the projections' layout
    instead, so a CLIP layer is 11 launches: LN, q, k, v, scores, softmax,
    context, out-proj, LN, fc1, fc2. The default stays the portable split.
    """
    from mlc_vision.bench import _lowered_gpu_module, gpu_kernel_report, kernel_calls

    small = dataclasses.replace(load_preset("clip-vit-base-patch16"), image_size=112)
    report = gpu_kernel_report(small, attention="tensorcore")
    assert not any("transpose" in n for n in report["layer_kernels"]), report["layer_kernels"]
    assert report["launches_per_layer"] == 11, report["layer_kernels"]
    assert not report["fused_attention"]
    split = kernel_calls(_lowered_gpu_module(dataclasses.replace(small, num_hidden_layers=1), "cuda", "float16", "split"))
    assert "softmax" in split and not any(n.startswith(("warp_softmax", "attn_", "fused_attn_")) for n in split)


def test_kernel_count_per_layer_is_stable(clip_b16_fp16):
    one, two = (len(kernel_names(clip_b16_fp16[n])) for n in (1, 2))
    # Layers share kernels: a second layer adds none (all shapes repeat).
    assert one > 0 and two == one


@pytest.mark.parametrize("preset", ["clip-vit-large-patch14-336", "siglip-so400m-patch14-384", "internvit-300m-448px", "eva-clip"])
def test_every_family_compiles_for_cuda_fp16(preset):
    source = cuda_source(preset, layers=1)
    assert "mma_sync" in source


def test_gpu_kernel_report():
    """The bench's CUDA report: launches per layer from the lowered `encode`, same for every layer."""
    from mlc_vision.bench import _lowered_gpu_module, gpu_kernel_report, kernel_calls

    small = dataclasses.replace(load_preset("clip-vit-base-patch16"), image_size=112)  # 50 tokens: faster
    report = gpu_kernel_report(small, attention="fused")
    for key in ("launches_per_layer", "launches_outside_layers", "distinct_kernels", "layer_kernels",
                "matmul_kernels", "matmuls_tensorized", "fused_attention", "timing"):  # fmt: skip
        assert key in report, key
    per_layer = report["launches_per_layer"]
    assert per_layer > 0 and len(report["layer_kernels"]) == per_layer
    assert report["launches_2_layers"] - report["launches_1_layer"] == per_layer
    config = dataclasses.replace(small, num_hidden_layers=3, select_layer=-1, feature="cls_patch")
    three = len(kernel_calls(_lowered_gpu_module(config, "cuda", "float16", "fused")))
    assert three - report["launches_2_layers"] == per_layer  # the third layer adds what the second did
    assert report["fused_attention"] and report["matmuls_tensorized"]
    assert "GPU" in report["timing"]


def test_fused_attention_is_opt_in():
    """The split path is the default; --attention fused swaps in our kernel and drops the score matmuls."""
    from mlc_vision.bench import _lowered_gpu_module, kernel_calls

    config = dataclasses.replace(load_preset("clip-vit-base-patch16"), image_size=112, num_hidden_layers=1)
    split = kernel_calls(_lowered_gpu_module(config, "cuda", "float16", "split"))
    fused = kernel_calls(_lowered_gpu_module(config, "cuda", "float16", "fused"))
    assert not any(name.startswith("fused_attention") for name in split)
    assert any(name.startswith("fused_attention") for name in fused)
    assert not any("softmax" in name for name in fused)
