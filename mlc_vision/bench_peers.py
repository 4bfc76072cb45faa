"""The CPU engines ``bench`` times us against besides torch: ONNX Runtime and OpenVINO.

Both run the same ONNX file: the transformers model ``bench`` builds, exported
once per model by ``torch.onnx.export`` (TorchScript exporter, batch axis
dynamic). ONNX Runtime runs it in fp32; OpenVINO twice, with
``INFERENCE_PRECISION_HINT=f32`` and with its default precision for this CPU
(bf16 on CPUs with AVX512-BF16 or AMX). Both get as many threads as the
machine has. They come with the ``bench`` extra (``pip install
mlc-vision[bench]``); without them ``bench`` leaves their columns empty and
says why.

Also here: what the table header says about the machine (CPU model, ISA,
frequency, fp32 peak) and the measured fp32 peak (:func:`measure_fma_peak`).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import platform
import subprocess
import tempfile
import threading
import time
from pathlib import Path

BENCH_EXTRA = ("onnx", "onnxruntime", "openvino")
ONNX_OPSET = 17


def missing_peers() -> list[str]:
    """The ``bench`` extra's packages that are not installed."""
    return [name for name in BENCH_EXTRA if importlib.util.find_spec(name) is None]


def export_onnx(model, pixels, path: Path) -> Path:
    """``model`` (a torch module taking pixel values) to ONNX at ``path``, batch axis dynamic."""
    import warnings

    import torch

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.from_numpy(pixels),), str(path), dynamo=False, opset_version=ONNX_OPSET,
            input_names=["pixel_values"], dynamic_axes={"pixel_values": {0: "batch"}},
        )  # fmt: skip
    return path


def onnxruntime_options():
    """The session options ``bench`` runs ONNX Runtime with: one thread per core, every graph optimization."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def onnxruntime_session(path: Path, options=None):
    """An fp32 ONNX Runtime session on the CPU (``options``: :func:`onnxruntime_options` by default)."""
    import onnxruntime as ort

    options = options if options is not None else onnxruntime_options()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def openvino_model(path: Path, precision: str | None):
    """OpenVINO's CPU plugin compiled at ``precision`` (``f32``) or, for None, its default; and that precision."""
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": os.cpu_count() or 1, "PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    chosen = compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino Type, e.g. bf16
    return compiled, chosen.get_type_name() if hasattr(chosen, "get_type_name") else str(chosen)


def onnxruntime_runner(session, pixels):
    feeds = {"pixel_values": pixels}
    return lambda: session.run(None, feeds)[0]


def openvino_runner(compiled, pixels):
    request = compiled.create_infer_request()
    return lambda: request.infer({"pixel_values": pixels})[0]


# ---- the machine ------------------------------------------------------------------------

#: fp32 FLOP per cycle and core where the vector width alone does not say it, by
#: (vendor, CPU family, first model of the range), the later ranges first: Zen 1
#: and Zen+ (family 23 below model 0x30) have two 128-bit FMA pipes, so a 256-bit
#: FMA takes both (16); Zen 2 has two 256-bit pipes (32); Zen 4 runs 512-bit FMAs
#: on its two 256-bit pipes (32); Zen 5 has two 512-bit FMA pipes (64).
FLOPS_PER_CYCLE_BY_MODEL = (
    (("AuthenticAMD", 23, 0x30), 32),
    (("AuthenticAMD", 23, 0x00), 16),
    (("AuthenticAMD", 25, 0x00), 32),
    (("AuthenticAMD", 26, 0x00), 64),
)
#: Otherwise by the widest FMA: two FMA pipes of that width (AVX-512 server cores, AVX2 cores).
FLOPS_PER_CYCLE_BY_ISA = (("avx512f", 64), ("fma", 32), ("asimd", 16))
#: Flags worth naming in a table header.
HEADER_ISA = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve", "bf16")


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _cpu_flags(info: dict[str, str]) -> set[str]:
    """The instruction-set flags of :func:`_cpuinfo_fields` (x86 ``flags``, Arm ``Features``)."""
    return set((info.get("flags") or info.get("Features") or "").split())


def fp32_flops_per_cycle(vendor: str, family: int, model: int, flags: set[str]) -> int:
    """fp32 FLOP one core retires per cycle at best: by model range, else by the widest FMA."""
    for (known_vendor, known_family, first_model), per_cycle in FLOPS_PER_CYCLE_BY_MODEL:
        if (vendor, family) == (known_vendor, known_family) and model >= first_model:
            return per_cycle
    return next((n for flag, n in FLOPS_PER_CYCLE_BY_ISA if flag in flags), 8)


def machine_info(measure_peak: bool = False) -> dict:
    """CPU model, ISA, frequency, cores and the fp32 peak (cores x GHz x FLOP/cycle).

    ``measure_peak``: also ``measured_fp32_gflops``, what :func:`measure_fma_peak` gets from
    every core (None where it cannot run), and the clock that implies (``measured_ghz``).
    """
    info = _cpuinfo_fields()
    flags = _cpu_flags(info)
    vendor = info.get("vendor_id", "")
    family = int(info.get("cpu family", "0") or 0)
    cores = os.cpu_count() or 1
    ghz = float(info.get("cpu MHz", "0") or 0) / 1000 or 2.5
    per_cycle = fp32_flops_per_cycle(vendor, family, int(info.get("model", "0") or 0), flags)
    model = info.get("model name") or platform.processor() or platform.machine()
    machine = {
        "cpu": f"{model} ({vendor} family {family} model {info.get('model', '?')})" if vendor else model,
        "isa": [f for f in HEADER_ISA if f in flags],
        "ghz": round(ghz, 2),
        "cores": cores,
        "fp32_flops_per_cycle": per_cycle,
        "fp32_peak_gflops": round(cores * ghz * per_cycle, 1),
    }
    if measure_peak:
        measured = measure_fma_peak(flags, cores)
        machine["measured_fp32_gflops"] = round(measured, 1) if measured else None
        machine["measured_ghz"] = round(measured / cores / per_cycle, 2) if measured else None
    return machine


