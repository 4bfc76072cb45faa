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
frequency, fp32 peak).
"""

from __future__ import annotations

import importlib.util
import os
import platform
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


def onnxruntime_session(path: Path):
    """An fp32 ONNX Runtime session on the CPU with one thread per core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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

#: fp32 FLOP per cycle and core by (vendor, CPU family) where the vector width
#: alone does not say it: Zen 4 runs 512-bit FMAs on its two 256-bit pipes
#: (32), Zen 5 has two 512-bit FMA pipes (64).
FLOPS_PER_CYCLE_BY_FAMILY = {("AuthenticAMD", 25): 32, ("AuthenticAMD", 26): 64}
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


def machine_info() -> dict:
    """CPU model, ISA, frequency, cores and the fp32 peak (cores x GHz x FLOP/cycle)."""
    info = _cpuinfo_fields()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    vendor = info.get("vendor_id", "")
    family = int(info.get("cpu family", "0") or 0)
    cores = os.cpu_count() or 1
    ghz = float(info.get("cpu MHz", "0") or 0) / 1000 or 2.5
    per_cycle = FLOPS_PER_CYCLE_BY_FAMILY.get((vendor, family))
    if per_cycle is None:
        per_cycle = next((n for flag, n in FLOPS_PER_CYCLE_BY_ISA if flag in flags), 8)
    model = info.get("model name") or platform.processor() or platform.machine()
    return {
        "cpu": f"{model} ({vendor} family {family} model {info.get('model', '?')})" if vendor else model,
        "isa": [f for f in HEADER_ISA if f in flags],
        "ghz": round(ghz, 2),
        "cores": cores,
        "fp32_flops_per_cycle": per_cycle,
        "fp32_peak_gflops": round(cores * ghz * per_cycle, 1),
    }


def machine_header(machine: dict) -> str:
    """One line for the top of every table."""
    return (
        f"CPU: {machine['cpu']}; ISA: {', '.join(machine['isa']) or 'baseline'}; {machine['cores']} cores at "
        f"{machine['ghz']:.2f} GHz (/proc/cpuinfo); fp32 peak {machine['fp32_peak_gflops']:.0f} GFLOP/s = "
        f"{machine['cores']} x {machine['ghz']:.2f} GHz x {machine['fp32_flops_per_cycle']} FLOP/cycle"
    )
