#!/usr/bin/env python
"""Check and time our CUDA libraries on a real GPU, against PyTorch on the same GPU.

Two steps, because the machine with the GPU has no TVM compiler (only the
runtime travels to it: the compiler library alone is 250 MB) and this one has
no GPU:

    python scripts/gpu_check.py build --out .gpu     # here: CUDA libs (nvcc fatbins) + CPU references
    TVM_USE_RUNTIME_LIB=1 python scripts/gpu_check.py run --dir .gpu --out results/   # on the GPU machine

``build`` compiles each model for cuda (``split`` attention: matmul -> softmax
-> matmul with the scores in global memory; ``fused``: our flash-style kernel;
``tensorcore``: the split on tensor cores with our softmax kernel)
and runs our fp32 CPU library, whose parity with transformers the tests prove,
on a fixed input with seeded params: that output is the reference. ``run``
makes the same params on the GPU (``numpy.random.RandomState``, whose stream is
frozen across numpy versions), and reports

* parity: our CUDA output against the fp32 CPU reference (max abs error over
  the reference's max magnitude, cosine; the brief's tolerances);
* speed: median ms per call of our library and of the same architecture in
  transformers (timm for EVA) in the same dtype on the same GPU (eager, SDPA
  attention), and the ratio;
* where the time goes: the Relax VM's per-kernel profile of each split library.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlc_vision.compiler.targets import ATTENTION_BY_TARGET  # noqa: E402  (no TVM import)

# (preset, dtype): the deployment shapes in fp16, and one fp32 model to check exactness.
MODELS = [
    ("clip-vit-large-patch14-336", "float16"),
    ("siglip-so400m-patch14-384", "float16"),
    ("internvit-300m-448px", "float16"),
    ("clip-vit-base-patch16", "float32"),
]
ATTENTIONS = ATTENTION_BY_TARGET["cuda"]
PARAM_SEED = 0


def full_depth(preset: str):
    """The preset with every layer built and every token returned (what hidden_states[-1] holds)."""
    from mlc_vision.config import load_preset

    return replace(load_preset(preset), select_layer=-1, feature="cls_patch", projector=None)


def lib_name(preset: str, dtype: str, attention: str) -> str:
    return f"{preset}-{dtype}-{attention}.so"


def seeded_params(metadata: dict) -> list[np.ndarray]:
    """Params with O(1) activations (fan-in scaled matrices, norm weights near 1), fp32, portable."""
    rng = np.random.RandomState(PARAM_SEED)
    out = []
    for p in metadata["params"]:
        noise = rng.standard_normal(p["shape"]).astype(np.float32)
        if len(p["shape"]) >= 2:
            out.append(noise / np.float32(np.sqrt(np.prod(p["shape"][1:]))))
        elif "norm" in p["name"] or p["name"].split(".")[-1] in ("ls1", "ls2", "lambda_1", "lambda_2"):
            out.append(1 + np.float32(0.1) * noise)
        else:
            out.append(np.float32(0.1) * noise)
    return out


def check_pixels(config) -> np.ndarray:
    size = config.image_size
    return np.random.RandomState(1).standard_normal((1, 3, size, size)).astype(np.float32)


# ---- build (no GPU) --------------------------------------------------------------------------


def build(out: Path) -> None:
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from mlc_vision.compiler.export import build_library
    from mlc_vision.compiler.module import build_module

    (out / "libs").mkdir(parents=True, exist_ok=True)
    (out / "ref").mkdir(parents=True, exist_ok=True)
    for preset, dtype in MODELS:
        config = full_depth(preset)
        for attention in ATTENTIONS:
            start = time.perf_counter()
            built = build_module(config, dtype, "cuda", attention=attention)
            path = build_library(built.mod, "cuda", out / "libs" / lib_name(preset, dtype, attention), metadata=built.metadata)
            print(f"{path.name}: {path.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - start:.0f} s", flush=True)
        built = build_module(config, "float32", "cpu")
        cpu_lib = build_library(built.mod, "cpu", out / f"{preset}-cpu.so", metadata=built.metadata)
        vm = VirtualMachine(tvm.runtime.load_module(str(cpu_lib)), tvm.cpu())
        params = [tvm.runtime.tensor(a) for a in seeded_params(built.metadata)]
        ref = vm["encode"](tvm.runtime.tensor(check_pixels(config)), params).numpy()
        np.save(out / "ref" / f"{preset}.npy", ref)
        cpu_lib.unlink()
        Path(f"{cpu_lib}.json").unlink(missing_ok=True)
        print(f"{preset}: fp32 CPU reference {list(ref.shape)}, max |x| {np.abs(ref).max():.3g}", flush=True)


# ---- run (on the GPU machine) ----------------------------------------------------------------


def load_cuda_runtime() -> None:
    """A runtime-only TVM does not load its CUDA device API by itself: load the sidecar library."""
    import tvm

    if tvm.cuda(0).exist:
        return
    lib = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    if not tvm.cuda(0).exist:
        raise SystemExit("no CUDA device visible to TVM")


def gpu_median_ms(fn, sync, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def compare(ours: np.ndarray, ref: np.ndarray, dtype: str) -> dict:
    """Error measures and whether they meet the test suite's bounds (mlc_vision.testing.parity)."""
    from mlc_vision.testing.parity import failures, measure

    m = measure(ours, ref, "encode", dtype)
    return {"rel_max_err": m.rel_max_err, "cosine": m.cosine, "norm_ratio": m.norm_ratio, "ok": not failures(m)}