def reference_peak(machine: dict) -> float:
    """The fp32 peak that ``bench``'s "% of fp32 peak" divides by: the measured one where there is one.

    The /proc/cpuinfo clock is the base clock; under turbo a core runs faster, so
    the nominal peak understates what the FMA units do (rows above 100 %).
    """
    return machine.get("measured_fp32_gflops") or machine["fp32_peak_gflops"]


def machine_header(machine: dict) -> str:
    """One line for the top of every table."""
    line = (
        f"CPU: {machine['cpu']}; ISA: {', '.join(machine['isa']) or 'baseline'}; {machine['cores']} cores at "
        f"{machine['ghz']:.2f} GHz (/proc/cpuinfo); fp32 peak {machine['fp32_peak_gflops']:.0f} GFLOP/s = "
        f"{machine['cores']} x {machine['ghz']:.2f} GHz x {machine['fp32_flops_per_cycle']} FLOP/cycle"
    )
    if machine.get("measured_fp32_gflops"):
        line += (
            f"; measured (FMA-only loop on every core) {machine['measured_fp32_gflops']:.0f} GFLOP/s, "
            f"{machine['measured_ghz']:.2f} GHz effective: the peak of the % column where a row's own readings are not higher"
        )
    return line


# ---- the measured fp32 peak -------------------------------------------------------------

#: Independent FMA chains in the probe: more than latency x FMA ports on every x86 core
#: (4-5 cycles x 2 ports), so the loop runs at the FMA units' throughput.
FMA_CHAINS = 12
FMA_PROBE_ITERATIONS = 20_000_000


def _fma_probe_source(register: str) -> str:
    """C with one function, ``fma_loop(n)``: ``n`` x FMA_CHAINS independent FMAs on ``register`` vectors.

    The registers start at zero, so no FMA meets a denormal (which some cores handle in microcode).
    """
    used = [*range(FMA_CHAINS), 14, 15]
    zero = "".join(f'"vxorps %%{register}{i}, %%{register}{i}, %%{register}{i}\\n"' for i in used)
    chains = "".join(f'"vfmadd231ps %%{register}14, %%{register}15, %%{register}{i}\\n"' for i in range(FMA_CHAINS))
    clobbers = ", ".join(f'"xmm{i}"' for i in used)
    return (
        "#include <stdint.h>\n"
        "void fma_loop(int64_t n) {\n"
        f'  __asm__ volatile({zero} "1:\\n" {chains} "dec %0\\n jnz 1b\\n vzeroupper\\n" : "+r"(n) :: "memory", {clobbers});\n'
        "}\n"
    )


def _fma_register(flags: set[str]) -> tuple[str, int] | None:
    """The widest FMA register class of this CPU and its fp32 lanes (None off x86 or without FMA)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if "avx512f" in flags:
        return "zmm", 16
    return ("ymm", 8) if "fma" in flags else None


def build_fma_probe(register: str, workdir: Path) -> Path | None:
    """The probe of :func:`_fma_probe_source` as a shared library in ``workdir`` (None without a C compiler
    or when it does not build)."""
    from .compiler.kernels.c_objects import find_c_compiler

    compiler = find_c_compiler()
    if compiler is None:
        return None
    source, library = Path(workdir) / f"fma_{register}.c", Path(workdir) / f"fma_{register}.so"
    source.write_text(_fma_probe_source(register))
    built = subprocess.run([compiler, "-O2", "-fPIC", "-shared", str(source), "-o", str(library)], capture_output=True)
    return library if built.returncode == 0 else None


def measure_fma_peak(flags: set[str], cores: int) -> float | None:
    """GFLOP/s of an FMA-only loop running on ``cores`` threads at once: the fp32 peak at the real clock.

    Best of three tries (a try where the OS put two threads on one core is slower, never faster).
    None off x86, without FMA, or without a C compiler to build the probe.
    """
    register = _fma_register(flags)
    if register is None:
        return None
    name, lanes = register
    loop = _fma_loop(name)
    if loop is None:
        return None
    flop = cores * FMA_PROBE_ITERATIONS * FMA_CHAINS * lanes * 2
    return max(flop / _run_on_threads(loop, cores) / 1e9 for _ in range(3))


@functools.lru_cache(maxsize=None)
def _fma_loop(register: str):
    """The probe's ``fma_loop`` on ``register`` vectors, built and loaded once per process (``bench``
    reads the probe before and after every row); None where it does not build."""
    with tempfile.TemporaryDirectory(prefix="mlcv-fma-") as tmp:
        library = build_fma_probe(register, Path(tmp))
        if library is None:
            return None
        loop = ctypes.CDLL(str(library)).fma_loop  # stays mapped once the file is gone
    loop.argtypes = [ctypes.c_int64]  # ctypes releases the GIL: the threads run in parallel
    return loop


def probe_now() -> float | None:
    """:func:`measure_fma_peak` on every core, now (None where it cannot run). ``bench`` reads it
    before and after each row: on a shared host the cores' throughput drops while other work runs
    on them (other tenants' threads on the same physical cores), and every engine's time with it."""
    return measure_fma_peak(_cpu_flags(_cpuinfo_fields()), os.cpu_count() or 1)


def _run_on_threads(loop, threads: int) -> float:
    """Wall seconds of ``loop(FMA_PROBE_ITERATIONS)`` on ``threads`` threads started together."""
    workers = [threading.Thread(target=loop, args=(FMA_PROBE_ITERATIONS,)) for _ in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start
