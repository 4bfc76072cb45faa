"""Compile a Relax IRModule for a target and export it atomically (library + ``<lib>.json``).

``build_library`` is the one entry: it checks the target and the output name
before the (possibly minutes long) compile, runs ``compiler/pipeline.py``'s
phases for the target and the attention lowering the metadata records, and
writes the library and its metadata JSON under temporary names first and
moves both into place under one journal (``mlc_vision/atomic.py``), so a
failed or killed build never replaces a good library nor splits it from its JSON. CUDA libraries embed an nvcc
fatbin (``cuda_fatbin.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from .. import atomic
from ..errors import MlcVisionError
from . import targets as _targets
from .kernels import cpu_bf16_gemm, cpu_f32_gemm, cpu_segment_attention
from .kernels.c_objects import object_cache_dir
from .cuda_fatbin import nvcc_compile_callback, pack_imports_with_fatbin, walk_modules

logger = logging.getLogger(__name__)

#: Device module kinds whose source :func:`generated_source` returns.
DEVICE_MODULE_KINDS = ("cuda", "metal", "opencl", "webgpu", "vulkan")


def compile_module(mod, target_name: str, *, attention: str, gemm: str = "dlight", arch=None, host=None,
                   cpu: dict | None = None, prepack: bool = False):
    """Compile ``mod`` for ``target_name`` with the given attention lowering and matmul schedule; returns TVM's executable.

    ``cpu``: the :func:`targets.cpu_spec` of a ``cpu`` build (None: this machine). With a ``cpu``
    spec that has AVX-512F or AVX2 + FMA the fp32 linear layers call the C GEMM (``kernels/cpu_f32_gemm.c``):
    the executable must then be exported with it linked in (:func:`export_executable` does).
    ``prepack``: the entries get ``_prepacked`` twins and ``prepack_params`` (``metadata["prepack"]``,
    :func:`module.prepack_metadata`).
    """
    import tvm

    from .pipeline import relax_pipeline
    from .schedules.gpu import preload_tensor_intrinsics
    from .schedules.gpu_mma import mma_pass_config

    target = _targets.make_target(target_name, arch=arch, host=host, cpu=cpu)
    if target_name != "cpu":
        preload_tensor_intrinsics()
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if target_name == "cuda":
            stack.enter_context(nvcc_compile_callback(_targets.parse_cuda_archs(arch)))
        if gemm == "mma":
            # on top of the caller's config (e.g. relax.backend.use_cuda_graph), not instead of it
            current = tvm.transform.PassContext.current()
            config = {**{str(k): v for k, v in current.config.items()}, **mma_pass_config()}
            stack.enter_context(tvm.transform.PassContext(opt_level=current.opt_level, config=config))
        f32_gemm = cpu_f32_gemm.uses_f32_kernel(target_name, (cpu or {}).get("features"))
        pipeline = relax_pipeline(target_name, target, attention, gemm, f32_gemm=f32_gemm, prepack=prepack and f32_gemm)
        executable = tvm.compile(mod, target, relax_pipeline=pipeline)
    logger.info("compiled for %s in %.1f s", target_name, time.perf_counter() - start)
    return executable


def check_output_suffix(target_name: str, output: Path) -> None:
    """Refuse an output name whose suffix does not match what the target produces."""
    suffixes = _targets.output_suffixes(target_name)
    if not any(str(output).endswith(s) for s in suffixes):
        what = {
            "metal": "a .tar of Mach-O objects to link into your macOS/iOS app",
            "webgpu": "a .tar of wasm objects to link with emcc and TVM's web runtime",
        }.get(target_name, "a shared library")
        raise MlcVisionError(
            f"output {str(output)!r} does not match target {target_name!r}: "
            f"use {' or '.join(suffixes)} ({what})"
        )


def sidecar_path(output: Path) -> Path:
    """``<lib>.json``, the metadata written beside a library."""
    return output.with_name(output.name + ".json")


def check_output(target_name: str, output: Path) -> Path:
    """Refuse a bad output before compiling: wrong suffix, a directory, unwritable; clean dead runs' leftovers."""
    output = Path(output)
    check_output_suffix(target_name, output)
    atomic.check_writable(output, what="output")
    atomic.check_writable(sidecar_path(output), what="output")
    atomic.recover(output)
    atomic.recover(sidecar_path(output))
    return output


