"""Segmented attention on CUDA tensor cores (``--attention flash`` for the native-resolution towers).

No GPU here: numerics come from the CPU build of the same TVMScript
(``ldmatrix`` / ``mma.sync`` / quad shuffles emulated lane by lane, as in
tests/test_fused_attention.py) against numpy on random segment layouts; the
CUDA build is checked from its SASS and ptxas resources; a tiny Qwen2.5-VL /
Qwen2-VL tower compiles for CUDA with the kernel in it.
"""

from __future__ import annotations

import dataclasses
import re
import shutil

import numpy as np
import pytest
import tvm

from mlc_vision.compiler.kernels.cuda_tc_flash_attention import segment_bounds_kernel, tc_segment_attention_kernel


def run_cpu(func, *arrays, out_shape, out_dtype):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    out = tvm.runtime.tensor(np.zeros(out_shape, out_dtype))
    lib["main"](*(tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays), out)
    return out.numpy()


def segment_ids(lengths) -> np.ndarray:
    return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)


def segment_reference(q, k, v, ids, scale):
    """softmax over the keys of the query's segment, float64: ``[n, heads, head_dim]``."""
    qh, kh, vh = (x.astype("float64").transpose(1, 0, 2) for x in (q, k, v))
    s = qh @ kh.transpose(0, 2, 1) * scale
    s = np.where(ids[:, None] == ids[None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True) @ vh).transpose(1, 0, 2)


LAYOUTS = {
    "ones_and_ragged": [1, 3, 64, 70, 1, 130],  # one-token segments, a segment past a tile, tile-straddling runs
    "one_segment": [77],
    "windows": [64, 64, 32, 16, 64, 8],  # Qwen2.5-like windows, partial ones at the image edges
}