def kernel_profile(vm, params, x, dev, top: int = 15) -> str:
    """Time of each kernel in one call, summed by name (a device sync around every launch)."""
    totals: dict[str, list] = {}
    state = {}

    def instrument(func, name, before_run, ret_value, *args):
        dev.sync()
        if before_run:
            state["start"] = time.perf_counter()
        else:
            entry = totals.setdefault(str(name), [0.0, 0])
            entry[0] += time.perf_counter() - state["start"]
            entry[1] += 1
        return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual

    vm.set_instrument(instrument)
    try:
        vm["encode"](x, params)
    finally:
        vm.set_instrument(None)
    total = sum(t for t, _ in totals.values())
    lines = [f"{'kernel':60s} {'calls':>5s} {'ms':>9s} {'share':>6s}"]
    for name, (t, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{name[:60]:60s} {n:5d} {1000 * t:9.3f} {100 * t / total:5.1f}%")
    lines.append(f"{'total (synchronized launches)':60s} {sum(n for _, n in totals.values()):5d} {1000 * total:9.3f}")
    return "\n".join(lines) + "\n"


def torch_model(config, dtype: str):
    """The same architecture in transformers (timm for EVA), on the GPU in ``dtype``."""
    import torch

    from mlc_vision.testing.references import torch_model as reference

    torch.manual_seed(0)
    return reference(config).eval().to("cuda", dtype=getattr(torch, dtype))


def batch_pixels(config, batch: int, dtype: str) -> np.ndarray:
    size = config.image_size
    return np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(dtype)


def torch_ms_by_batch(config, dtype: str, batches: list[int], runs: int) -> dict[int, float]:
    """Median ms of the torch model per batch, timed once for all our attention variants."""
    import torch

    model = torch_model(config, dtype)
    times = {}
    for batch in batches:
        x = torch.from_numpy(batch_pixels(config, batch, dtype)).cuda()

        def call():
            with torch.inference_mode():
                model(x)

        times[batch] = gpu_median_ms(call, torch.cuda.synchronize, runs)
    return times


def run_model(preset: str, dtype: str, root: Path, out: Path, batches: list[int], runs: int) -> list[dict]:
    import torch
    import tvm
    from tvm.runtime.vm import VirtualMachine

    config = full_depth(preset)
    dev = tvm.cuda(0)
    reference = np.load(root / "ref" / f"{preset}.npy")
    torch_ms = torch_ms_by_batch(config, dtype, batches, runs)
    torch.cuda.empty_cache()  # the torch model is gone: give its memory back before our libraries run
    host_params = None  # the same for every attention variant: one model, one params list
    rows = []
    for attention in ATTENTIONS:
        lib = root / "libs" / lib_name(preset, dtype, attention)
        vm = VirtualMachine(tvm.runtime.load_module(str(lib)), dev)
        metadata = json.loads(vm["_metadata"]())
        if host_params is None:
            host_params = [a.astype(dtype) for a in seeded_params(metadata)]
        params = [tvm.runtime.tensor(a, dev) for a in host_params]
        ours = vm["encode"](tvm.runtime.tensor(check_pixels(config).astype(dtype), dev), params).numpy()
        row = {"model": preset, "dtype": dtype, "attention": attention, "tokens": metadata["num_tokens"]}
        row.update({f"vs_cpu_fp32_{k}": v for k, v in compare(ours, reference, dtype).items()})
        for batch in batches:
            x = tvm.runtime.tensor(batch_pixels(config, batch, dtype), dev)
            ours_ms = gpu_median_ms(lambda: vm["encode"](x, params), dev.sync, runs)
            row[f"b{batch}_ours_ms"] = round(ours_ms, 3)
            row[f"b{batch}_torch_ms"] = round(torch_ms[batch], 3)
            row[f"b{batch}_ratio"] = round(ours_ms / torch_ms[batch], 3)
        try:
            table = kernel_profile(vm, params, x, dev)
            (out / f"profile-{preset}-{dtype}-{attention}-b{batches[-1]}.txt").write_text(table)
            print(table, flush=True)
        except Exception as err:  # the profile is a bonus: keep the row
            print(f"{preset} {attention}: no kernel profile ({type(err).__name__}: {err})", flush=True)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict], batches: list[int], device: str) -> str:
    head = "| model | dtype | attention | vs our fp32 CPU: rel err / cosine | " + " | ".join(
        f"b{b} ours ms | b{b} torch ms | b{b} ours/torch" for b in batches
    )
    lines = [f"GPU: {device}", "", head + " |", "|" + "---|" * (4 + 3 * len(batches))]
    for r in rows:
        parity = f"{r['vs_cpu_fp32_rel_max_err']:.1e} / {r['vs_cpu_fp32_cosine']:.6f}"
        parity += "" if r["vs_cpu_fp32_ok"] else " FAIL"
        cells = " | ".join(f"{r[f'b{b}_ours_ms']:.2f} | {r[f'b{b}_torch_ms']:.2f} | {r[f'b{b}_ratio']:.2f}" for b in batches)
        lines.append(f"| {r['model']} | {r['dtype']} | {r['attention']} | {parity} | {cells} |")
    return "\n".join(lines) + "\n"


def run(root: Path, out: Path, batches: list[int], runs: int, only: list[str]) -> None:
    import torch

    load_cuda_runtime()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset, dtype in MODELS:
        if only and preset not in only:
            continue
        try:
            rows += run_model(preset, dtype, root, out, batches, runs)
        except Exception as err:  # report and go on to the next model
            print(f"{preset}: FAILED {type(err).__name__}: {err}", flush=True)
            rows.append({"model": preset, "dtype": dtype, "error": f"{type(err).__name__}: {err}"})
    device = torch.cuda.get_device_name(0)
    (out / "gpu-check.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    table = markdown([r for r in rows if "error" not in r], batches, device)
    (out / "gpu-check.md").write_text(table)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, default=Path(".gpu"))
    r = sub.add_parser("run")
    r.add_argument("--dir", type=Path, default=Path(".gpu"))
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "dist/gpu-check")))
    r.add_argument("--batch", default="1,8")
    r.add_argument("--runs", type=int, default=20)
    r.add_argument("--only", nargs="*", default=[])
    args = parser.parse_args()
    if args.step == "build":
        build(args.out)
    else:
        run(args.dir, args.out, [int(b) for b in args.batch.split(",")], args.runs, args.only)


if __name__ == "__main__":
    main()
