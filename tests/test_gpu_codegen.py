"""The CUDA path, checked from the generated code (no GPU here): a CLIP
encoder compiled in fp16 puts its big matmuls on tensor cores, and every
family compiles for CUDA."""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest

from mlc_vision.compiler.build import compile_module, generated_source
from mlc_vision.compiler.module import build_module
from mlc_vision.config import load_preset

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def cuda_source(preset: str, layers: int, dtype: str = "float16") -> str:
    config = dataclasses.replace(load_preset(preset), num_hidden_layers=layers, select_layer=-1)
    built = build_module(config, dtype, "cuda")
    return generated_source(compile_module(built.mod, "cuda", arch="sm_80"))


def kernel_names(source: str) -> list[str]:
    return re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", source)


@pytest.fixture(scope="module")
def clip_b16_fp16():
    return {layers: cuda_source("clip-vit-base-patch16", layers) for layers in (1, 2)}


def test_fp16_matmuls_use_tensor_cores(clip_b16_fp16):
    source = clip_b16_fp16[1]
    assert "wmma::mma_sync" in source or "mma.sync" in source, "no tensor-core instruction in the CUDA source"
    tensorized = [name for name in kernel_names(source) if re.search(name + r"\b[\s\S]{0,20000}?mma_sync", source)]
    assert tensorized, "no kernel uses tensor cores"


def test_kernel_count_per_layer_is_stable(clip_b16_fp16):
    one, two = (len(kernel_names(clip_b16_fp16[n])) for n in (1, 2))
    # Layers share kernels: a second layer adds none (all shapes repeat).
    assert one > 0 and two == one


@pytest.mark.parametrize("preset", ["clip-vit-large-patch14-336", "siglip-so400m-patch14-384", "internvit-300m-448px", "eva-clip"])
def test_every_family_compiles_for_cuda_fp16(preset):
    source = cuda_source(preset, layers=1)
    assert "mma_sync" in source