def export_executable(executable, target_name: str, output: Path, *, arch=None, metadata: dict) -> Path:
    """Export ``executable`` to ``output`` (and ``<output>.json``) atomically.

    Both are written to temporary names beside the destination and renamed
    into place only when complete: a failed export leaves no file at
    ``output`` (an earlier library there stays as it was).
    """
    output = check_output(target_name, Path(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if target_name == "cuda":
        kwargs["fpack_imports"] = pack_imports_with_fatbin(_targets.parse_cuda_archs(arch))
    lib_tmp = atomic.temp_path(output, keep_suffix=True)
    json_tmp = atomic.temp_path(sidecar_path(output))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            objects = object_cache_dir() or Path(scratch)
            addons = [str(kernel.compile_object(objects)) for kernel in c_kernels(target_name, metadata)]
            if addons:
                kwargs["addons"] = addons
            executable.export_library(str(lib_tmp), **kwargs)
        atomic.die_point("writing")
        json_tmp.write_text(json.dumps(metadata, indent=2) + "\n")
        for tmp in (lib_tmp, json_tmp):
            _fsync(tmp)
        atomic.commit([atomic.Move(lib_tmp, output), atomic.Move(json_tmp, sidecar_path(output))])
    finally:
        lib_tmp.unlink(missing_ok=True)
        json_tmp.unlink(missing_ok=True)
    return output


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def needs_bf16_kernel(target_name: str, metadata: dict) -> bool:
    """bf16 CPU libraries call the C GEMM of ``kernels/cpu_bf16_gemm.c``, linked into the library,
    unless their CPU computes their bf16 weights in fp32 (``cpu_bf16_gemm.uses_bf16_kernel``)."""
    features = (metadata.get("cpu") or {}).get("features")
    return target_name == "cpu" and metadata.get("dtype") == "bfloat16" and cpu_bf16_gemm.uses_bf16_kernel(features)


def needs_segment_attention_kernel(target_name: str, metadata: dict) -> bool:
    """Native-resolution CPU libraries call the C kernel of ``kernels/cpu_segment_attention.c``."""
    return target_name == "cpu" and bool(metadata.get("native_resolution"))


def needs_f32_kernel(target_name: str, metadata: dict) -> bool:
    """CPU libraries for a CPU with AVX-512F or AVX2 + FMA call the fp32 C GEMM of ``kernels/cpu_f32_gemm.c``."""
    return cpu_f32_gemm.uses_f32_kernel(target_name, (metadata.get("cpu") or {}).get("features"))


def c_kernels(target_name: str, metadata: dict) -> list:
    """The C kernel modules (each with ``compile_object``) a library links in."""
    needed = (
        (needs_bf16_kernel, cpu_bf16_gemm),
        (needs_f32_kernel, cpu_f32_gemm),
        (needs_segment_attention_kernel, cpu_segment_attention),
    )
    return [kernel for needs, kernel in needed if needs(target_name, metadata)]


def build_library(mod, target_name: str, output: Path, *, arch=None, host=None, metadata: dict) -> Path:
    """Compile ``mod`` for ``target_name`` and export it to ``output`` (+ ``<output>.json``).

    The attention lowering and the matmul schedule are the ones
    ``metadata["attention"]`` and ``metadata["gemm"]`` record
    (``module.build_module`` resolved them for this target and dtype), and so
    is the CPU (``metadata["cpu"]``).
    """
    _targets.check_buildable(target_name)
    output = check_output(target_name, Path(output))  # before minutes of compiling
    attention = _targets.resolve_attention(target_name, metadata["dtype"], metadata.get("attention"))
    cpu = metadata.get("cpu") if target_name == "cpu" else None
    if cpu is not None:
        _targets.check_cpu_linkable(cpu)
    gemm = _targets.resolve_gemm(target_name, metadata["dtype"], metadata.get("gemm"))
    prepack = metadata.get("prepack") is not None
    executable = compile_module(mod, target_name, attention=attention, gemm=gemm, arch=arch, host=host, cpu=cpu,
                                prepack=prepack)  # fmt: skip
    return export_executable(executable, target_name, output, arch=arch, metadata=metadata)


def generated_source(lib_or_executable) -> str:
    """The device source (CUDA C, Metal, OpenCL C, WGSL) in a built library, for inspection.

    Takes a compiled executable or a loaded module. A CUDA library loaded
    back from disk holds only its fatbin, so inspect the executable instead.
    """
    root = getattr(lib_or_executable, "mod", lib_or_executable)
    sources = []
    for module in walk_modules(root):
        if module.kind in DEVICE_MODULE_KINDS:
            text = module.inspect_source(module.kind) or module.inspect_source("")
            if text:
                sources.append(text)
    if not sources:
        raise MlcVisionError("no device source in this library (CPU library, or a CUDA library loaded from disk)")
    return "\n".join(sources)
