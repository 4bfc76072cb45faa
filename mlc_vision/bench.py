"""Latency of our compiled library against the torch reference, in one process.

Weights are random (speed does not depend on their values). For every preset
and batch size we time ``encode`` of our CPU library and the torch reference
(eager, and ``torch.compile`` when it builds within its time budget), report
the median of ``runs`` timed calls after warm-up, the ratio ours / torch
(below 1.0 means we are faster), and the achieved GFLOP/s against this
machine's nominal peak. Results go to ``<output>/bench.json`` and
``<output>/bench.md``.

The torch references live in :mod:`mlc_vision.testing` (the ``test`` extra:
torch, transformers and timm); ``bench`` says so when they are missing.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .compiler.targets import ATTENTION_BY_TARGET
from .config import VisionConfig, list_presets, load_preset

DEFAULT_MODELS = (
    "clip-vit-base-patch16",
    "clip-vit-large-patch14-336",
    "internvit-300m-448px",
    "siglip-so400m-patch14-384",
)
TORCH_COMPILE_BUDGET_S = 240.0


# ---- FLOPs and peak -------------------------------------------------------------------


def encoder_flops(config: VisionConfig, batch: int, layers: int) -> float:
    """Multiply-adds x 2 of the patch embedding and ``layers`` transformer layers."""
    n, d, i = config.num_positions, config.hidden_size, config.intermediate_size
    patch = config.num_patches * config.num_channels * config.patch_size**2 * d
    per_layer = 4 * n * d * d + 2 * n * d * i + 2 * n * n * d
    return 2.0 * batch * (patch + layers * per_layer)


def nominal_peak_gflops() -> tuple[float, str]:
    """Cores x GHz x FLOP/cycle (AVX-512: 2 FMA pipes x 16 fp32 lanes x 2)."""
    cores = os.cpu_count() or 1
    ghz = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                ghz = float(line.split(":")[1]) / 1000
                break
    except OSError:
        pass
    ghz = ghz or 2.5
    flops_per_cycle = 64 if "avx512f" in _cpu_flags() else 32
    peak = cores * ghz * flops_per_cycle
    return peak, f"{cores} cores x {ghz:.2f} GHz x {flops_per_cycle} FLOP/cycle"


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


# ---- timing ---------------------------------------------------------------------------------


def interleaved_medians_ms(fns: dict, runs: int, warmup: int = 2) -> dict:
    """Median ms of each callable, timed in alternation (A, B, C, A, B, C, ...).

    On a shared 2-core VM the machine's speed drifts by tens of percent over a
    minute; timing the contenders in turn gives each the same conditions.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


@dataclass
class Row:
    model: str
    batch: int
    layers: int
    tokens: int
    tvm_ms: float
    torch_eager_ms: float
    ratio_eager: float
    torch_compile_ms: float | None
    ratio_compile: float | None
    gflops: float
    tvm_gflops_per_s: float
    pct_peak: float
    compile_s: float
    notes: list[str] = field(default_factory=list)


class OurLibrary:
    """A CPU library compiled from a config, with random params of the right shapes."""

    def __init__(self, config: VisionConfig, workdir: Path):
        import tvm
        from tvm import relax

        from .compiler.export import build_library
        from .compiler.module import build_module

        start = time.perf_counter()
        built = build_module(config, "float32", "cpu")
        lib = build_library(built.mod, "cpu", workdir / f"{config.preset}-cpu.so", metadata=built.metadata)
        self.compile_s = time.perf_counter() - start
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), self.device)
        rng = np.random.default_rng(0)
        self.params = [
            tvm.runtime.tensor((rng.standard_normal(p["shape"]) * 0.02).astype("float32"), self.device)
            for p in built.metadata["params"]
        ]
        self.tokens = built.metadata["num_tokens"]

    def timer(self, pixels: np.ndarray):
        import tvm

        x = tvm.runtime.tensor(pixels, self.device)
        return lambda: self.vm["encode"](x, self.params)