@pytest.mark.parametrize("lengths", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_segment_bounds_match_searchsorted(lengths):
    ids = segment_ids(lengths)
    out = run_cpu(segment_bounds_kernel(cpu=True), ids, out_shape=(len(ids), 2), out_dtype="int32")
    np.testing.assert_array_equal(out[:, 0], np.searchsorted(ids, ids, "left"))
    np.testing.assert_array_equal(out[:, 1], np.searchsorted(ids, ids, "right"))


@pytest.mark.parametrize(
    "layout,heads,head_dim,dtype,atol",
    [
        ("ones_and_ragged", 2, 64, "float16", 2e-3),
        ("windows", 1, 80, "float16", 2e-3),  # both Qwen towers' head_dim
        ("one_segment", 1, 128, "float16", 2e-3),  # one stage of K/V tiles
        ("random", 1, 72, "bfloat16", 1.5e-2),  # an odd n8 tile
    ],
)
def test_segment_flash_kernel_matches_numpy(layout, heads, head_dim, dtype, atol):
    """Every query sees exactly its segment's keys: tiles that span several segments, one-token
    segments, segment ends that are not multiples of the 64-key tiles."""
    import ml_dtypes

    rng = np.random.default_rng(1)
    lengths = LAYOUTS.get(layout) or list(rng.integers(1, 90, size=6))
    ids = segment_ids(lengths)
    n, scale = len(ids), head_dim**-0.5
    bounds = np.stack([np.searchsorted(ids, ids, "left"), np.searchsorted(ids, ids, "right")], 1).astype(np.int32)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    q, k, v = (rng.standard_normal((1, n, heads, head_dim)).astype(np_dtype) for _ in range(3))
    func = tc_segment_attention_kernel(heads, head_dim, dtype, scale, cpu=True)
    out = run_cpu(func, q, k, v, bounds, out_shape=q.shape, out_dtype=np_dtype)
    expected = segment_reference(*(x[0].astype("float32") for x in (q, k, v)), ids, scale)
    np.testing.assert_allclose(out[0].astype("float64"), expected, atol=atol, rtol=0)


# ---- the CUDA build ----------------------------------------------------------------------------------------

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


@needs_nvcc
def test_segment_flash_kernel_compiles_to_hmma_without_spills():
    """head_dim 80 (Qwen), 64, 72, 128; fp16 and bf16; sm_80 and sm_90: HMMA, ldmatrix, cp.async, no stack."""
    from mlc_vision.compiler.cuda_fatbin import find_cuobjdump, nvcc_fatbin, resource_usage, sass_by_kernel
    from mlc_vision.compiler.export import generated_source
    from mlc_vision.compiler.targets import make_target

    if find_cuobjdump() is None:
        pytest.skip("cuobjdump is not installed")
    shapes = [(16, 80, "float16"), (16, 64, "bfloat16"), (16, 72, "float16"), (16, 128, "bfloat16")]
    funcs = {
        f"seg_d{d}_{dt}": tc_segment_attention_kernel(h, d, dt, d**-0.5).with_attr("global_symbol", f"seg_d{d}_{dt}")
        for h, d, dt in shapes
    }
    funcs["bounds"] = segment_bounds_kernel().with_attr("global_symbol", "bounds")
    ex = tvm.compile(tvm.IRModule(funcs), target=make_target("cuda", arch="sm_80"))
    fatbin = nvcc_fatbin(generated_source(ex), ["sm_80", "sm_90"])
    for arch in ("sm_80", "sm_90"):
        sass, usage = sass_by_kernel(fatbin, arch), resource_usage(fatbin, arch)
        for name in [*funcs, "bounds"]:
            kernel = f"{name}_kernel"
            assert usage[kernel]["STACK"] == 0 and usage[kernel]["LOCAL"] == 0, (arch, kernel, usage[kernel])
            if name == "bounds":
                continue
            ops = {}
            for op in sass[kernel]:
                ops[op.split(".")[0]] = ops.get(op.split(".")[0], 0) + 1
            assert ops.get("HMMA", 0) > 0 and ops.get("FFMA", 0) < ops["HMMA"], (arch, kernel, ops)
            assert ops.get("LDSM", 0) > 0 and ops.get("LDGSTS", 0) > 0, (arch, kernel, ops)


def tiny_qwen_cuda_source(preset: str, attention: str, dtype: str = "float16") -> str:
    from mlc_vision.compiler.export import compile_module, generated_source
    from mlc_vision.compiler.module import build_module
    from mlc_vision.config import load_preset

    config = load_preset(preset)
    config = dataclasses.replace(
        config, num_hidden_layers=2, select_layer=-1,
        fullatt_block_indexes=(1,) if config.fullatt_block_indexes else (),
    )  # fmt: skip
    built = build_module(config, dtype, "cuda", attention=attention)
    return generated_source(compile_module(built.mod, "cuda", attention=attention, arch="sm_90"))


def kernel_names(source: str) -> set[str]:
    return set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", source))


@needs_nvcc
@pytest.mark.parametrize("preset", ["qwen2.5-vl-7b-vision", "qwen2-vl-2b-vision"])
def test_qwen_tower_compiles_for_cuda_with_the_segment_kernel(preset):
    """Two real-width blocks (a windowed and a full one for 2.5): flash puts attention on the segmented
    kernel, no [n, n] softmax left; the default (split) keeps the mask lowering."""
    flash = kernel_names(tiny_qwen_cuda_source(preset, "flash"))
    assert "flash_segment_attention_h16_d80_float16_kernel" in flash and "segment_bounds_kernel" in flash, flash
    assert not any("softmax" in name for name in flash), flash
    split = kernel_names(tiny_qwen_cuda_source(preset, "split"))
    assert not any("segment" in name for name in split) and any("softmax" in name for name in split), split


def test_bounds_are_computed_once_per_id_array():
    """Four blocks, two id arrays (windows, image): two segment_bounds calls in the lowered graph."""
    from mlc_vision.bench import _lowered_gpu_module, kernel_calls
    from mlc_vision.config import load_preset

    config = dataclasses.replace(
        load_preset("qwen2.5-vl-7b-vision"), num_hidden_layers=4, select_layer=-1, fullatt_block_indexes=(1, 3)
    )
    calls = kernel_calls(_lowered_gpu_module(config, "cuda", "float16", "flash"))
    assert sum(name.startswith("segment_bounds") for name in calls) == 2, calls
    assert sum(name.startswith("flash_segment_attention") for name in calls) == 4, calls


def test_lowering_wiring_matches_numpy():
    """The Relax rewrite itself, run with the kernels' CPU builds: two attention calls over two id arrays
    (the bounds of each computed once), the reshapes to ``[1, n, heads, head_dim]`` and the kernels'
    argument order, against numpy."""
    from tvm import relax

    from mlc_vision.compiler.passes.segment_attention_cuda import FlashKernels, lower_with
    from mlc_vision.models.qwen2_vl import SEGMENT_ATTENTION

    heads, head_dim, dtype = 2, 64, "float16"
    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    q, k, v = (relax.Var(name, relax.TensorType([n, heads, head_dim], dtype)) for name in "qkv")
    images, windows = (relax.Var(name, relax.TensorType([n], "int32")) for name in ("images", "windows"))
    out_ty = relax.TensorType([n, heads, head_dim], dtype)
    with bb.function("main", [q, k, v, images, windows]):
        with bb.dataflow():
            first = bb.emit(relax.call_dps_packed(SEGMENT_ATTENTION, [q, k, v, windows], out_ty))
            second = bb.emit(relax.call_dps_packed(SEGMENT_ATTENTION, [first, k, v, images], out_ty))
            third = bb.emit(relax.call_dps_packed(SEGMENT_ATTENTION, [second, k, v, windows], out_ty))
            result = bb.emit_output(third)
        bb.emit_func_output(result)
    kernels = FlashKernels(cpu=True)
    mod = lower_with(bb.get(), kernels)
    assert "mlc_vision.segment_attention" not in mod.script()
    assert mod.script().count("segment_bounds") - mod.script().count("def segment_bounds") == 2
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())

    rng = np.random.default_rng(3)
    image_ids = segment_ids([70, 45])
    window_ids = segment_ids([1, 64, 5, 20, 25])
    count = len(image_ids)
    qn, kn, vn = (rng.standard_normal((count, heads, head_dim)).astype(dtype) for _ in range(3))
    args = [tvm.runtime.tensor(a) for a in (qn, kn, vn, image_ids, window_ids)]
    ours = vm["main"](*args).numpy().astype("float64")
    k32, v32 = kn.astype("float32"), vn.astype("float32")
    expected = qn.astype("float32")
    for ids in (window_ids, image_ids, window_ids):
        expected = segment_reference(expected, k32, v32, ids, head_dim**-0.5).astype(dtype).astype("float32")
    np.testing.assert_allclose(ours, expected, atol=5e-3, rtol=0)
