"""Target names -> ``tvm.target.Target``, and what this installation can build.

Users name a target (``cpu``, ``cuda``, ``vulkan``, ``metal``, ``opencl``,
``webgpu``); this module turns the name (plus ``--arch`` / ``--host``) into a
TVM target and says, honestly and in one line, when the installed TVM cannot
build it. The probes look at the codegen functions that the TVM library
actually registered (``target.build.<kind>``), not at TVM's version, because
the same version is shipped with different backends switched on (the PyPI
wheel has CUDA, Metal, OpenCL and WebGPU codegen but no Vulkan/SPIR-V).

Choices made here (see docs/targets.md):

* ``cpu`` is the machine we compile on (``Target.from_device("cpu")``, which
  fills in ``mcpu``); a CPU library is for this machine or one like it.
* GPU targets use a *generic* host (``{"kind": "llvm"}`` for the compiling
  machine's triple, no ``mcpu``): the host code only launches kernels, and a
  library built on a new CPU must still load on an older one.
* ``cuda`` generates code for the *lowest* requested arch (so the source is
  valid for every arch in the list) and the export embeds an nvcc fatbin with
  SASS for every requested arch plus PTX of the highest one (forward
  compatibility with GPUs newer than the list).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from mlc_vision.errors import MlcVisionError

TARGETS = ("cpu", "cuda", "vulkan", "metal", "opencl", "webgpu")

#: Ampere (A100, RTX 30xx) and Hopper (H100/H200). Ada (sm_89) runs sm_80 SASS.
DEFAULT_CUDA_ARCHS = ("sm_80", "sm_90")

METAL_HOSTS = {"macos": "arm64-apple-macos", "ios": "arm64-apple-ios"}

WASM_TRIPLE = "wasm32-unknown-unknown-wasm"


#: Every attention lowering a library can be built with (``--attention``).
ATTENTION = ("split", "fused", "tensorcore", "flash")
#: The lowerings each target builds, its default first (targets not listed: ``split`` only).
#: ``fused`` is a kernel of ours (CPU: fp32, or bf16 products in a bf16 library); ``tensorcore`` is CUDA's split
#: with both attention matmuls on tensor cores; ``flash`` is our tensor-core
#: flash-attention kernel (CUDA, fp16/bf16; see compiler/pipeline.py).
ATTENTION_BY_TARGET = {
    "cpu": ("fused", "split"),
    "cuda": ("split", "fused", "tensorcore", "flash"),
}
#: How CUDA fp16 matmuls are scheduled (``--gemm``), the default first: ``dlight``
#: (dlight's WMMA rule) or ``mma`` (``schedules/gpu_mma.py``: ``mma.sync`` with
#: ldmatrix, a cp.async pipeline and swizzled shared memory). Other targets: ``dlight``.
GEMM = ("dlight", "mma")
GEMM_BY_TARGET = {"cuda": GEMM}

#: Lowerings that only exist for some dtypes: (target, lowering) -> the dtypes that have it.
ATTENTION_DTYPES = {
    ("cpu", "fused"): ("float32", "bfloat16"),  # bf16 CPU libraries: bf16 products, fp32 softmax
    ("cuda", "flash"): ("float16", "bfloat16"),
}


@dataclass(frozen=True)
class TargetInfo:
    """What building one target gives on this installation."""

    name: str
    buildable: bool
    reason: str
    output_suffix: str

    def __iter__(self):
        # Lets callers unpack ``for name, ok, why, suffix in availability()``.
        return iter((self.name, self.buildable, self.reason, self.output_suffix))


# ---------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------


def _has_global_func(name: str) -> bool:
    """True when the TVM library registered the FFI function ``name``."""
    import tvm  # noqa: F401  (importing tvm registers its functions)
    import tvm_ffi

    return tvm_ffi.get_global_func(name, allow_missing=True) is not None


def _llvm_backends() -> set[str]:
    """LLVM backends compiled into TVM's LLVM (``x86_64``, ``aarch64``, ``wasm32``...)."""
    import tvm  # noqa: F401
    import tvm_ffi

    get_targets = tvm_ffi.get_global_func("target.llvm_get_targets", allow_missing=True)
    return set(get_targets()) if get_targets is not None else set()


