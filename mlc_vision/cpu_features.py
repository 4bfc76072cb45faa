"""Does this CPU have the instructions a CPU library was compiled for?

A CPU library is machine code for the CPU named at compile time (``mlc-vision
compile --cpu``, default: the compiling machine). On a CPU without one of its
instruction sets it would die of SIGILL in the middle of a call; instead the
runtime compares the library's ``metadata["cpu"]["features"]`` (LLVM's feature
names) with this CPU's flags and refuses in one line.

No TVM here (the runtime must load with a runtime-only TVM): the flags come
from ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on Arm). Where that
file does not exist (macOS, Windows) nothing is refused.
"""

from __future__ import annotations

import platform
from pathlib import Path

from .errors import MlcVisionError

#: LLVM feature name -> the kernel's /proc/cpuinfo flag, for every instruction-set
#: extension a compiled kernel can use. Features not listed are instruction
#: scheduling hints or system instructions that generated code never contains.
LLVM_TO_CPUINFO = {
    # x86
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt",
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "lzcnt": "abm", "movbe": "movbe", "aes": "aes", "pclmul": "pclmulqdq", "sha": "sha_ni", "adx": "adx",
    "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq", "avxvnni": "avx_vnni",
    "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512vnni": "avx512_vnni", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "avx512vp2intersect": "avx512_vp2intersect",
    "amx-tile": "amx_tile", "amx-bf16": "amx_bf16", "amx-int8": "amx_int8", "amx-fp16": "amx_fp16",
    # Arm (AArch64)
    "neon": "asimd", "fullfp16": "fphp", "fp16fml": "asimdfhm", "dotprod": "asimddp", "rdm": "asimdrdm",
    "bf16": "bf16", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2", "sme": "sme", "lse": "atomics",
    "crc": "crc32", "sha2": "sha2", "sha3": "sha3",
}  # fmt: skip

#: ``platform.machine()`` -> the architecture in an LLVM triple.
MACHINE_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def isa_features(llvm_features) -> list[str]:
    """The instruction-set extensions among LLVM feature names, sorted."""
    return sorted(f for f in llvm_features if f in LLVM_TO_CPUINFO)


def host_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """This CPU's flags (x86 ``flags`` / Arm ``Features`` of the first processor); None if unknown."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def triple_arch(triple: str) -> str:
    arch = triple.split("-", 1)[0]
    return "aarch64" if arch in ("arm64", "aarch64") else arch


def missing_features(required, flags: set[str]) -> list[str]:
    """The features in ``required`` (LLVM names) that ``flags`` lacks.

    A name without a cpuinfo spelling in :data:`LLVM_TO_CPUINFO` is looked up as is.
    """
    return [f for f in required if LLVM_TO_CPUINFO.get(f, f) not in flags]


def check_cpu_library(metadata: dict, lib, flags: set[str] | None = None, machine: str | None = None) -> None:
    """Refuse, in one line, a CPU library whose instructions this CPU cannot run."""
    cpu = metadata.get("cpu")
    if metadata.get("target") != "cpu" or not cpu:
        return
    machine = machine or platform.machine()
    here = MACHINE_ARCH.get(machine.lower(), machine.lower())
    built_for = triple_arch(cpu.get("triple", ""))
    if built_for and here and built_for != here:
        raise MlcVisionError(f"library {lib} is {built_for} code (--cpu {cpu.get('mcpu')}); this machine is {here}")
    flags = host_cpu_flags() if flags is None else flags
    if flags is None:
        return
    missing = missing_features(cpu.get("features", []), flags)
    if missing:
        raise MlcVisionError(
            f"library {lib} was compiled for --cpu {cpu.get('mcpu')} and needs {', '.join(missing)}, "
            f"which this CPU lacks; recompile it here (mlc-vision compile picks this CPU by default)"
        )
