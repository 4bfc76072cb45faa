"""Dev A/B: the bf16 C kernel (``kernels/cpu_bf16_gemm.c``) of another commit against the working tree's.

``model``: a preset's bf16 library built twice (the same Relax module, each kernel object linked in),
``encode`` called in alternation, median and min of ``--runs`` calls; ``--kernel f32`` does the same
for the fp32 kernel (``kernels/cpu_f32_gemm.c``) in the preset's fp32 library. ``kernels``: the two objects by
ctypes on attention and linear-layer shapes, alternated, best of 7 (one TVM thread pool, as in a library);
with ``--kernel f32``, the linear layers of one encoder block of each ``--block`` at ``--m`` rows, in
order (weights from memory, as in a model; ``--packed``: packed once beforehand, as a prepacked
library reads them), median of ``--runs``; ``--cflags`` builds the working
tree's object with extra flags (e.g. another ``-DF32_ROW_BLOCK``):

    python scripts/dev/bf16_kernel_ab.py model siglip-so400m-patch14-384 --base 68558a5
    python scripts/dev/bf16_kernel_ab.py kernels --base 68558a5
    python scripts/dev/bf16_kernel_ab.py model clip-vit-base-patch16 --kernel f32 --base HEAD
    python scripts/dev/bf16_kernel_ab.py kernels --kernel f32 --base HEAD --block siglip --m 5832 \
        --cflags="-DF32_ROW_BLOCK=516"

The ratio printed is working tree / base (below 1 means the working tree is faster).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "mlc_vision" / "compiler" / "kernels"
ATTENTION = ((1, 729, 16, 72), (1, 1025, 16, 64), (1, 577, 16, 64))  # B, S, H, D: SigLIP, InternViT, ViT-L/14-336
LINEAR = ((729, 4304, 1152), (729, 1152, 4304))  # M, N, K
#: (width, MLP width) of one encoder block: q, k, v and out are width x width, then fc1 and fc2 (timed
#: one after the other, each reading the previous one's output: the same shapes as in the block).
F32_BLOCKS = {"vit-b": (768, 3072), "vit-l": (1024, 4096), "siglip": (1152, 4304)}


#: ``--kernel``: the kernel's module in ``mlc_vision.compiler.kernels`` and the library dtype that links it.
KERNEL_CHOICES = {"bf16": ("cpu_bf16_gemm", "bfloat16"), "f32": ("cpu_f32_gemm", "float32")}


def base_source(rev: str, workdir: Path, kernel: str) -> Path:
    """The C file of ``kernel`` (a KERNEL_CHOICES key) and the headers beside it as they are at ``rev``,
    in ``workdir``."""
    module_name = KERNEL_CHOICES[kernel][0]
    for path in [KERNELS / f"{module_name}.c", *KERNELS.glob("*.h")]:
        rel = path.relative_to(ROOT).as_posix()
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{rel}"], capture_output=True, text=True)
        if text.returncode == 0:
            (workdir / path.name).write_text(text.stdout)
    return workdir / f"{module_name}.c"


def ab_model(preset: str, batch: int, runs: int, base: Path, workdir: Path, kernel: str) -> None:
    import ml_dtypes  # noqa: F401 (numpy bfloat16)
    import tvm
    from preset_library import random_params
    from tvm import relax

    from mlc_vision.compiler.export import build_library
    from mlc_vision.compiler.module import build_module
    from mlc_vision.config import load_preset
    from mlc_vision.runtime.encoder import entry_function, prepacked_params

    module_name, dtype = KERNEL_CHOICES[kernel]
    kernel_module = importlib.import_module(f"mlc_vision.compiler.kernels.{module_name}")
    config = dataclasses.replace(load_preset(preset), select_layer=-1, feature="cls_patch")
    built = build_module(config, dtype, "cpu")
    dev, vms = tvm.cpu(), {}
    for name, source in (("base", base), ("tree", kernel_module.SOURCE)):
        kernel_module.SOURCE = source
        library = build_library(built.mod, "cpu", workdir / f"{name}.so", metadata=built.metadata)
        vms[name] = relax.VirtualMachine(tvm.runtime.load_module(str(library)), dev)
    loaded = [tvm.runtime.tensor(a.astype(dtype), dev) for a in random_params(built.metadata["params"])]
    # as VisionEncoder calls them: an fp32 library's twin on the weights its own prepack_params packed
    params = {name: prepacked_params(vm, built.metadata, loaded) for name, vm in vms.items()}
    encode = {name: vm[entry_function(built.metadata, "encode")] for name, vm in vms.items()}
    size = config.image_size
    pixels = np.random.default_rng(1).standard_normal((batch, 3, size, size)).astype("float32").astype(dtype)
    pixels = tvm.runtime.tensor(pixels, dev)
    times = {name: [] for name in vms}
    for name in vms:
        encode[name](pixels, params[name])  # warm-up
    for _ in range(runs):
        for name in vms:
            time.sleep(0.2)
            start = time.perf_counter()
            encode[name](pixels, params[name])
            times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        print(f"{name}: median {1e3 * np.median(t):.1f} ms, min {1e3 * min(t):.1f} ms")
    print(f"{preset} b={batch}: tree / base (median) {np.median(times['tree']) / np.median(times['base']):.3f}")


def _load(source: Path, workdir: Path, name: str) -> ctypes.CDLL:
    out = workdir / f"{name}.so"
    subprocess.run(["cc", "-O3", "-fPIC", "-shared", "-std=gnu11", str(source), "-o", str(out), "-lm"], check=True)
    lib = ctypes.CDLL(str(out))
    lib.mlcv_bf16_attention_io_path.argtypes = (
        [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int32, ctypes.c_int32]
    )
    lib.mlcv_bf16_linear_path.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
    return lib


def _bf16(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def ab_kernels(base: Path, workdir: Path) -> None:
    import tvm

    ctypes.CDLL(str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so"), mode=ctypes.RTLD_GLOBAL)
    libs = {"base": _load(base, workdir, "base"), "tree": _load(KERNELS / "cpu_bf16_gemm.c", workdir, "tree")}
    path = libs["tree"].mlcv_bf16_best_path()
    rng = np.random.default_rng(0)
    cases = []
    for b, s, h, d in ATTENTION:
        q, out = _bf16(rng.standard_normal((b, s, h, d))), np.zeros((b, s, h, d), np.uint16)
        cases.append((f"attention {s} tokens x {h} heads x {d}", lambda lib, q=q, out=out, b=b, s=s, h=h, d=d:
                      lib.mlcv_bf16_attention_io_path(path, q.ctypes.data, q.ctypes.data, q.ctypes.data,
                                                      out.ctypes.data, b, s, h, d, 0.1, 1, 1)))  # fmt: skip
    for m, n, k in LINEAR:
        x, w, y = _bf16(rng.standard_normal((m, k))), _bf16(rng.standard_normal((n, k))), np.zeros((m, n), np.float32)
        cases.append((f"linear {m} x {n} x {k}", lambda lib, x=x, w=w, y=y, m=m, n=n, k=k:
                      lib.mlcv_bf16_linear_path(path, x.ctypes.data, w.ctypes.data, None, None, y.ctypes.data, m, n, k)))  # fmt: skip
    for label, call in cases:
        best = {name: float("inf") for name in libs}
        for _ in range(7):
            for name, lib in libs.items():
                call(lib)
                start = time.perf_counter()
                call(lib)
                best[name] = min(best[name], time.perf_counter() - start)
        print(f"{label:36s} base {1e3 * best['base']:8.2f} ms  tree {1e3 * best['tree']:8.2f} ms  "
              f"tree / base {best['tree'] / best['base']:.3f}")  # fmt: skip


def ab_kernels_f32(base: Path, workdir: Path, blocks, m: int, runs: int, cflags: str, packed: bool) -> None:
    """The two fp32 objects on the linear layers of one block (f32_gemm_bench's chain), alternated,
    a pause before each call; ``packed``: each on the weights it packed beforehand."""
    import f32_gemm_bench

    from mlc_vision.bench import interleaved_medians_ms

    libs = {
        "base": f32_gemm_bench.build(None, str(workdir), [], source=base, name="base"),
        "tree": f32_gemm_bench.build(None, str(workdir), [cflags], name="tree"),
    }
    for block in blocks:
        width, mlp = F32_BLOCKS[block]
        weights, biases = f32_gemm_bench.random_linear_chain([(width, width)] * 4 + [(width, mlp), (mlp, width)], 1)
        x = np.random.default_rng(1).standard_normal((m, width)).astype(np.float32)
        chains = {name: f32_gemm_bench.linear_chain(lib, m, weights, biases, packed) for name, lib in libs.items()}
        ms = interleaved_medians_ms({name: (lambda run=run: run(x)) for name, run in chains.items()}, runs)
        gflop = sum(2 * m * w.shape[0] * w.shape[1] for w in weights) / 1e9
        print(f"{block} block, M={m}: base {ms['base']:8.1f} ms ({gflop / ms['base'] * 1e3:5.1f} GFLOP/s)  "
              f"tree {ms['tree']:8.1f} ms ({gflop / ms['tree'] * 1e3:5.1f})  tree / base {ms['tree'] / ms['base']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["model", "kernels"])
    ap.add_argument("preset", nargs="?", default="siglip-so400m-patch14-384")
    ap.add_argument("--base", required=True, help="git revision whose kernel is the base")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--kernel", choices=sorted(KERNEL_CHOICES), default="bf16", help="which kernel to A/B")
    ap.add_argument("--block", nargs="*", choices=sorted(F32_BLOCKS), default=sorted(F32_BLOCKS),
                    help="kernels --kernel f32: whose block's linear layers")
    ap.add_argument("--m", type=int, default=729, help="kernels --kernel f32: rows (tokens x batch)")
    ap.add_argument("--packed", action="store_true", help="kernels --kernel f32: weights packed beforehand")
    ap.add_argument("--cflags", default="", help="kernels --kernel f32: extra flags for the working tree's object")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "base").mkdir()
        base = base_source(args.base, workdir / "base", args.kernel)
        if args.what == "model":
            ab_model(args.preset, args.batch, args.runs, base, workdir, args.kernel)
        elif args.kernel == "f32":
            ab_kernels_f32(base, workdir, args.block, args.m, args.runs, args.cflags, args.packed)
        else:
            ab_kernels(base, workdir)


if __name__ == "__main__":
    main()
