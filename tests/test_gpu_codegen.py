"""The CUDA path, checked from the generated code (no GPU here): a CLIP
encoder compiled in fp16 puts its big matmuls on tensor cores, and every
family compiles for CUDA."""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest

from mlc_vision.compiler.cuda_fatbin import find_cuobjdump
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


# ---- tensor-core paths (--attention flash, --gemm mma): the embedded SASS ----------------------------------

needs_cuobjdump = pytest.mark.skipif(
    find_cuobjdump() is None, reason="cuobjdump is not installed (CUDA toolkit bin, PATH, or the triton package)"
)

SASS_ARCH = "sm_90"


def opcode_counts(ops: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ops:
        counts[op.split(".")[0]] = counts.get(op.split(".")[0], 0) + 1
    return counts


@pytest.fixture(scope="module")
def clip_b16_flash_mma_binary(tmp_path_factory):
    """One CLIP-B/16 layer, fp16, ``--attention flash --gemm mma``, exported as users get it: the
    fatbin embedded in the .so, its SASS and resource usage per kernel read back with cuobjdump."""
    from mlc_vision.compiler.cuda_fatbin import embedded_fatbins, resource_usage, sass_by_kernel
    from mlc_vision.compiler.export import build_library

    config = dataclasses.replace(load_preset("clip-vit-base-patch16"), num_hidden_layers=1, select_layer=-1)
    built = build_module(config, "float16", "cuda", attention="flash", gemm="mma")
    lib = build_library(built.mod, "cuda", tmp_path_factory.mktemp("flash") / "clip.so", arch=SASS_ARCH, metadata=built.metadata)
    (fatbin,) = embedded_fatbins(lib.read_bytes())
    return {
        "metadata": built.metadata,
        "sass": {name: opcode_counts(ops) for name, ops in sass_by_kernel(fatbin, SASS_ARCH).items()},
        "usage": resource_usage(fatbin, SASS_ARCH),
    }


def tensor_core_kernels(names) -> list[str]:
    """The matmul and attention kernels (the patch embedding, a matmul without epilogue, excepted:
    neither dlight's WMMA rule nor ours schedules it, see schedules/gpu.py)."""
    return [n for n in names if ("matmul" in n or "attention" in n) and n != "NT_matmul_kernel"]


@needs_cuobjdump
def test_flash_mma_kernels_run_on_tensor_cores(clip_b16_flash_mma_binary):
    """Every matmul and the attention kernel: HMMA in the SASS, and more HMMAs than scalar FMAs
    (FFMA/HFMA2 are only the epilogue, the softmax scaling: no CUDA-core inner loop)."""
    sass = clip_b16_flash_mma_binary["sass"]
    kernels = tensor_core_kernels(sass)
    assert any(n.startswith("flash_attention") for n in kernels), sorted(sass)
    assert len(kernels) >= 5, sorted(sass)  # attention, q/k/v, out-proj, fc1, fc2 (some share a kernel)
    for name in kernels:
        ops = sass[name]
        fma = ops.get("FFMA", 0) + ops.get("HFMA2", 0)
        assert ops.get("HMMA", 0) > 0 and fma < ops["HMMA"], (name, ops)
    metadata = clip_b16_flash_mma_binary["metadata"]
    assert (metadata["attention"], metadata["gemm"]) == ("flash", "mma")


@needs_cuobjdump
def test_mma_gemms_use_ldmatrix_and_cp_async(clip_b16_flash_mma_binary):
    """--gemm mma: fragments come from ldmatrix (LDSM), tiles arrive by cp.async (LDGSTS); so do the
    flash kernel's."""
    sass = clip_b16_flash_mma_binary["sass"]
    gemms = [n for n in tensor_core_kernels(sass) if "matmul" in n]
    assert gemms
    for name in gemms:
        assert sass[name].get("LDSM", 0) > 0 and sass[name].get("LDGSTS", 0) > 0, (name, sass[name])
    flash = next(n for n in sass if n.startswith("flash_attention"))
    assert sass[flash].get("LDSM", 0) > 0 and sass[flash].get("LDGSTS", 0) > 0, sass[flash]


@needs_cuobjdump
def test_flash_mma_kernels_do_not_spill(clip_b16_flash_mma_binary):
    """ptxas's resource usage read back from the binary: no stack frame, no local memory (spills)."""
    usage = clip_b16_flash_mma_binary["usage"]
    for name in tensor_core_kernels(usage):
        assert usage[name]["STACK"] == 0 and usage[name]["LOCAL"] == 0, (name, usage[name])


@needs_cuobjdump
def test_flash_kernel_variants_compile_to_hmma_without_spills():
    """The flash kernel at the ViT shapes (head_dim 112 (EVA-E), 72, 80, 128; fp16 and bf16; deployment
    sequence lengths, none a multiple of the 64-row tiles; d=64 is the CLIP library above): one
    module, one nvcc run."""
    import tvm

    from mlc_vision.compiler.cuda_fatbin import nvcc_fatbin, resource_usage, sass_by_kernel
    from mlc_vision.compiler.kernels.cuda_tc_flash_attention import tc_flash_attention_kernel
    from mlc_vision.compiler.targets import make_target

    shapes = [(257, 16, 112, "float16"), (729, 16, 72, "bfloat16"), (1369, 16, 80, "float16"), (1025, 16, 128, "bfloat16")]
    funcs = {
        f"flash_s{s}_d{d}_{dt}": tc_flash_attention_kernel(s, h, d, dt, d**-0.5).with_attr("global_symbol", f"flash_s{s}_d{d}_{dt}")
        for s, h, d, dt in shapes
    }
    ex = tvm.compile(tvm.IRModule(funcs), target=make_target("cuda", arch="sm_80"))
    fatbin = nvcc_fatbin(generated_source(ex), ["sm_80", "sm_90"])
    for arch in ("sm_80", "sm_90"):
        sass, usage = sass_by_kernel(fatbin, arch), resource_usage(fatbin, arch)
        for name in funcs:
            kernel = f"{name}_kernel"
            ops = opcode_counts(sass[kernel])
            assert ops.get("HMMA", 0) > 0 and ops.get("FFMA", 0) < ops["HMMA"], (arch, kernel, ops)
            assert usage[kernel]["STACK"] == 0 and usage[kernel]["LOCAL"] == 0, (arch, kernel, usage[kernel])


def test_flash_and_mma_are_opt_in():
    """Not yet timed on a GPU: the CUDA defaults stay split attention and dlight's matmuls; flash and
    mma exist only where their kernels do (fp16/bf16, fp16)."""
    from mlc_vision.compiler.targets import resolve_attention, resolve_gemm
    from mlc_vision.errors import MlcVisionError

    assert resolve_attention("cuda", "float16", None) == "split"
    assert resolve_gemm("cuda", "float16", None) == "dlight"
    assert resolve_attention("cuda", "bfloat16", "flash") == "flash"
    with pytest.raises(MlcVisionError, match="flash"):
        resolve_attention("cuda", "float32", "flash")
    with pytest.raises(MlcVisionError, match="mma"):
        resolve_gemm("cuda", "float32", "mma")
    with pytest.raises(MlcVisionError, match="mma"):
        resolve_gemm("cpu", "float32", "mma")


def test_mma_store_layout_is_the_ptx_accumulator_layout():
    """``--gemm mma`` writes accumulators back through TVM's ``ldmatrix_32x8_to_shared_16x16_layout``;
    the 16x16 tile is two m16n8k16 results (local 0-3: columns 0-7, 4-7: columns 8-15). This is
    the PTX accumulator layout (lane l: rows l/4 and l/4 + 8, columns 2 (l % 4) + {0, 1}) only if
    TVM's map says so: check every (lane, slot)."""
    from mlc_vision.compiler.schedules.gpu import preload_tensor_intrinsics

    preload_tensor_intrinsics()  # the CUDA compiles in this file import it anyway
    from tvm.s_tir.tensor_intrin.cuda import ldmatrix_32x8_to_shared_16x16_layout

    seen = set()
    for lane in range(32):
        for slot in range(8):
            tile, i = divmod(slot, 4)
            expected = (lane // 4 + 8 * (i // 2), 8 * tile + 2 * (lane % 4) + i % 2)
            row, col = (int(x) for x in ldmatrix_32x8_to_shared_16x16_layout(lane, slot))
            assert (row, col) == expected, (lane, slot)
            seen.add(expected)
    assert len(seen) == 256