def find_nvcc() -> str | None:
    """Path of nvcc: ``$CUDA_HOME/bin/nvcc``, ``$CUDA_PATH/bin/nvcc``, then ``PATH``."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return shutil.which("nvcc")


def output_suffixes(name: str) -> tuple[str, ...]:
    """File suffixes a library for ``name`` may have (the first is the default)."""
    if name == "metal":
        # Objects to link on a Mac; a .dylib needs Apple's linker (only on macOS).
        return (".tar", ".dylib") if sys.platform == "darwin" else (".tar",)
    if name == "webgpu":
        # wasm objects; a .wasm needs emcc and TVM's web runtime (tvmjs).
        return (".tar",)
    return (".so",)


def _probe(name: str) -> tuple[bool, str]:
    """(buildable, reason) for one target on this installation."""
    if not _has_global_func("target.build.llvm"):
        return False, "this TVM build has no LLVM codegen (USE_LLVM=OFF); install apache-tvm from PyPI"
    if name == "cpu":
        return True, "LLVM for this machine's CPU; a shared library (.so)"
    if name == "cuda":
        if not _has_global_func("target.build.cuda"):
            return False, "this TVM build has no CUDA codegen; install a TVM built with USE_CUDA=ON (the PyPI apache-tvm wheel has it)"
        if find_nvcc() is None:
            return False, "nvcc not found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin, PATH); install the CUDA toolkit to embed compiled kernels"
        return True, "a .so with an nvcc fatbin embedded (no CUDA compiler needed at load time)"
    if name == "vulkan":
        if not _has_global_func("target.build.vulkan"):
            return False, (
                "this TVM build has no Vulkan (SPIR-V) codegen; install a TVM built with "
                "USE_VULKAN=ON (e.g. the mlc-ai nightly wheels or a source build), the PyPI wheel lacks it"
            )
        return True, "a .so with SPIR-V shaders embedded"
    if name == "metal":
        if not _has_global_func("target.build.metal"):
            return False, "this TVM build has no Metal codegen; install a TVM built with USE_METAL=ON"
        if "aarch64" not in _llvm_backends():
            return False, "TVM's LLVM has no AArch64 backend to compile the arm64 host code for macOS/iOS"
        return True, "a .tar of Mach-O arm64 objects with the Metal source embedded (compiled on the device at load); link on a Mac"
    if name == "opencl":
        if not _has_global_func("target.build.opencl"):
            return False, "this TVM build has no OpenCL codegen; install a TVM built with USE_OPENCL=ON"
        return True, "a .so with OpenCL C source embedded (compiled by the OpenCL driver at load)"
    if name == "webgpu":
        if not _has_global_func("target.build.webgpu"):
            return False, "this TVM build has no WebGPU codegen; install a TVM built with WebGPU support"
        if "wasm32" not in _llvm_backends():
            return False, "TVM's LLVM has no WebAssembly backend for the wasm32 host code"
        return True, "a .tar of wasm32 objects with WGSL shaders embedded; link with emcc and TVM's web runtime"
    raise unknown_target(name)


def unknown_target(name: str) -> MlcVisionError:
    """The one-line error for a target name we do not know."""
    return MlcVisionError(f"unknown target {name!r}; valid targets: {', '.join(TARGETS)}")


def availability() -> list[TargetInfo]:
    """Every target with whether this installation can build it, why, and its output suffix."""
    result = []
    for name in TARGETS:
        ok, reason = _probe(name)
        result.append(TargetInfo(name, ok, reason, output_suffixes(name)[0]))
    return result


def check_buildable(name: str) -> None:
    """Raise a one-line :class:`MlcVisionError` when ``name`` cannot be built here."""
    if name not in TARGETS:
        raise unknown_target(name)
    ok, reason = _probe(name)
    if not ok:
        raise MlcVisionError(f"cannot build target {name!r}: {reason}")


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def parse_cuda_archs(arch: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"sm_80,sm_90"`` / ``"80,90"`` / ``["sm_80"]`` -> ``["sm_80", "sm_90"]`` (sorted, unique)."""
    if arch is None:
        return list(DEFAULT_CUDA_ARCHS)
    items = arch.split(",") if isinstance(arch, str) else list(arch)
    archs = set()
    for item in items:
        item = item.strip()
        if not item:
            continue
        match = re.fullmatch(r"(?:sm_|compute_)?(\d{2,3})([af]?)", item)
        if match is None:
            raise MlcVisionError(
                f"invalid CUDA arch {item!r}; use compute capabilities like 'sm_80,sm_90' or '80,90'"
            )
        if int(match.group(1)) < 70:
            raise MlcVisionError(f"CUDA arch {item!r} is too old; mlc-vision needs sm_70 (Volta) or newer")
        archs.add(f"sm_{match.group(1)}{match.group(2)}")
    if not archs:
        raise MlcVisionError(f"empty CUDA arch list {arch!r}; use e.g. 'sm_80,sm_90'")
    return sorted(archs, key=_arch_number)


