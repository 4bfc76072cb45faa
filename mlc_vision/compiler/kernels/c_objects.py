"""C kernels of CPU libraries: compiled with the host C compiler when a library is exported.

Each kernel is one C file beside its Python module (``cpu_bf16_gemm.c``,
``cpu_f32_gemm.c``, ``cpu_segment_attention.c``); what they share is in headers
beside them: the declarations of TVM's thread pool (``tvm_thread_pool.h``) and
the helpers of the GEMM and attention kernels (``cpu_kernels.h``). The object
is linked into the exported library (``export_library(addons=[object])``),
which then needs nothing besides TVM's runtime at load time. Objects are kept
between exports in a cache directory (:func:`object_cache_dir`), named by a
digest of the source, its headers, the compiler's version and the flags, so
that a library's export compiles a kernel only the first time. The PrimFuncs that
call a kernel (``T.call_extern``) share the small TIR pieces at the end.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ...errors import MlcVisionError

FLAGS = ("-O3", "-fPIC", "-std=gnu11", "-c")
#: The environment variable naming the directory that keeps compiled kernel objects between exports.
CACHE_ENV = "MLC_VISION_CACHE_DIR"


def object_cache_dir() -> Path | None:
    """Where kernel objects are kept between exports: ``$MLC_VISION_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/mlc-vision`` or ``~/.cache/mlc-vision``, with ``c-objects`` under it; None
    when it cannot be made or written (each export then compiles its kernels afresh)."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlc-vision"
    directory = Path(root) / "c-objects"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError:
        return None
    return directory


@functools.lru_cache(maxsize=None)
def _compiler_version(cc: str) -> str:
    """``cc --version``'s output (part of an object's digest: another compiler, another object)."""
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


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
    compiler = " ".join([cc, _compiler_version(cc), *FLAGS]).encode()
    digest = hashlib.sha1(source.read_bytes() + headers + compiler).hexdigest()[:12]
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
