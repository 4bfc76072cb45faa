#!/usr/bin/env python
"""Check and time our CUDA libraries on a real GPU, against PyTorch on the same GPU, in one run.

Two steps, because the machine with the GPU has no TVM compiler (only the
runtime travels to it) and this one has no GPU:

    python scripts/gpu_check.py build --out .gpu                 # here: CUDA libs (sm_90 fatbins) + CPU references
    TVM_USE_RUNTIME_LIB=1 python scripts/gpu_check.py run --dir .gpu --batch 1,8,32   # on the GPU machine

``build`` compiles every model of ``MODELS`` in fp16 for every variant of
``VARIANTS`` (attention lowering x matmul schedule x CUDA graphs):

* ``default``: split attention, dlight's WMMA matmuls (what ``compile`` gives today);
* ``tensorcore``: ``--attention tensorcore`` (attention matmuls on tensor cores, warp softmax);
* ``flash``: ``--attention flash`` (our tensor-core flash kernel, fed by one QKV GEMM per layer);
* ``flash-mma``: ``--attention flash --gemm mma`` (and the matmuls on ``mma.sync`` with cp.async);
* ``flash-mma-graph``: the same with ``relax.backend.use_cuda_graph`` (batch-1 launch overhead)
  and the batch bounded by ``GRAPH_MAX_BATCH`` (RewriteCUDAGraph captures nothing while
  the batch, and with it every allocation, is unbounded); whether TVM's graph capture
  works with our runtime is what this variant finds out.

A variant whose compile fails is reported and skipped.

Native-resolution towers (``NATIVE_MODELS``: Qwen2.5-VL's 7B tower) get
``default`` (the ``[n, n]`` mask) and ``flash`` (the segmented tensor-core
flash kernel): parity of two images in one call at ``PARITY_LAYERS`` layers
against our fp32 CPU library, and ms per call at 448x448 and 1008x672 (no
torch row for them).

It also runs our fp32 CPU library, whose parity with transformers the tests
prove, on a fixed input: that output is the reference. Models whose fp32
params do not fit this machine (EVA-CLIP E/14: 4.4 B) get their reference,
and small parity libraries, at ``PARITY_LAYERS`` layers: every layer runs the
same kernels, so that checks each kernel; the timing uses the full depth.

Params are made by an integer hash of (parameter index, element index)
(:func:`hashed_params`), identical in numpy here and in torch on the GPU, so
the run makes them on the device in moments (no 17 GB of host arrays for
EVA-E).

``run`` reports per model and variant: parity with the fp32 CPU reference
(max error / max |ref|, cosine; fp16 must reach cosine >= 0.999), median ms per
call of ours and of the same architecture in transformers (timm for EVA) in
fp16 on the same GPU (eager, SDPA attention) at each batch, the ratio, the
TFLOP/s we achieve (``bench.encoder_flops``), and the per-kernel profile's top
five (the whole profile goes to ``--out``).

Device time plan for ``run --batch 1,8,32`` on an H100/H200 (``--runs 10``):
about 1 s to load each of the 20 libraries; per model the torch baseline
(3 batches x 13 calls: 2-30 s, EVA-E the most), then per variant one parity
call, 3 batches x 13 calls and one profiled call (CLIP-L/SigLIP/InternViT:
5-20 s per variant; EVA-E at batch 32: up to ~1 s per call, so ~40 s per
variant). Roughly 1 min each for CLIP-L, SigLIP and InternViT, 3-4 min for
EVA-E: 5-7 minutes in all, plus the machine's start. ``--only`` and
``--variants`` cut it down for a rerun. torch.compile is not timed (its
compiles alone would take the budget).
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

MODELS = ("clip-vit-large-patch14-336", "siglip-so400m-patch14-384", "internvit-300m-448px", "eva-clip")
DTYPE = "float16"
ARCH = "sm_90"  # H100 / H200: one arch keeps the libraries small enough to carry to the GPU machine
#: variant -> (attention, gemm, CUDA graphs)
VARIANTS = {
    "default": ("split", "dlight", False),
    "tensorcore": ("tensorcore", "dlight", False),
    "flash": ("flash", "dlight", False),
    "flash-mma": ("flash", "mma", False),
    "flash-mma-graph": ("flash", "mma", True),
}
#: Above this many params the fp32 CPU reference (and the parity libraries) use PARITY_LAYERS layers.
REFERENCE_MAX_PARAMS = 1_000_000_000
PARITY_LAYERS = 4
PROFILE_TOP = 5
#: The CUDA-graph variant's batch bound (``tir_var_upper_bound``: without one nothing is captured).
GRAPH_MAX_BATCH = 32


def full_depth(preset: str, layers: int | None = None):
    """The preset with every layer (or ``layers``) built and every token returned."""
    from mlc_vision.config import load_preset

    config = replace(load_preset(preset), select_layer=-1, feature="cls_patch", projector=None)
    return config if layers is None else replace(config, num_hidden_layers=layers)


def lib_name(preset: str, variant: str, parity: bool = False) -> str:
    return f"{preset}-{variant}{'-parity' if parity else ''}.so"


# ---- params and inputs (numpy here, torch on the GPU: the same numbers) -----------------------


def hashed_uniform(xp, n: int, salt: int, device=None):
    """``n`` values uniform in [-sqrt(3), sqrt(3)] (unit variance) from an integer hash of (salt, index).

    Only int64 multiplies (every product below 2^63), masks, shifts and one
    exactly rounded float64 multiply: numpy and torch (CPU or GPU) give the same bits.
    """
    if xp is np:
        h = np.arange(n, dtype=np.int64)
    else:
        h = xp.arange(n, dtype=xp.int64, device=device)
    h = (h * 0x9E3779B1 + salt * 0x85EBCA6B) & 0xFFFFFFFF
    for mult in (0x2C1B3C6D, 0x297A2D39):
        h = h ^ (h >> 15)
        h = (h * mult) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    f = h.astype(np.float64) if xp is np else h.to(xp.float64)
    return ((f / 2.0**32 - 0.5) * 12.0**0.5).astype(np.float32) if xp is np else ((f / 2.0**32 - 0.5) * 12.0**0.5).float()


def param_scale(p: dict) -> tuple[float, float]:
    """(scale, offset) giving O(1) activations: fan-in scaled matrices, norm weights near 1, small biases."""
    if len(p["shape"]) >= 2:
        return 1.0 / float(np.sqrt(np.prod(p["shape"][1:]))), 0.0
    if "norm" in p["name"] or p["name"].split(".")[-1] in ("ls1", "ls2", "lambda_1", "lambda_2"):
        return 0.1, 1.0
    return 0.1, 0.0


def hashed_params(metadata: dict, xp=np, device=None) -> list:
    """Every param of ``metadata`` in fp32 (numpy arrays, or torch tensors on ``device``)."""
    out = []
    for index, p in enumerate(metadata["params"]):
        n = int(np.prod(p["shape"]))
        scale, offset = param_scale(p)
        values = hashed_uniform(xp, n, index + 1, device) * np.float32(scale) + np.float32(offset)
        out.append(values.reshape(p["shape"]))
    return out


def check_pixels(config) -> np.ndarray:
    size = config.image_size
    return np.random.RandomState(1).standard_normal((1, 3, size, size)).astype(np.float32)


def batch_pixels(config, batch: int) -> np.ndarray:
    size = config.image_size
    return np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(DTYPE)


def param_count(config) -> int:
    from mlc_vision.compiler.module import build_module

    return sum(int(np.prod(p["shape"])) for p in build_module(config, DTYPE, "cuda").metadata["params"])


# ---- build (no GPU) --------------------------------------------------------------------------


def build_variant(config, variant: str, path: Path) -> None:
    import tvm

    from mlc_vision.compiler.export import build_library
    from mlc_vision.compiler.module import build_module

    attention, gemm, graph = VARIANTS[variant]
    built = build_module(config, DTYPE, "cuda", attention=attention, gemm=gemm)
    mod = built.mod
    if graph:
        # RewriteCUDAGraph captures only allocations of bounded size: bound the symbolic batch
        encode = mod.get_global_var("encode")
        mod[encode] = mod[encode].with_attr("tir_var_upper_bound", {"batch": GRAPH_MAX_BATCH})
        built.metadata["cuda_graph_max_batch"] = GRAPH_MAX_BATCH
    with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": graph}):
        build_library(mod, "cuda", path, arch=ARCH, metadata=built.metadata)


def cpu_reference(config) -> np.ndarray:
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from mlc_vision.compiler.export import build_library
    from mlc_vision.compiler.module import build_module
    import tempfile

    built = build_module(config, "float32", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_library(built.mod, "cpu", Path(tmp) / "ref.so", metadata=built.metadata)
        vm = VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
        params = [tvm.runtime.tensor(a) for a in hashed_params(built.metadata)]
        return vm["encode"](tvm.runtime.tensor(check_pixels(config)), params).numpy()


def build(out: Path, models: list[str], variants: list[str]) -> None:
    (out / "libs").mkdir(parents=True, exist_ok=True)
    (out / "ref").mkdir(parents=True, exist_ok=True)
    for preset in models:
        config = full_depth(preset)
        shallow = param_count(config) > REFERENCE_MAX_PARAMS
        parity_config = full_depth(preset, PARITY_LAYERS) if shallow else config
        for variant in variants:
            start = time.perf_counter()
            try:
                build_variant(config, variant, out / "libs" / lib_name(preset, variant))
                if shallow:
                    build_variant(parity_config, variant, out / "libs" / lib_name(preset, variant, parity=True))
            except Exception as err:  # a variant that does not build is reported, the others go on
                print(f"{preset} {variant}: NOT BUILT ({type(err).__name__}: {str(err).splitlines()[0][:200]})", flush=True)
                continue
            print(f"{preset} {variant}: built in {time.perf_counter() - start:.0f} s", flush=True)
        ref = cpu_reference(parity_config)
        np.save(out / "ref" / f"{preset}.npy", ref)
        layers = parity_config.num_hidden_layers
        (out / "ref" / f"{preset}.json").write_text(json.dumps({"layers": layers, "parity_libs": shallow}))
        print(f"{preset}: fp32 CPU reference at {layers} layers {list(ref.shape)}, max |x| {np.abs(ref).max():.3g}", flush=True)
    sizes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {sizes / 2**20:.1f} MiB", flush=True)


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


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Error measures of an fp16 library and whether they meet the test suite's fp16 bounds
    (mlc_vision.testing.parity: cosine, max error and scale against the fp32 reference)."""
    from mlc_vision.testing.parity import failures, measure

    m = measure(ours, ref, "encode", "float16")
    return {"rel_max_err": m.rel_max_err, "cosine": m.cosine, "norm_ratio": m.norm_ratio, "ok": not failures(m)}