def torch_timers(config: VisionConfig, pixels: np.ndarray, torch_compile: bool, notes: list[str]):
    from .testing.references import torch_model

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = torch_model(config).eval()
    x = torch.from_numpy(pixels)

    def eager():
        with torch.inference_mode():
            model(x)

    compiled = None
    if torch_compile:
        try:
            start = time.perf_counter()
            fn = torch.compile(model)
            with torch.inference_mode():
                fn(x)
            spent = time.perf_counter() - start
            if spent > TORCH_COMPILE_BUDGET_S:
                notes.append(f"torch.compile took {spent:.0f}s")

            def compiled():
                with torch.inference_mode():
                    fn(x)

        except Exception as err:  # torch.compile fails in many environment-specific ways
            notes.append(f"torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
            compiled = None
    return eager, compiled


def bench_one(preset: str, batches: list[int], runs: int, workdir: Path, torch_compile: bool, peak: float) -> list[Row]:
    config = replace(load_preset(preset), select_layer=-1, feature="cls_patch")
    ours = OurLibrary(config, workdir)
    rows = []
    for batch in batches:
        notes: list[str] = []
        rng = np.random.default_rng(batch)
        pixels = rng.standard_normal((batch, 3, config.image_size, config.image_size)).astype("float32")
        eager, compiled = torch_timers(config, pixels, torch_compile, notes)
        contenders = {"tvm": ours.timer(pixels), "eager": eager}
        if compiled:
            contenders["compile"] = compiled
        ms = interleaved_medians_ms(contenders, runs)
        tvm_ms, eager_ms, compile_ms = ms["tvm"], ms["eager"], ms.get("compile")
        flops = encoder_flops(config, batch, config.num_layers_compiled)
        achieved = flops / (tvm_ms / 1000) / 1e9
        rows.append(
            Row(
                model=preset, batch=batch, layers=config.num_layers_compiled, tokens=config.num_positions,
                tvm_ms=round(tvm_ms, 2), torch_eager_ms=round(eager_ms, 2), ratio_eager=round(tvm_ms / eager_ms, 3),
                torch_compile_ms=round(compile_ms, 2) if compile_ms else None,
                ratio_compile=round(tvm_ms / compile_ms, 3) if compile_ms else None,
                gflops=round(flops / 1e9, 1), tvm_gflops_per_s=round(achieved, 1),
                pct_peak=round(100 * achieved / peak, 1), compile_s=round(ours.compile_s, 1), notes=notes,
            )
        )
        print(_row_line(rows[-1]), flush=True)
    return rows


def _row_line(r: Row) -> str:
    tc = f"{r.torch_compile_ms:9.1f} ({r.ratio_compile:.2f})" if r.torch_compile_ms else "        n/a     "
    return (
        f"{r.model:<28} b={r.batch:<2} tvm {r.tvm_ms:9.1f} ms | eager {r.torch_eager_ms:9.1f} ms "
        f"ratio {r.ratio_eager:.2f} | compile {tc} | {r.tvm_gflops_per_s:6.1f} GFLOP/s ({r.pct_peak:.0f}% peak)"
    )


def markdown_table(rows: list[Row], peak_note: str) -> str:
    lines = [
        "| model | batch | layers | tokens | TVM ms | torch eager ms | TVM / eager | torch.compile ms | TVM / compile | TVM GFLOP/s | % of peak | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.batch} | {r.layers} | {r.tokens} | {r.tvm_ms:.1f} | {r.torch_eager_ms:.1f} | "
            f"{r.ratio_eager:.2f} | {r.torch_compile_ms if r.torch_compile_ms else 'n/a'} | "
            f"{r.ratio_compile if r.ratio_compile else 'n/a'} | {r.tvm_gflops_per_s:.0f} | {r.pct_peak:.0f} | {r.compile_s:.1f} |"
        )
    lines.append("")
    lines.append(f"Peak: {peak_note}. Median of the timed runs (ours and torch timed in alternation) after 2 warm-up calls, fp32, random weights.")
    return "\n".join(lines) + "\n"


# ---- GPU: kernel launches (no GPU needed) ------------------------------------------------

GPU_TIMING_NOTE = (
    "Timing needs a GPU; none is used here. This report comes from the compiled program: "
    "kernel launches that `encode` makes, read from the lowered Relax function."
)


def _lowered_gpu_module(config: VisionConfig, target_name: str, dtype: str, attention: str):
    """The IRModule after our GPU Relax pipeline (what the VM runs; no device codegen)."""
    from .compiler.module import build_module
    from .compiler.pipeline import relax_pipeline
    from .compiler.targets import make_target

    target = make_target(target_name)
    mod = build_module(config, dtype, target_name, attention=attention).mod
    return relax_pipeline(target_name, target, attention)(mod)


def kernel_calls(mod, entry: str = "encode") -> list[str]:
    """Names of the PrimFuncs ``entry`` calls, in call order, one per launch.

    After lowering, a kernel launch is a Relax call whose callee is a GlobalVar
    bound to a PrimFunc. Relax functions that ``entry`` reaches (e.g. CUDA-graph
    capture functions) are followed. Each of our GPU PrimFuncs is one kernel.
    """
    from tvm import relax, tirx

    calls: list[str] = []
    seen: set[str] = set()

    def visit(name: str):
        if name in seen:
            return
        seen.add(name)

        def on_expr(expr):
            if isinstance(expr, relax.Call) and isinstance(expr.op, relax.GlobalVar):
                callee = mod[expr.op]
                if isinstance(callee, tirx.PrimFunc):
                    calls.append(expr.op.name_hint)
                elif isinstance(callee, relax.Function):
                    visit(expr.op.name_hint)
            elif isinstance(expr, relax.GlobalVar) and isinstance(mod[expr], relax.Function):
                visit(expr.name_hint)

        relax.analysis.post_order_visit(mod[name], on_expr)

    visit(entry)
    return calls


def _tensorized_kernels(source: str) -> tuple[list[str], list[str]]:
    """``(all kernels, kernels using tensor cores)`` of a CUDA source (``mma_sync`` in the body)."""
    import re

    heads = list(re.finditer(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^)]*\)\s*\{", source))
    names, tensorized = [], []
    for i, head in enumerate(heads):
        body = source[head.end() : heads[i + 1].start() if i + 1 < len(heads) else len(source)]
        names.append(head.group(1))
        if "mma_sync" in body or "mma.sync" in body:
            tensorized.append(head.group(1))
    return names, tensorized


def gpu_kernel_report(
    preset: str | VisionConfig, target: str = "cuda", dtype: str = "float16", attention: str = "split"
) -> dict:
    """Kernel launches per encoder layer of ``preset`` compiled for ``target``, without a GPU.

    Builds the model at 1 and 2 layers through the real GPU Relax pipeline and
    counts the PrimFunc calls in ``encode``: the difference is what one layer
    costs in launches (every layer is the same), the rest is the embedding and
    the head. Tensor-core use comes from the generated CUDA of the 1-layer build.
    """
    from .compiler.export import compile_module, generated_source
    from .compiler.module import build_module

    config = load_preset(preset) if isinstance(preset, str) else preset
    base = replace(config, select_layer=-1, feature="cls_patch")
    calls = {n: kernel_calls(_lowered_gpu_module(replace(base, num_hidden_layers=n), target, dtype, attention)) for n in (1, 2)}
    per_layer = len(calls[2]) - len(calls[1])
    layer_kernels = list(calls[2])
    for name in calls[1]:  # what the second layer adds, in call order
        layer_kernels.remove(name)
    report = {
        "model": base.preset, "target": target, "dtype": dtype,
        "tokens": base.num_positions, "heads": base.num_attention_heads,
        "head_dim": base.hidden_size // base.num_attention_heads,
        "launches_1_layer": len(calls[1]), "launches_2_layers": len(calls[2]),
        "launches_per_layer": per_layer, "launches_outside_layers": len(calls[1]) - per_layer,
        "layer_kernels": layer_kernels,
        "distinct_kernels": len(set(calls[1])),
        "fused_attention": any(n.startswith("fused_attention") for n in calls[1]),
        "timing": GPU_TIMING_NOTE,
    }  # fmt: skip
    if target == "cuda":
        one = replace(base, num_hidden_layers=1)
        source = generated_source(compile_module(build_module(one, dtype, target, attention=attention).mod, target, attention=attention))
        names, tensorized = _tensorized_kernels(source)
        matmuls = [n for n in names if "matmul" in n]
        report.update(
            device_kernels=len(names), tensorized_kernels=tensorized,
            matmul_kernels=matmuls, matmuls_tensorized=[n for n in matmuls if n in tensorized],
        )  # fmt: skip
    return report


def gpu_report_markdown(reports: list[dict]) -> str:
    lines = [
        "| model | dtype | tokens | launches / layer | outside layers | distinct kernels | fused attention | matmuls on tensor cores |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        mm = r.get("matmul_kernels")
        tc = f"{len(r['matmuls_tensorized'])} / {len(mm)}" if mm is not None else "n/a"
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['tokens']} | {r['launches_per_layer']} | "
            f"{r['launches_outside_layers']} | {r['distinct_kernels']} | {'yes' if r['fused_attention'] else 'no'} | {tc} |"
        )
    lines += ["", GPU_TIMING_NOTE, ""]
    for r in reports:
        lines.append(f"- {r['model']}: one layer = {', '.join(r['layer_kernels'])}")
    return "\n".join(lines) + "\n"


