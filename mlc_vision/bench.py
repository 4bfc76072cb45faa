"""Latency of our compiled libraries against the engines a user would pick instead, in one process.

Weights are random (speed does not depend on their values). For every preset
and batch size we time ``encode`` of our fp32 CPU library, the torch reference
(eager, and ``torch.compile`` when it builds within its time budget), ONNX
Runtime and OpenVINO (f32) on an ONNX export of that torch model
(``bench_peers.py``), and, on CPUs with a fast path for it, our bf16 library against
OpenVINO's default precision; all in alternation. We report the median of
``runs`` timed calls after warm-up, ours / the fastest fp32 peer (below 1.0
means we are faster), ours bf16 / OpenVINO default, the bf16 library's cosine
against our fp32 library, and the achieved GFLOP/s against this machine's fp32
peak (measured by an FMA-only loop on every core where one builds, else the
nominal one; the loop runs again before and after every row, and the best
reading counts). Every table starts with the machine (CPU, ISA, frequency, peaks).
Results go to ``<output>/bench.json`` and ``<output>/bench.md``.

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

from . import bench_peers
from .bench_peers import machine_info
from .compiler.targets import attention_modes
from .config import VisionConfig, list_presets, load_preset
from .weights.params import NUMPY_DTYPES

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
    n, d, i = config.tokens.sequence, config.hidden_size, config.intermediate_size
    patch = config.num_patches * config.num_channels * config.patch_size**2 * d
    per_layer = 4 * n * d * d + 2 * n * d * i + 2 * n * n * d
    return 2.0 * batch * (patch + layers * per_layer)


def bf16_is_fast_here() -> bool:
    """Whether our bf16 library has a fast path on this CPU: bf16 arithmetic (AVX512-BF16 or AMX), or
    the fp32 kernel reading bf16 weights (AVX-512F, or AVX2 with FMA)."""
    isa = set(machine_info()["isa"])
    return bool({"avx512_bf16", "amx_bf16", "avx512f"} & isa) or {"avx2", "fma"} <= isa


# ---- timing ---------------------------------------------------------------------------------


#: Pause before each timed call. Thread pools (OpenMP in torch, ONNX Runtime's,
#: OpenVINO's, TVM's) keep spinning for a while after a call; without a pause the
#: engine timed next shares the cores with the previous one's spinning threads.
QUIET_S = 0.2


def interleaved_medians_ms(fns: dict, runs: int, warmup: int = 2, quiet_s: float = QUIET_S) -> dict:
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
            time.sleep(quiet_s)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def cosine(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


#: fp32 contenders besides ours (the "fastest fp32 peer" is the fastest of these).
FP32_PEERS = {"eager": "torch eager", "compile": "torch.compile", "ort": "ONNX Runtime", "ov_f32": "OpenVINO f32"}


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
    onnxruntime_ms: float | None
    openvino_f32_ms: float | None
    best_fp32_peer: str
    ratio_best_fp32: float
    tvm_bf16_ms: float | None
    bf16_cosine: float | None
    openvino_default_ms: float | None
    openvino_default_precision: str | None
    ratio_bf16_openvino: float | None
    gflops: float
    tvm_gflops_per_s: float
    pct_peak: float
    compile_s: float
    probe_before_gflops: float | None = None
    probe_after_gflops: float | None = None
    notes: list[str] = field(default_factory=list)


def _random_params(metadata: dict, seed: int = 0) -> list[np.ndarray]:
    """fp32 params of the library's shapes: norm scales near 1, everything else small."""
    rng = np.random.default_rng(seed)
    params = []
    for p in metadata["params"]:
        value = rng.standard_normal(p["shape"]) * 0.02
        if len(p["shape"]) == 1 and p["name"].endswith("weight"):
            value += 1.0  # LayerNorm / RMSNorm scales
        params.append(value.astype("float32"))
    return params