def kernel_profile(vm, params, x, dev) -> list[tuple[str, int, float]]:
    """``[(kernel, calls, seconds), ...]`` of one call, slowest first (a device sync around every launch)."""
    totals: dict[str, list] = {}
    state = {}

    def instrument(func, name, before_run, ret_value, *args):
        dev.sync()
        if before_run:
            state["start"] = time.perf_counter()
        else:
            entry = totals.setdefault(str(name), [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - state["start"]
        return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual

    vm.set_instrument(instrument)
    try:
        vm["encode"](x, params)
    finally:
        vm.set_instrument(None)
    return sorted(((name, n, t) for name, (n, t) in totals.items()), key=lambda row: -row[2])


def profile_table(profile, top: int | None = None) -> str:
    total = sum(t for _, _, t in profile) or 1.0
    lines = [f"{'kernel':64s} {'calls':>5s} {'ms':>9s} {'share':>6s}"]
    for name, n, t in profile[:top]:
        lines.append(f"{name[:64]:64s} {n:5d} {1000 * t:9.3f} {100 * t / total:5.1f}%")
    return "\n".join(lines) + "\n"


def torch_ms_by_batch(config, batches: list[int], runs: int) -> dict[int, float]:
    """Median ms of the same architecture in transformers/timm, fp16 eager (SDPA), per batch."""
    import torch

    from mlc_vision.testing.references import torch_model

    torch.manual_seed(0)
    with torch.device("cuda"):  # initialize on the GPU: EVA-E's 4.4 B params take minutes on the host
        model = torch_model(config).eval().to(dtype=torch.float16)
    times = {}
    for batch in batches:
        x = torch.from_numpy(batch_pixels(config, batch)).cuda()

        def call():
            with torch.inference_mode():
                model(x)

        times[batch] = gpu_median_ms(call, torch.cuda.synchronize, runs)
    return times


def device_params(metadata: dict):
    """The hashed params made on the GPU in fp16, as TVM tensors (shared by every variant)."""
    import torch
    import tvm

    return [tvm.runtime.from_dlpack(t.half().contiguous()) for t in hashed_params(metadata, torch, "cuda")]


def load_vm(path: Path, dev):
    import tvm
    from tvm.runtime.vm import VirtualMachine

    vm = VirtualMachine(tvm.runtime.load_module(str(path)), dev)
    return vm, json.loads(vm["_metadata"]())


def parity_row(root: Path, preset: str, variant: str, vm, metadata, params, dev) -> dict:
    """Our output on the check input against the fp32 CPU reference (full depth, or the parity library)."""
    import tvm

    info = json.loads((root / "ref" / f"{preset}.json").read_text())
    reference = np.load(root / "ref" / f"{preset}.npy")
    if info["parity_libs"]:
        vm, metadata = load_vm(root / "libs" / lib_name(preset, variant, parity=True), dev)
        params = device_params(metadata)
    config = full_depth(preset, info["layers"])
    x = tvm.runtime.tensor(check_pixels(config).astype(DTYPE), dev)
    row = {f"vs_cpu_fp32_{k}": v for k, v in compare(vm["encode"](x, params).numpy(), reference).items()}
    row["parity_layers"] = info["layers"]
    return row


def run_model(preset: str, root: Path, out: Path, batches: list[int], runs: int, variants: list[str]) -> list[dict]:
    import torch
    import tvm

    from mlc_vision.bench import encoder_flops

    config = full_depth(preset)
    dev = tvm.cuda(0)
    torch_ms = torch_ms_by_batch(config, batches, runs)
    torch.cuda.empty_cache()  # the torch model is gone: give its memory back before our libraries run
    params = None  # one params list for every variant (same model)
    rows = []
    for variant in variants:
        path = root / "libs" / lib_name(preset, variant)
        if not path.exists():
            print(f"{preset} {variant}: no library (not built)", flush=True)
            continue
        vm, metadata = load_vm(path, dev)
        params = params if params is not None else device_params(metadata)
        row = {"model": preset, "variant": variant, "tokens": config.tokens.sequence}
        row.update(parity_row(root, preset, variant, vm, metadata, params, dev))
        encode = vm["encode"]
        for batch in batches:
            x = tvm.runtime.tensor(batch_pixels(config, batch), dev)
            ms = gpu_median_ms(lambda: encode(x, params), dev.sync, runs)
            row[f"b{batch}_ours_ms"] = round(ms, 3)
            row[f"b{batch}_torch_ms"] = round(torch_ms[batch], 3)
            row[f"b{batch}_ratio"] = round(ms / torch_ms[batch], 3)
            row[f"b{batch}_tflops"] = round(encoder_flops(config, batch, config.num_hidden_layers) / ms / 1e9, 1)
        try:
            profile = kernel_profile(vm, params, x, dev)
            (out / f"profile-{preset}-{variant}-b{batches[-1]}.txt").write_text(profile_table(profile))
            row["profile_top"] = [(name, round(1000 * t, 3)) for name, _, t in profile[:PROFILE_TOP]]
            print(f"{preset} {variant} b{batches[-1]}:\n" + profile_table(profile, PROFILE_TOP), flush=True)
        except Exception as err:  # the profile is a bonus: keep the row
            print(f"{preset} {variant}: no kernel profile ({type(err).__name__}: {err})", flush=True)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict], batches: list[int], device: str) -> str:
    head = "| model | variant | vs our fp32 CPU: rel err / cosine | " + " | ".join(
        f"b{b} ours / torch ms (ratio, TFLOP/s)" for b in batches
    )
    lines = [f"GPU: {device}", "", head + " |", "|" + "---|" * (3 + len(batches))]
    for r in rows:
        parity = f"{r['vs_cpu_fp32_rel_max_err']:.1e} / {r['vs_cpu_fp32_cosine']:.6f}"
        parity += "" if r["vs_cpu_fp32_ok"] else " FAIL"
        parity += f" ({r['parity_layers']} layers)" if r["parity_layers"] != full_depth(r["model"]).num_hidden_layers else ""
        cells = " | ".join(
            f"{r[f'b{b}_ours_ms']:.2f} / {r[f'b{b}_torch_ms']:.2f} ({r[f'b{b}_ratio']:.2f}, {r[f'b{b}_tflops']:.0f})"
            for b in batches
        )
        lines.append(f"| {r['model']} | {r['variant']} | {parity} | {cells} |")
    return "\n".join(lines) + "\n"


