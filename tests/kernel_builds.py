"""The CPU kernels' C files built alone for the ctypes tests, in two builds:

* ``native``: the object a library links (``compile_object``), which runs the paths this CPU has;
* ``emulated``: the same source with ``-DMLCV_X86_EMULATION`` naming ``x86_emulation.h`` (beside this
  file): its vector intrinsics are portable C (SIMDe, Debian's ``libsimde-dev``, and a model of the
  AMX tiles), and its feature probes report every path, so the AVX-512, AVX2, AVX512-BF16 and AMX
  paths all run on any x86-64 CPU. It checks what those paths compute (packing, tails, masks,
  epilogues) on machines without the instructions; only the native build on such a CPU checks the
  instructions themselves.

Without SIMDe's headers the emulated build skips and says how to install them (``make test`` does
where it can, scripts/install_test_packages.sh).
"""

from __future__ import annotations

import ctypes
import platform
import subprocess
from pathlib import Path

import pytest

from mlc_vision.compiler.kernels.c_objects import FLAGS, c_compiler

BUILDS = ["native", "emulated"]
HERE = Path(__file__).resolve().parent
EMULATION_HEADER = "x86_emulation.h"
SIMDE_PROBE = "#include <simde/x86/avx512.h>\nint main(void) { return 0; }\n"


def _has_simde(workdir: Path) -> bool:
    probe = workdir / "simde_probe.c"
    probe.write_text(SIMDE_PROBE)
    result = subprocess.run([c_compiler(), "-fsyntax-only", str(probe)], capture_output=True)
    return result.returncode == 0


def emulated_object(source: Path, workdir: Path) -> Path:
    """``source`` (a kernel's C file) compiled as the ``emulated`` build; skips where it cannot be."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the emulated build models x86 instructions: an x86-64 host compiles it")
    if not _has_simde(workdir):
        pytest.skip("SIMDe headers absent (apt-get install libsimde-dev): the emulated vector paths did not run")
    obj = workdir / f"{source.stem}-emulated.o"
    # -O1 after the product's -O3: SIMDe's C compiles several times faster so and runs fast enough
    flags = [*FLAGS, "-O1", "-Wno-psabi", f'-DMLCV_X86_EMULATION="{EMULATION_HEADER}"', "-I", str(HERE)]
    result = subprocess.run([c_compiler(), *flags, str(source), "-o", str(obj)], capture_output=True, text=True)
    assert result.returncode == 0, f"the emulated build of {source.name} failed:\n{result.stderr[-3000:]}"
    return obj


def kernel_library(kernel_module, build: str, workdir: Path) -> ctypes.CDLL:
    """``kernel_module``'s C file (``cpu_f32_gemm``, ``cpu_bf16_gemm``, ``cpu_segment_attention``) as a
    shared library in ``build``."""
    if build == "native":
        obj = kernel_module.compile_object(workdir)
    else:
        obj = emulated_object(kernel_module.SOURCE, workdir)
    so = obj.with_suffix(".so")
    subprocess.run([c_compiler(), "-shared", str(obj), "-o", str(so), "-lm"], check=True)
    return ctypes.CDLL(str(so))