class OurLibrary:
    """A CPU library compiled from a config in ``dtype``, with given fp32 params (cast to ``dtype``)."""

    def __init__(self, config: VisionConfig, workdir: Path, dtype: str = "float32", params=None):
        import tvm
        from tvm import relax

        from .compiler.export import build_library
        from .compiler.module import build_module
        from .runtime.encoder import entry_function, entry_params

        start = time.perf_counter()
        built = build_module(config, dtype, "cpu")
        lib = build_library(built.mod, "cpu", workdir / f"{config.preset}-cpu-{dtype}.so", metadata=built.metadata)
        self.compile_s = time.perf_counter() - start
        self.lib_path = lib
        self.dtype = dtype
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), self.device)
        self.fp32_params = params if params is not None else _random_params(built.metadata)
        self.metadata = built.metadata
        loaded = [tvm.runtime.tensor(p.astype(NUMPY_DTYPES[self.dtype]), self.device) for p in self.fp32_params]
        weights = entry_params(self.vm, self.metadata, loaded)  # as VisionEncoder loads them
        self.params = weights.tensors
        self.encode = self.vm[entry_function(self.metadata, "encode", weights.packed)]
        self.tokens = built.metadata["num_tokens"]

    def timer(self, pixels: np.ndarray):
        import tvm

        x = tvm.runtime.tensor(pixels.astype(NUMPY_DTYPES[self.dtype]), self.device)
        return lambda: self.encode(x, self.params)


def torch_timers(config: VisionConfig, pixels: np.ndarray, torch_compile: bool, notes: list[str]):
    """``(model, eager, compiled)``: the transformers model and its timers (compiled None when skipped)."""
    from .testing.references import torch_model

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
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
    return model, eager, compiled


class Peers:
    """ONNX Runtime and OpenVINO (f32 and default precision) on one ONNX export of the torch model."""

    def __init__(self, model, pixels: np.ndarray, workdir: Path, preset: str):
        self.path = bench_peers.export_onnx(model, pixels, workdir / f"{preset}.onnx")
        self.ort = bench_peers.onnxruntime_session(self.path)
        self.ov_f32, _ = bench_peers.openvino_model(self.path, "f32")
        self.ov_default, self.default_precision = bench_peers.openvino_model(self.path, None)

    def runners(self, pixels: np.ndarray) -> dict:
        return {
            "ort": bench_peers.onnxruntime_runner(self.ort, pixels),
            "ov_f32": bench_peers.openvino_runner(self.ov_f32, pixels),
            "ov_default": bench_peers.openvino_runner(self.ov_default, pixels),
        }


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def bench_one(preset: str, batches: list[int], runs: int, workdir: Path, torch_compile: bool, peak: float,
              peers: bool = True, bf16: bool = True, on_row=None) -> list[Row]:  # fmt: skip
    """Time every contender on ``preset`` at each batch, in alternation; one Row per batch (``on_row`` sees each)."""
    config = replace(load_preset(preset), select_layer=-1, feature="cls_patch")
    ours = OurLibrary(config, workdir)
    ours16 = OurLibrary(config, workdir, "bfloat16", params=ours.fp32_params) if bf16 else None
    peer_engines = None
    rows = []
    for batch in batches:
        notes: list[str] = []
        pixels = np.random.default_rng(batch).standard_normal((batch, 3, config.image_size, config.image_size)).astype("float32")
        model, eager, compiled = torch_timers(config, pixels, torch_compile, notes)
        contenders = {"tvm": ours.timer(pixels), "eager": eager}
        if compiled:
            contenders["compile"] = compiled
        if peers and peer_engines is None:
            peer_engines = Peers(model, pixels, workdir, preset)
        if peer_engines is not None:
            contenders.update(peer_engines.runners(pixels))
        cos16 = None
        if ours16 is not None:
            contenders["tvm_bf16"] = ours16.timer(pixels)
            cos16 = cosine(contenders["tvm"]().numpy(), contenders["tvm_bf16"]().numpy().astype("float32"))
        before = bench_peers.probe_now()
        ms = interleaved_medians_ms(contenders, runs)
        probes = (before, bench_peers.probe_now())
        rows.append(_make_row(preset, config, batch, ms, cos16, peer_engines, ours.compile_s, peak, notes, probes))
        print(_row_line(rows[-1]), flush=True)
        if on_row is not None:
            on_row(rows[-1])
    return rows


