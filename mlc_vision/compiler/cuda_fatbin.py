"""CUDA libraries that load without a CUDA compiler: an nvcc fatbin embedded in the ``.so``.

TVM 0.27 hands CUDA *source* to the runtime by default (compiled at load
through a Python callback). A C++ chat runtime has no Python, so the export
compiles the kernels with nvcc into one fatbin (SASS for every requested
arch, PTX of the highest, for GPUs newer than the list) and rewrites the
packed CUDA module to carry it (:func:`embed_cuda_fatbin`). Where the CUDA
runtime is loaded at build time, TVM compiles through
``tvm_callback_cuda_compile`` instead, and :func:`nvcc_compile_callback`
makes that our nvcc fatbin too.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import tempfile
from pathlib import Path

from ..errors import MlcVisionError
from . import targets as _targets

FATBIN_MAGIC = 0xBA55ED50


def nvcc_fatbin(source: str, archs: list[str]) -> bytes:
    """Compile CUDA source into a fatbin: SASS for each arch, PTX for the highest.

    The flags are those TVM's own nvcc path uses for its generated code
    (half/bf16 operators enabled, fast math); the PTX lets GPUs newer than
    the list JIT the kernels once at load.
    """
    nvcc = _targets.find_nvcc()
    if nvcc is None:
        raise MlcVisionError("nvcc not found; install the CUDA toolkit or set CUDA_HOME")
    gencode = []
    for arch in archs:
        number = arch[len("sm_"):]
        gencode += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
    top = archs[-1][len("sm_"):]
    gencode += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    with tempfile.TemporaryDirectory(prefix="mlc-vision-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(source)
        cmd = [
            nvcc, "--fatbin", "-O3", *gencode,
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
            "--expt-relaxed-constexpr", "--use_fast_math",
            "-o", str(out), str(src),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            # Generated code that nvcc rejects is our bug, not the user's: keep the log.
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stdout}{proc.stderr}")
        return out.read_bytes()


def fatbin_entries(data: bytes) -> list[tuple[str, str]]:
    """``[("sass", "sm_80"), ("ptx", "sm_90"), ...]`` for every fatbin found in ``data``.

    Reads the (undocumented but stable) fatbin container header: magic
    ``0xBA55ED50``, u16 version, u16 header size, u64 payload size; then
    entries of u16 kind (1 PTX, 2 ELF), u16, u32 header size, u64 size, ...,
    u32 arch at offset 28. Used by tests to prove what a library embeds.
    """
    magic = struct.pack("<I", FATBIN_MAGIC)
    found = []
    start = data.find(magic)
    while start >= 0:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, start)
        pos, end = start + header_size, start + header_size + fat_size
        while pos + 32 <= end:
            kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", data, pos)
            arch = struct.unpack_from("<I", data, pos + 28)[0]
            found.append(({1: "ptx", 2: "sass"}.get(kind, str(kind)), f"sm_{arch}"))
            pos += entry_header + entry_size
        start = data.find(magic, max(end, start + 4))
    return found


def _read_u64(blob: bytes, pos: int) -> tuple[int, int]:
    return struct.unpack_from("<Q", blob, pos)[0], pos + 8


def _read_str(blob: bytes, pos: int) -> tuple[bytes, int]:
    size, pos = _read_u64(blob, pos)
    return blob[pos : pos + size], pos + size


def _pack_str(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def embed_cuda_fatbin(blob: bytes, sources: list[str], archs: list[str]) -> bytes:
    """Rewrite the packed import tree so CUDA modules carry a fatbin, not source.

    ``blob`` is TVM's packed-imports format: u64 size, the import tree (two
    u64 vectors), then per module a type key and, unless it is the host
    library (``_lib``), its bytes. A CUDA module's bytes are ``fmt``, the
    function table, then ``code``; with ``fmt == "cuda"`` the code is CUDA
    source (which the runtime would compile through a Python callback). We
    swap in ``fmt = "fatbin"`` and the nvcc fatbin; the runtime loads any
    other fmt with ``cuModuleLoadData``, which accepts fatbins.
    """
    size, pos = _read_u64(blob, 0)
    if size != len(blob) - 8:
        raise RuntimeError("unexpected packed-imports layout (size header)")
    count = 0
    for _ in range(2):  # import tree: row pointers, child indices
        n, pos = _read_u64(blob, pos)
        if _ == 0:
            count = n - 1
        pos += 8 * n
    out = bytearray(blob[8:pos])
    for _ in range(count):
        key, pos = _read_str(blob, pos)
        out += _pack_str(key)
        if key == b"_lib":
            continue
        payload, pos = _read_str(blob, pos)
        if key == b"cuda":
            payload = _cuda_payload_with_fatbin(payload, sources, archs)
        out += _pack_str(payload)
    if pos != len(blob):
        raise RuntimeError("unexpected packed-imports layout (trailing bytes)")
    return struct.pack("<Q", len(out)) + bytes(out)


def _cuda_payload_with_fatbin(payload: bytes, sources: list[str], archs: list[str]) -> bytes:
    fmt, body_start = _read_str(payload, 0)
    if fmt != b"cuda":
        # Built where the CUDA runtime was loaded: our compile callback already
        # put the fatbin in (see nvcc_compile_callback).
        return payload
    for source in sources:
        code = source.encode()
        tail = _pack_str(code)
        if payload.endswith(tail):
            fmap = payload[body_start : len(payload) - len(tail)]
            return _pack_str(b"fatbin") + fmap + _pack_str(nvcc_fatbin(source, archs))
    raise RuntimeError("could not match the packed CUDA module to its source")


@contextlib.contextmanager
def nvcc_compile_callback(archs: list[str]):
    """Make TVM compile CUDA with our nvcc fatbin while building, where it compiles at all.

    When the CUDA runtime is loaded (a machine with a driver), TVM compiles
    CUDA source at build time through ``tvm_callback_cuda_compile``, by
    default NVRTC for the one target arch. Registering ours makes that module
    hold the multi-arch fatbin instead. On a machine without a driver the
    callback is never called and the export rewrites the source instead.
    """
    import tvm.support.nvcc  # noqa: F401  (registers TVM's callback: ours must come after)
    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)

    def compile_fatbin(code, *_target):
        return bytearray(nvcc_fatbin(code, archs))

    tvm_ffi.register_global_func(name, compile_fatbin, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)


def pack_imports_with_fatbin(archs: list[str]):
    """An ``fpack_imports`` for ``export_library`` that embeds CUDA fatbins."""
    from tvm.runtime import _ffi_api
    import tvm_ffi

    def fpack(mod, is_system_lib, prefix, workspace_dir):
        blob = _ffi_api.ModulePackImportsToTensor(mod).numpy().tobytes()
        sources = [m.inspect_source("cuda") for m in walk_modules(mod) if m.kind == "cuda"]
        blob = embed_cuda_fatbin(blob, [s for s in sources if s], archs)
        host = next(m for m in walk_modules(mod) if m.kind == "llvm")
        llvm_target = host.get_function("_get_target_string")()
        codegen_blob = tvm_ffi.get_global_func("codegen.codegen_blob")
        packed = codegen_blob(blob, is_system_lib, llvm_target, prefix)
        path = os.path.join(workspace_dir, f"{prefix}devc.o")
        packed.write_to_file(path)
        return path

    return fpack


def walk_modules(module):
    """Every module in an import tree, root first, each once."""
    seen, stack = set(), [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        yield m
        stack.extend(m.imports)


def embedded_fatbins(data: bytes) -> list[bytes]:
    """Every fatbin container in ``data`` (a library file), as bytes ``cuobjdump`` reads."""
    magic = struct.pack("<I", FATBIN_MAGIC)
    found = []
    start = data.find(magic)
    while start >= 0:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, start)
        end = start + header_size + fat_size
        found.append(data[start:end])
        start = data.find(magic, max(end, start + 4))
    return found


def find_cuobjdump() -> str | None:
    """``cuobjdump`` next to nvcc, on ``PATH``, or the copy Triton ships (``triton/backends/nvidia/bin``)."""
    import importlib.util
    import shutil

    nvcc = _targets.find_nvcc()
    candidates = [Path(nvcc).parent / "cuobjdump"] if nvcc else []
    on_path = shutil.which("cuobjdump")
    candidates += [Path(on_path)] if on_path else []
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((str(c) for c in candidates if c.is_file()), None)


def sass_by_kernel(fatbin: bytes, arch: str) -> dict[str, list[str]]:
    """``{kernel: [SASS opcode, ...]}`` of the ``arch`` cubin in ``fatbin`` (``cuobjdump -sass``)."""
    import re

    kernels: dict[str, list[str]] = {}
    current = None
    for line in _cuobjdump(fatbin, "-sass", arch).splitlines():
        header = re.match(r"\s*Function : (\S+)", line)
        if header:
            current = kernels.setdefault(header.group(1), [])
            continue
        op = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if op and current is not None:
            current.append(op.group(1))
    return kernels



def resource_usage(fatbin: bytes, arch: str) -> dict[str, dict[str, int]]:
    """``{kernel: {"REG", "STACK", "SHARED", "LOCAL", ...}}`` of the ``arch`` cubin (``cuobjdump -res-usage``).

    The numbers ``ptxas -v`` prints at compile time, read back from the
    embedded binary: ``STACK`` is the stack frame, ``LOCAL`` the per-thread
    local memory (where spilled registers go).
    """
    import re

    usage: dict[str, dict[str, int]] = {}
    current = None
    for line in _cuobjdump(fatbin, "-res-usage", arch).splitlines():
        head = re.match(r"\s*Function (\S+):", line)
        if head:
            current = usage.setdefault(head.group(1), {})
        elif current is not None:
            current.update({k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)})
    return usage


def _cuobjdump(fatbin: bytes, what: str, arch: str) -> str:
    tool = find_cuobjdump()
    if tool is None:
        raise MlcVisionError("cuobjdump not found (CUDA toolkit bin, PATH, or the triton package)")
    with tempfile.TemporaryDirectory(prefix="mlc-vision-cuobjdump-") as tmp:
        path = Path(tmp) / "kernels.fatbin"
        path.write_bytes(fatbin)
        return subprocess.run([tool, what, "-arch", arch, str(path)], capture_output=True, text=True, check=True).stdout