def run_gpu_report(models, target: str, output: Path, dtype: str = "float16") -> list[dict]:
    """``bench --target cuda``: the kernel report for each model, to gpu-kernels.json / .md."""
    output.mkdir(parents=True, exist_ok=True)
    reports = []
    for preset in models:
        for attention in ATTENTION_BY_TARGET[target]:  # the default, and the opt-in --attention modes
            r = gpu_kernel_report(preset, target, dtype, attention)
            reports.append(r)
            print(f"{preset:<28} {target} {dtype} attention={attention}: {r['launches_per_layer']} launches/layer, "
                  f"{r['distinct_kernels']} distinct kernels", flush=True)  # fmt: skip
    stem = f"gpu-kernels-{target}"
    (output / f"{stem}.json").write_text(json.dumps({"note": GPU_TIMING_NOTE, "rows": reports}, indent=2) + "\n")
    (output / f"{stem}.md").write_text(gpu_report_markdown(reports))
    print(GPU_TIMING_NOTE)
    print(f"wrote {output / (stem + '.json')} and {output / (stem + '.md')}")
    return reports


def run_benchmark(models, target: str, batches: list[int], runs: int, output: Path, torch_compile: bool = True):
    from .errors import MlcVisionError

    if target == "cuda":
        models = models or [m for m in DEFAULT_MODELS if m in list_presets()]
        return run_gpu_report(models, target, Path(output))
    if target != "cpu":
        raise MlcVisionError(
            f"bench runs on the cpu target, and reports kernel launches for cuda (got {target!r})"
        )
    models = models or [m for m in DEFAULT_MODELS if m in list_presets()]
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    peak, peak_note = nominal_peak_gflops()
    rows: list[Row] = []
    for preset in models:
        rows += bench_one(preset, batches, runs, output, torch_compile, peak)
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "peak_gflops": peak, "peak": peak_note},
        "runs": runs,
        "rows": [asdict(r) for r in rows],
    }
    (output / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "bench.md").write_text(markdown_table(rows, peak_note))
    print(f"wrote {output / 'bench.json'} and {output / 'bench.md'}")
    return rows