def run(root: Path, out: Path, batches: list[int], runs: int, models: list[str], variants: list[str]) -> None:
    import torch

    load_cuda_runtime()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    for preset in models:
        try:
            rows += run_model(preset, root, out, batches, runs, variants)
        except Exception as err:  # report and go on to the next model
            print(f"{preset}: FAILED {type(err).__name__}: {err}", flush=True)
            rows.append({"model": preset, "error": f"{type(err).__name__}: {err}"})
        print(f"-- {preset} done at {time.perf_counter() - start:.0f} s", flush=True)
    device = torch.cuda.get_device_name(0)
    (out / "gpu-check.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    table = markdown([r for r in rows if "error" not in r], batches, device)
    (out / "gpu-check.md").write_text(table)
    print(table)


# ---- native-resolution towers (Qwen2.5-VL): patches + segment ids in, merged tokens out -------------------

#: Native-resolution presets and their variants (segmented attention: the [n, n] mask, or the flash kernel).
NATIVE_MODELS = ("qwen2.5-vl-7b-vision",)
NATIVE_VARIANTS = {"default": VARIANTS["default"], "flash": VARIANTS["flash"]}
#: Parity call: two images in one call (a partial window row/column in the second), at PARITY_LAYERS layers.
NATIVE_CHECK_GRIDS = [(1, 16, 16), (1, 12, 20)]
#: Timed calls: 448 x 448 (1024 patches) and 1008 x 672 (3456 patches), one image each.
NATIVE_TIMED_GRIDS = {"448x448": [(1, 32, 32)], "1008x672": [(1, 72, 48)]}


def native_inputs(metadata: dict, grids, seed: int) -> list[np.ndarray]:
    """``encode``'s inputs for ``grids`` in the metadata's order: random patches, the runtime's ids."""
    from mlc_vision.runtime.native import NativeGeometry, attention_inputs

    native = metadata["native_resolution"]
    count = sum(t * h * w for t, h, w in grids)
    width = native["inputs"][0]["shape"][1]
    arrays = {"patches": np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)}
    arrays.update(attention_inputs(grids, NativeGeometry.from_metadata(native)))
    return [arrays[spec["name"]] for spec in native["inputs"]]