def _make_row(preset, config, batch, ms, cos16, peer_engines, compile_s, peak, notes, probes=(None, None)) -> Row:
    """The row of one batch; ``probes``: the FMA probe's readings before and after its calls. The % of
    peak divides by the best of ``peak`` (the run's first reading) and those two."""
    tvm_ms = ms["tvm"]
    peak = max([peak, *(p for p in probes if p)])
    fp32_peers = {k: ms[k] for k in FP32_PEERS if k in ms}
    best = min(fp32_peers, key=fp32_peers.get)
    flops = encoder_flops(config, batch, config.num_layers_compiled)
    achieved = flops / (tvm_ms / 1000) / 1e9
    rnd = lambda v: round(v, 2) if v is not None else None  # noqa: E731
    return Row(
        model=preset, batch=batch, layers=config.num_layers_compiled, tokens=config.tokens.sequence,
        tvm_ms=rnd(tvm_ms), torch_eager_ms=rnd(ms["eager"]), ratio_eager=_ratio(tvm_ms, ms["eager"]),
        torch_compile_ms=rnd(ms.get("compile")), ratio_compile=_ratio(tvm_ms, ms.get("compile")),
        onnxruntime_ms=rnd(ms.get("ort")), openvino_f32_ms=rnd(ms.get("ov_f32")),
        best_fp32_peer=FP32_PEERS[best], ratio_best_fp32=_ratio(tvm_ms, fp32_peers[best]),
        tvm_bf16_ms=rnd(ms.get("tvm_bf16")), bf16_cosine=round(cos16, 6) if cos16 is not None else None,
        openvino_default_ms=rnd(ms.get("ov_default")),
        openvino_default_precision=peer_engines.default_precision if peer_engines else None,
        ratio_bf16_openvino=_ratio(ms.get("tvm_bf16"), ms.get("ov_default")),
        gflops=round(flops / 1e9, 1), tvm_gflops_per_s=round(achieved, 1),
        pct_peak=round(100 * achieved / peak, 1), compile_s=round(compile_s, 1), notes=notes,
        probe_before_gflops=rnd(probes[0]), probe_after_gflops=rnd(probes[1]),
    )  # fmt: skip


def _fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


def _row_line(r: Row) -> str:
    return (
        f"{r.model:<28} b={r.batch:<2} ours fp32 {r.tvm_ms:9.1f} ms | eager {r.torch_eager_ms:9.1f} | "
        f"compile {_fmt(r.torch_compile_ms)} | ORT {_fmt(r.onnxruntime_ms)} | OV f32 {_fmt(r.openvino_f32_ms)} | "
        f"ours/best {r.ratio_best_fp32:.2f} ({r.best_fp32_peer}) | ours bf16 {_fmt(r.tvm_bf16_ms)} "
        f"(cos {_fmt(r.bf16_cosine, '.6f')}) vs OV {r.openvino_default_precision or 'default'} "
        f"{_fmt(r.openvino_default_ms)}: {_fmt(r.ratio_bf16_openvino, '.2f')} | {r.tvm_gflops_per_s:6.1f} GFLOP/s ({r.pct_peak:.0f}% peak) "
        f"| probe {_probes(r)} GFLOP/s"
    )


def _probes(r: Row) -> str:
    """The row's FMA-probe readings, before / after its calls."""
    return f"{_fmt(r.probe_before_gflops, '.0f')} / {_fmt(r.probe_after_gflops, '.0f')}"