def _arch_number(arch: str) -> int:
    return int(re.sub(r"\D", "", arch))


# ---------------------------------------------------------------------------
# CPUs (--cpu)
# ---------------------------------------------------------------------------

#: Triples for ``--cpu`` names of another architecture than the compiling machine's.
ARM_TRIPLE = "aarch64-linux-gnu"
APPLE_TRIPLE = "arm64-apple-macos"


def _llvm(name: str):
    import tvm  # noqa: F401
    import tvm_ffi

    return tvm_ffi.get_global_func(name)


def _cpu_names(triple: str) -> set[str]:
    import tvm

    return set(_llvm("target.llvm_get_cpu_archlist")(tvm.target.Target({"kind": "llvm", "mtriple": triple})))


def _llvm_features(triple: str, mcpu: str) -> set[str]:
    import tvm

    return set(_llvm("target.llvm_get_cpu_features")(tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": mcpu})))


def _triple_for_cpu(cpu: str) -> str:
    """The LLVM triple a ``--cpu`` name compiles for (the host's when it is one of the host's CPUs)."""
    host = str(_llvm("target.llvm_get_system_triple")())
    candidates = [host]
    if not host.startswith(("aarch64", "arm64")):
        candidates.append(APPLE_TRIPLE if cpu.startswith("apple-") else ARM_TRIPLE)
    elif not cpu.startswith("apple-"):
        candidates.append("x86_64-linux-gnu")
    for triple in candidates:
        if cpu in _cpu_names(triple) or (cpu.startswith("apple-") and triple == APPLE_TRIPLE and _llvm_features(triple, cpu)):
            return triple
    examples = "x86-64-v3, x86-64-v4, sapphirerapids, graniterapids, znver4, znver5, neoverse-v2, apple-m2"
    raise MlcVisionError(f"unknown --cpu {cpu!r}; use an LLVM CPU name such as {examples}")


def cpu_spec(cpu: str | None = None) -> dict:
    """What a CPU library is compiled for: ``{"mcpu", "triple", "mattr", "features"}``.

    ``cpu=None`` is this machine: its CPU name, minus any instruction set the
    name implies but this (often virtual) CPU does not report. ``features``
    lists the instruction-set extensions the code may use (LLVM names); the
    runtime refuses the library on a CPU that lacks one
    (``cpu_features.py``).
    """
    from ..cpu_features import isa_features

    if cpu is None:
        triple = str(_llvm("target.llvm_get_system_triple")())
        mcpu = str(_llvm("tvm.codegen.llvm.GetHostCPUName")())
        host = {str(k): bool(v) for k, v in _llvm("tvm.codegen.llvm.GetHostCPUFeatures")().items()}
        implied = _llvm_features(triple, mcpu)
        absent = isa_features(f for f in implied if not host.get(f, True))
        mattr = [f"-{f}" for f in absent]
        features = [f for f in isa_features(implied) if f not in absent]
    else:
        triple = _triple_for_cpu(cpu)
        mcpu, mattr = cpu, []
        features = isa_features(_llvm_features(triple, cpu))
    return {"mcpu": mcpu, "triple": triple, "mattr": mattr, "features": features}


def check_cpu_linkable(spec: dict) -> None:
    """Refuse a ``--cpu`` of another architecture: the library is linked by this machine's C compiler."""
    from ..cpu_features import triple_arch

    host = triple_arch(str(_llvm("target.llvm_get_system_triple")()))
    if triple_arch(spec["triple"]) != host:
        raise MlcVisionError(
            f"--cpu {spec['mcpu']} is {triple_arch(spec['triple'])} and this machine links {host} libraries; "
            f"compile on a {triple_arch(spec['triple'])} machine"
        )


def cpu_target(spec: dict):
    """The llvm ``Target`` of a :func:`cpu_spec`."""
    import tvm

    config = {"kind": "llvm", "mtriple": spec["triple"], "mcpu": spec["mcpu"]}
    if spec.get("mattr"):
        config["mattr"] = list(spec["mattr"])
    return tvm.target.Target(config)


def make_target(name: str, arch=None, host: str | None = None, cpu: dict | None = None):
    """The ``tvm.target.Target`` for target ``name``.

    ``arch`` is only for ``cuda`` (a list of compute capabilities; the target
    carries the lowest, the fatbin covers all of them). ``host`` is only for
    ``metal``: ``macos`` (default) or ``ios``. ``cpu`` (a :func:`cpu_spec`) is
    only for ``cpu``; None: this machine's CPU.
    """
    import tvm

    check_buildable(name)
    if arch is not None and name != "cuda":
        raise MlcVisionError(f"--arch is only for the cuda target, not {name!r}")
    if host is not None and name != "metal":
        raise MlcVisionError(f"--host is only for the metal target (macos or ios), not {name!r}")
    if cpu is not None and name != "cpu":
        raise MlcVisionError(f"--cpu is only for the cpu target, not {name!r}")

    generic_host = {"kind": "llvm"}
    if name == "cpu":
        return cpu_target(cpu or cpu_spec())
    if name == "cuda":
        archs = parse_cuda_archs(arch)
        return tvm.target.Target({"kind": "cuda", "arch": archs[0]}, host=generic_host)
    if name == "metal":
        host = host or "macos"
        if host not in METAL_HOSTS:
            raise MlcVisionError(f"unknown --host {host!r} for metal; use one of: {', '.join(METAL_HOSTS)}")
        return tvm.target.Target({"kind": "metal"}, host={"kind": "llvm", "mtriple": METAL_HOSTS[host]})
    if name == "webgpu":
        # A wasm host makes TVM emit a system library (no dlopen in the browser).
        return tvm.target.Target({"kind": "webgpu"}, host={"kind": "llvm", "mtriple": WASM_TRIPLE})
    # vulkan, opencl
    return tvm.target.Target({"kind": name}, host=generic_host)


def resolve_gemm(name: str, dtype: str, gemm: str | None) -> str:
    """The matmul schedule a library for target ``name`` in ``dtype`` gets (``None``: the default).

    ``mma`` is for CUDA fp16 only (TVM's ldmatrix intrinsics are fp16); asking
    for it elsewhere is a one-line error.
    """
    modes = GEMM_BY_TARGET.get(name, ("dlight",)) if dtype == "float16" else ("dlight",)
    if gemm is None:
        return modes[0]
    if gemm not in GEMM:
        raise MlcVisionError(f"unknown gemm schedule {gemm!r}; choose one of {', '.join(GEMM)}")
    if gemm not in modes:
        raise MlcVisionError(f"gemm {gemm!r} is not available for target {name!r} in {dtype}; choose {' or '.join(modes)}")
    return gemm


def attention_modes(name: str, dtype: str) -> tuple[str, ...]:
    """The attention lowerings target ``name`` builds in ``dtype``, its default first."""
    return tuple(
        mode for mode in ATTENTION_BY_TARGET.get(name, ("split",)) if dtype in ATTENTION_DTYPES.get((name, mode), (dtype,))
    )


def resolve_attention(name: str, dtype: str, attention: str | None) -> str:
    """The attention lowering a library for target ``name`` in ``dtype`` gets (``None``: the default).

    An unknown mode, or one this target (or dtype) cannot build, is a one-line error.
    """
    modes = attention_modes(name, dtype)
    if attention is None:
        return modes[0]
    if attention not in ATTENTION:
        raise MlcVisionError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION)}")
    if attention not in modes:
        raise MlcVisionError(
            f"attention {attention!r} is not available for target {name!r} in {dtype}; "
            f"choose {' or '.join(modes)}"
        )
    return attention