def native_cpu_reference(config) -> np.ndarray:
    import tempfile

    import tvm
    from tvm.runtime.vm import VirtualMachine

    from mlc_vision.compiler.export import build_library
    from mlc_vision.compiler.module import build_module

    built = build_module(config, "float32", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_library(built.mod, "cpu", Path(tmp) / "ref.so", metadata=built.metadata)
        vm = VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
        params = [tvm.runtime.tensor(a) for a in hashed_params(built.metadata)]
        inputs = [tvm.runtime.tensor(a) for a in native_inputs(built.metadata, NATIVE_CHECK_GRIDS, 0)]
        return vm["encode"](*inputs, params).numpy()


def build_native(out: Path, models: list[str], variants: list[str]) -> None:
    """Full-depth CUDA libraries per variant, PARITY_LAYERS-layer parity libraries and their fp32 CPU reference."""
    (out / "libs").mkdir(parents=True, exist_ok=True)
    (out / "ref").mkdir(parents=True, exist_ok=True)
    for preset in models:
        for variant in variants:
            start = time.perf_counter()
            try:
                build_variant(full_depth(preset), variant, out / "libs" / lib_name(preset, variant))
                build_variant(full_depth(preset, PARITY_LAYERS), variant, out / "libs" / lib_name(preset, variant, True))
            except Exception as err:  # reported, the others go on
                print(f"{preset} {variant}: NOT BUILT ({type(err).__name__}: {str(err).splitlines()[0][:200]})", flush=True)
                continue
            print(f"{preset} {variant}: built in {time.perf_counter() - start:.0f} s", flush=True)
        np.save(out / "ref" / f"{preset}.npy", native_cpu_reference(full_depth(preset, PARITY_LAYERS)))


def run_native(root: Path, out: Path, runs: int, models: list[str], variants: list[str]) -> None:
    """Per preset and variant: parity of the parity library with the fp32 CPU reference, ms per timed grid.

    No torch row here: ``mlc-vision bench -m qwen2.5-vl-7b-vision`` times transformers on the CPU;
    on the GPU only our variants are compared with each other."""
    import tvm

    load_cuda_runtime()
    out.mkdir(parents=True, exist_ok=True)
    dev = tvm.cuda(0)
    rows = []
    for preset in models:
        reference = np.load(root / "ref" / f"{preset}.npy")
        for variant in variants:
            path = root / "libs" / lib_name(preset, variant)
            if not path.exists():
                print(f"{preset} {variant}: no library (not built)", flush=True)
                continue
            row = {"model": preset, "variant": variant}
            vm, metadata = load_vm(root / "libs" / lib_name(preset, variant, True), dev)
            inputs = [tvm.runtime.tensor(a.astype(DTYPE) if a.dtype == np.float32 else a, dev)
                      for a in native_inputs(metadata, NATIVE_CHECK_GRIDS, 0)]  # fmt: skip
            ours = vm["encode"](*inputs, device_params(metadata)).numpy()
            row.update({f"vs_cpu_fp32_{k}": v for k, v in compare(ours, reference).items()})
            vm, metadata = load_vm(path, dev)
            params = device_params(metadata)
            for label, grids in NATIVE_TIMED_GRIDS.items():
                inputs = [tvm.runtime.tensor(a.astype(DTYPE) if a.dtype == np.float32 else a, dev)
                          for a in native_inputs(metadata, grids, 1)]  # fmt: skip
                row[f"{label}_ms"] = round(gpu_median_ms(lambda: vm["encode"](*inputs, params), dev.sync, runs), 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    (out / "gpu-check-native.json").write_text(json.dumps({"device": str(dev), "rows": rows}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    for name in ("build", "run"):
        p = sub.add_parser(name)
        p.add_argument("--only", nargs="*", default=list(MODELS + NATIVE_MODELS), help="models (presets) to include")
        p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    b = sub.choices["build"]
    b.add_argument("--out", type=Path, default=Path(".gpu"))
    r = sub.choices["run"]
    r.add_argument("--dir", type=Path, default=Path(".gpu"))
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "dist/gpu-check")))
    r.add_argument("--batch", default="1,8,32")
    r.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    native = [m for m in args.only if m in NATIVE_MODELS]
    fixed = [m for m in args.only if m not in NATIVE_MODELS]
    native_variants = [v for v in args.variants if v in NATIVE_VARIANTS]
    if args.step == "build":
        if fixed:
            build(args.out, fixed, args.variants)
        if native:
            build_native(args.out, native, native_variants)
    else:
        if fixed:
            run(args.dir, args.out, [int(b) for b in args.batch.split(",")], args.runs, fixed, args.variants)
        if native:
            run_native(args.dir, args.out, args.runs, native, native_variants)


if __name__ == "__main__":
    main()