def markdown_table(rows: list[Row], machine: dict, runs: int) -> str:
    lines = [
        bench_peers.machine_header(machine),
        "",
        "| model | batch | tokens | ours fp32 ms | torch eager ms | torch.compile ms | ONNX Runtime ms | OpenVINO f32 ms "
        "| ours / fastest fp32 peer | ours bf16 ms | bf16 cosine vs our fp32 | OpenVINO default ms (precision) "
        "| ours bf16 / OpenVINO default | ours fp32 GFLOP/s | % of fp32 peak | FMA probe before / after, GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ov_default = f"{_fmt(r.openvino_default_ms)} ({r.openvino_default_precision})" if r.openvino_default_ms else "n/a"
        lines.append(
            f"| {r.model} | {r.batch} | {r.tokens} | {r.tvm_ms:.1f} | {r.torch_eager_ms:.1f} | {_fmt(r.torch_compile_ms)} | "
            f"{_fmt(r.onnxruntime_ms)} | {_fmt(r.openvino_f32_ms)} | {r.ratio_best_fp32:.2f} ({r.best_fp32_peer}) | "
            f"{_fmt(r.tvm_bf16_ms)} | {_fmt(r.bf16_cosine, '.6f')} | {ov_default} | {_fmt(r.ratio_bf16_openvino, '.2f')} | "
            f"{r.tvm_gflops_per_s:.0f} | {r.pct_peak:.0f} | {_probes(r)} |"
        )
    notes = [f"- {r.model} b={r.batch}: {n}" for r in rows for n in r.notes]
    lines += [
        "",
        f"Median of {runs} timed calls after 2 warm-up calls, every contender timed in alternation in one process, "
        f"{QUIET_S:g} s of pause before each call; random weights; ONNX Runtime and OpenVINO run the same ONNX "
        "export of the torch model. The FMA probe of the header is read again before and after each row's calls: "
        "readings well under the best mean that other work shared the cores while the row ran; the % column "
        "divides by the best of the header's reading and the row's two.",
        *notes,
    ]
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
        "tokens": base.tokens.sequence, "heads": base.num_attention_heads,
        "head_dim": base.hidden_size // base.num_attention_heads,
        "launches_1_layer": len(calls[1]), "launches_2_layers": len(calls[2]),
        "launches_per_layer": per_layer, "launches_outside_layers": len(calls[1]) - per_layer,
        "layer_kernels": layer_kernels,
        "distinct_kernels": len(set(calls[1])),
        "fused_attention": any(n.startswith(("fused_attention", "flash_attention")) for n in calls[1]),
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
        for attention in attention_modes(target, dtype):  # the default, and the opt-in --attention modes
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


def run_benchmark(models, target: str, batches: list[int], runs: int, output: Path, torch_compile: bool = True,
                  peers: bool = True, bf16: bool | None = None, native_sizes=None, tiles: int | None = None):  # fmt: skip
    """``mlc-vision bench``: ours (fp32, bf16) against torch, ONNX Runtime and OpenVINO on this CPU.

    Native-resolution presets get one row per image size (``native_sizes``,
    ``(height, width)`` pairs; default NATIVE_IMAGE_SIZES) instead of batches.
    With ``tiles``, presets with InternVL dynamic tiles get one row of one
    image cut into that many tiles (plus the thumbnail) instead of batches.
    """
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
    machine = machine_info(measure_peak=True)
    print(bench_peers.machine_header(machine), flush=True)
    if peers and bench_peers.missing_peers():
        print(f"note: no ONNX Runtime / OpenVINO columns ({', '.join(bench_peers.missing_peers())} missing): "
              "pip install mlc-vision[bench]", flush=True)  # fmt: skip
        peers = False
    bf16 = bf16_is_fast_here() if bf16 is None else bf16
    rows: list[Row] = []

    def write(row: Row) -> None:  # after every row: a long run that is stopped keeps what it measured
        rows.append(row)
        report = {"machine": {"platform": platform.platform(), **machine}, "runs": runs, "rows": [asdict(r) for r in rows]}
        (output / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
        (output / "bench.md").write_text(markdown_table(rows, machine, runs))

    native = Report(output / "bench-native", machine, runs, native_markdown)
    tiled = Report(output / "bench-tiles", machine, runs, tiles_markdown)
    for preset in models:
        config = load_preset(preset)
        if config.native_resolution:  # image sizes, not batches
            bench_native(preset, runs, output, on_row=native.add, sizes=native_sizes)
        elif tiles and config.tiling is not None and config.tiling.mode == "internvl":
            bench_tiles(preset, tiles, runs, output, on_row=tiled.add)
        else:
            bench_one(preset, batches, runs, output, torch_compile, bench_peers.reference_peak(machine), peers, bf16, on_row=write)
    written = [str(output / "bench.{json,md}")] if rows else []
    written += [f"{r.stem}.{{json,md}}" for r in (native, tiled) if r.rows]
    print("wrote " + (" and ".join(written) if written else "nothing (no rows)"))
    return rows


class Report:
    """``<stem>.json`` and ``<stem>.md`` (the machine header first), rewritten after every row:
    a long run that is stopped keeps what it measured."""

    def __init__(self, stem: Path, machine: dict, runs: int, markdown):
        self.stem, self.machine, self.runs, self.markdown = Path(stem), machine, runs, markdown
        self.rows: list = []

    def add(self, row) -> None:
        self.rows.append(row)
        report = {"machine": {"platform": platform.platform(), **self.machine}, "runs": self.runs,
                  "rows": [asdict(r) for r in self.rows]}  # fmt: skip
        self.stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        self.stem.with_suffix(".md").write_text(self.markdown(self.rows, self.machine, self.runs))


def parse_image_size(text: str) -> tuple[int, int]:
    """``"1008x672"`` (height x width in pixels) -> ``(1008, 672)``; one-line error otherwise."""
    from .errors import MlcVisionError

    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise MlcVisionError(f"image size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 1008x672")
    return int(parts[0]), int(parts[1])


# ---- native resolution (Qwen2-VL / Qwen2.5-VL towers) ------------------------------------

#: image sizes (height, width) timed for a native-resolution preset, batch 1
NATIVE_IMAGE_SIZES = ((448, 448), (1008, 672))


@dataclass
class NativeRow:
    model: str
    image: str  # height x width in pixels (already multiples of patch x merge)
    patches: int
    tokens: int
    tvm_ms: float
    torch_eager_ms: float
    ratio_eager: float
    cosine_vs_torch: float
    compile_s: float


def native_inputs(library: "OurLibrary", height: int, width: int) -> tuple[list[np.ndarray], tuple]:
    """Random normalized patches of one ``height x width`` image and the library's per-patch inputs."""
    from .runtime.native import NativeGeometry, attention_inputs

    native = library.metadata["native_resolution"]
    geometry = NativeGeometry.from_metadata(native)
    grid = (1, height // geometry.patch_size, width // geometry.patch_size)
    count, size = grid[1] * grid[2], native["inputs"][0]["shape"][1]
    arrays = {"patches": np.random.default_rng(0).standard_normal((count, size)).astype("float32"),
              **attention_inputs([grid], geometry)}  # fmt: skip
    return [arrays[spec["name"]] for spec in native["inputs"]], grid


def check_native_sizes(config: VisionConfig, sizes) -> None:
    """Image sizes the runtime passes unresized: multiples of patch x merge on both sides (one line otherwise)."""
    from .errors import MlcVisionError

    factor = config.patch_size * config.spatial_merge_size
    for height, width in sizes:
        if height % factor or width % factor:
            raise MlcVisionError(f"image size {height}x{width}: both sides must be multiples of {factor} for {config.preset}")


def bench_native(preset: str, runs: int, workdir: Path, on_row=None, sizes=None) -> list[NativeRow]:
    """Our fp32 library against transformers' ``visual`` tower (same random weights), one image per call."""
    import torch
    import tvm

    from .testing.references import torch_model

    config = load_preset(preset)
    sizes = sizes or NATIVE_IMAGE_SIZES
    check_native_sizes(config, sizes)
    ours = OurLibrary(config, workdir)
    torch.set_num_threads(os.cpu_count() or 1)
    model = torch_model(config).eval()
    load_library_params_into(model, ours)
    rows = []
    for height, width in sizes:
        inputs, grid = native_inputs(ours, height, width)
        args = [tvm.runtime.tensor(a, ours.device) for a in inputs]
        patches, grid_thw = torch.from_numpy(inputs[0]), torch.tensor([grid])

        def reference():
            with torch.inference_mode():
                return model(patches, grid_thw=grid_thw).pooler_output

        contenders = {"tvm": lambda: ours.encode(*args, ours.params), "eager": reference}
        cos = cosine(contenders["tvm"]().numpy(), reference().numpy())
        ms = interleaved_medians_ms(contenders, runs)
        rows.append(NativeRow(
            model=preset, image=f"{height}x{width}", patches=len(inputs[0]), tokens=len(inputs[0]) // config.spatial_merge_size**2,
            tvm_ms=round(ms["tvm"], 2), torch_eager_ms=round(ms["eager"], 2), ratio_eager=_ratio(ms["tvm"], ms["eager"]),
            cosine_vs_torch=round(cos, 6), compile_s=round(ours.compile_s, 1),
        ))  # fmt: skip
        r = rows[-1]
        print(f"{preset:<28} {r.image:>9} ({r.tokens} tokens) ours fp32 {r.tvm_ms:9.1f} ms | eager {r.torch_eager_ms:9.1f} "
              f"| ours/eager {r.ratio_eager:.2f} | cos {r.cosine_vs_torch:.6f}", flush=True)  # fmt: skip
        if on_row is not None:
            on_row(r)
    return rows


def load_library_params_into(model, library: "OurLibrary") -> None:
    """Give the torch tower our library's random params (checkpoint names; the merger's fc1/fc2 are mlp.0/mlp.2)."""
    import torch

    ours = {p["name"]: value for p, value in zip(library.metadata["params"], library.fp32_params)}
    state = {}
    for name in model.state_dict():
        key = name.replace("merger.mlp.0.", "merger.fc1.").replace("merger.mlp.2.", "merger.fc2.")
        state[name] = torch.from_numpy(ours[key])
    model.load_state_dict(state)


def native_markdown(rows: list[NativeRow], machine: dict, runs: int) -> str:
    lines = [
        bench_peers.machine_header(machine),
        "",
        "| model | image | patches | tokens | ours fp32 ms | transformers eager ms | ours / eager | cosine | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.model} | {r.image} | {r.patches} | {r.tokens} | {r.tvm_ms:.1f} | {r.torch_eager_ms:.1f} "
                     f"| {r.ratio_eager:.2f} | {r.cosine_vs_torch:.6f} | {r.compile_s:.0f} |")  # fmt: skip
    lines += ["", f"Batch 1, median of {runs} runs after warm-up, in alternation; same random weights in both."]
    return "\n".join(lines) + "\n"


# ---- InternVL dynamic tiles -------------------------------------------------------------


@dataclass
class TiledRow:
    model: str
    image: str  # height x width in pixels of the image that is cut
    grid: str  # rows x cols
    tiles: int  # the tower's batch: the grid's tiles and the thumbnail
    tokens: int
    tvm_ms: float  # the whole VisionEncoder.encode_tiles: cut, resize, normalize, the tower on every tile
    torch_eager_ms: float  # transformers' InternVLVisionModel on the same tiles (already cut and normalized)
    ratio_eager: float
    compile_s: float


def tile_grid(count: int) -> tuple[int, int]:
    """The squarest ``rows x cols`` grid of ``count`` tiles with rows <= cols: 6 -> (2, 3)."""
    rows = max(r for r in range(1, int(count**0.5) + 1) if count % r == 0)
    return rows, count // rows


def write_random_params(library: OurLibrary, output: Path) -> Path:
    """The library's random fp32 params as a params dir a :class:`VisionEncoder` loads."""
    from .weights.params import write_params

    names = [p["name"] for p in library.metadata["params"]]
    meta = {"mlc_vision": {"family": library.metadata["family"], "config": library.metadata["config"]}}
    return write_params(output, zip(names, library.fp32_params), meta)


def bench_tiles(preset: str, count: int, runs: int, workdir: Path, on_row=None) -> TiledRow:
    """One image cut into ``count`` tiles (+ thumbnail): our ``encode_tiles`` against transformers on those tiles.

    Ours is timed end to end (the runtime's tiling and preprocessing included);
    transformers gets the tiles already cut and normalized. Random weights on
    each side (speed does not depend on them).
    """
    import torch

    from .runtime.encoder import VisionEncoder
    from .runtime.preprocess import normalize
    from .runtime.tiling import Grid, internvl_tiles
    from .testing.references import torch_model

    config = load_preset(preset)
    ours = OurLibrary(config, workdir)
    encoder = VisionEncoder(ours.lib_path, write_random_params(ours, workdir / f"{preset}-params"))
    rows, cols = tile_grid(count)
    size = config.image_size
    rgb = np.random.default_rng(0).integers(0, 256, (rows * size, cols * size, 3), dtype=np.uint8)
    pre = config.preprocess
    cut = internvl_tiles(rgb, size, pre, min_tiles=count, max_tiles=count, thumbnail=config.tiling.thumbnail,
                         grid=Grid(rows, cols))  # fmt: skip
    pixels = torch.from_numpy(np.stack([normalize(tile, pre, pre.backend) for tile in cut.tiles]))
    torch.set_num_threads(os.cpu_count() or 1)
    model = torch_model(config).eval()

    def reference():
        with torch.inference_mode():
            model(pixels)

    contenders = {"tvm": lambda: encoder.encode_tiles(rgb, grid=(rows, cols)), "eager": reference}
    features = contenders["tvm"]().features
    assert features.shape[0] == len(cut.tiles), "encode_tiles and the bench cut different tiles"
    ms = interleaved_medians_ms(contenders, runs)
    row = TiledRow(
        model=preset, image=f"{rgb.shape[0]}x{rgb.shape[1]}", grid=f"{rows}x{cols}", tiles=len(cut.tiles),
        tokens=features.shape[0] * features.shape[1], tvm_ms=round(ms["tvm"], 2), torch_eager_ms=round(ms["eager"], 2),
        ratio_eager=_ratio(ms["tvm"], ms["eager"]), compile_s=round(ours.compile_s, 1),
    )  # fmt: skip
    print(f"{preset:<28} {row.tiles} tiles ({row.grid} + thumbnail) ours encode_tiles {row.tvm_ms:9.1f} ms | "
          f"eager {row.torch_eager_ms:9.1f} | ours/eager {row.ratio_eager:.2f}", flush=True)  # fmt: skip
    if on_row is not None:
        on_row(row)
    return row


def tiles_markdown(rows: list[TiledRow], machine: dict, runs: int) -> str:
    lines = [
        bench_peers.machine_header(machine),
        "",
        "| model | image | grid | tiles | tokens | ours encode_tiles ms | transformers eager ms | ours / eager | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.model} | {r.image} | {r.grid} | {r.tiles} | {r.tokens} | {r.tvm_ms:.1f} "
                     f"| {r.torch_eager_ms:.1f} | {r.ratio_eager:.2f} | {r.compile_s:.0f} |")  # fmt: skip
    lines += ["", f"One image, median of {runs} runs after warm-up, in alternation; random weights. Ours: the whole "
              "`encode_tiles` (grid cut, resize, normalize, the tower on every tile in one call); transformers: "
              "`InternVLVisionModel` on the same tiles, already cut and normalized."]  # fmt: skip
    return "\n".join(lines) + "\n"
