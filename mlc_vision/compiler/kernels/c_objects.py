"""C kernels of CPU libraries: compiled with the host C compiler when a library is exported.

Each kernel is one C file beside its Python module (``cpu_bf16_gemm.c``,
``cpu_f32_gemm.c``, ``cpu_segment_attention.c``); what they share is in headers
beside them: the declarations of TVM's thread pool (``tvm_thread_pool.h``) and
the helpers of the GEMM and attention kernels (``cpu_kernels.h``). The object
is linked into the exported library (``export_library(addons=[object])``),
which then needs nothing besides TVM's runtime at load time. The PrimFuncs that
call a kernel (``T.call_extern``) share the small TIR pieces at the end.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ...errors import MlcVisionError

FLAGS = ("-O3", "-fPIC", "-std=gnu11", "-c")


def find_c_compiler() -> str | None:
    """``$CC``, else cc, gcc or clang from the PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def c_compiler() -> str:
    """:func:`find_c_compiler`, with a one-line error when there is none."""
    cc = find_c_compiler()
    if cc is None:
        raise MlcVisionError(
            "this CPU library links a C kernel (bf16 GEMM, segmented attention): it needs a C compiler "
            "(cc, gcc or clang; or set $CC)"
        )
    return cc


def compile_c(source: Path, workdir: Path, what: str) -> Path:
    """Compile ``source`` to a position-independent object in ``workdir`` (reused while source and compiler are unchanged)."""
    cc = c_compiler()
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # included beside the source
    digest = hashlib.sha1(source.read_bytes() + headers + " ".join([cc, *FLAGS]).encode()).hexdigest()[:12]
    obj = Path(workdir) / f"{source.stem}-{digest}.o"
    if not obj.exists():
        tmp = obj.with_name(obj.name + f".{os.getpid()}.tmp")
        result = subprocess.run([cc, *FLAGS, str(source), "-o", str(tmp)], capture_output=True, text=True)
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["no output"])[0]
            raise MlcVisionError(f"compiling {what} with {cc} failed: {first}")
        os.replace(tmp, obj)
    return obj


def flat_rows(lead):
    """The rows of a kernel's x: the product of its leading axes (``tirx.Var``s, may be symbolic), int64."""
    from tvm import tirx

    rows = tirx.const(1, "int64")
    for d in lead:
        rows = rows * d
    return rows


def null_pointer():
    """A NULL ``handle`` for a kernel argument that is absent (no bias, no residual)."""
    from tvm import tirx

    return tirx.reinterpret("handle", tirx.const(0, "uint64"))


def raise_unless_zero(status, message: str):
    """The statement that raises ``RuntimeError(message)`` when a kernel's ``status`` is not 0.

    It calls the FFI constructor directly: in TVM 0.27 the Python wrapper passes (kind, condition)
    where the constructor takes (condition, kind)."""
    import tvm
    from tvm import tirx

    return tirx._ffi_api.AssertStmt(  # pylint: disable=protected-access
        status == 0, tvm.ir.StringImm("RuntimeError"), [tvm.ir.StringImm(message)], None
    )
