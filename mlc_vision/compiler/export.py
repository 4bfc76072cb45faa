"""Compile a Relax IRModule for a target and export it atomically.

Pipeline per target:

* ``cpu``: ``mlc_vision.compiler.cpu.cpu_relax_pipeline`` (our own schedules;
  TVM's stock pipeline leaves CPU kernels unscheduled).
* GPU targets: TVM's default Relax pipeline (legalize, fuse, lower, plan
  memory) with dlight's GPU rules scheduling every TIR function. On CUDA,
  attention is split into matmul / softmax / matmul (default), runs as one
  fused kernel of ours (``--attention fused``, ``compiler/attention.py``), or
  as two tensor-core matmuls around our softmax kernel (``--attention
  tensorcore``; see :func:`gpu_relax_pipeline`). On CUDA with fp16 the big
  matmuls use tensor cores (WMMA); a matmul that dlight cannot
  tensorize (one without epilogue, such as the patch embedding, raises "is not
  a stage pipeline") is scheduled again with ``dlight.do_not_tensorize``.

CUDA kernels are compiled by nvcc into one fatbin (SASS for every requested
arch, PTX of the highest) that is embedded in the ``.so``: a C++ program with
only the TVM runtime can load it, no CUDA compiler at load time. TVM 0.27
hands CUDA *source* to the runtime by default, so :func:`export_executable`
rewrites the packed CUDA module (see :func:`_embed_cuda_fatbin`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from mlc_vision.compiler import targets as _targets
from mlc_vision.errors import MlcVisionError

logger = logging.getLogger(__name__)

#: Device module kinds whose source :func:`generated_source` returns.
DEVICE_MODULE_KINDS = ("cuda", "metal", "opencl", "webgpu", "vulkan")

FATBIN_MAGIC = 0xBA55ED50


# ---------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------


def _cpu_pipeline(target):
    """Our CPU pipeline (compiler/cpu.py): TVM's stock one leaves CPU kernels unscheduled."""
    from mlc_vision.compiler.cpu import cpu_relax_pipeline

    return cpu_relax_pipeline(target)


def _matmul_rule(small_tensor_core: bool = False):
    """dlight's GPU matmul rule, retried without tensor cores where tensorizing fails.

    ``small_tensor_core``: also put fp16 CUDA matmuls with an extent of 32..64
    (the attention matmuls) on tensor cores; see :func:`_small_fp16_cuda_matmul`.
    """
    from tvm.s_tir import dlight as dl

    class MatmulWithFallback(dl.gpu.Matmul):
        """``gpu.Matmul`` that marks a function ``dlight.do_not_tensorize`` when WMMA fails.

        Only CUDA fp16 matmuls with every extent above 64 try tensor cores;
        of those, a matmul without epilogue is "not a stage pipeline" for the
        WMMA rule. Retrying with the attribute keeps the other matmuls on
        tensor cores instead of dropping tensor cores for the whole model.
        """

        def apply(self, func, target, tunable):
            if small_tensor_core and _small_fp16_cuda_matmul(func, target):
                try:
                    sch = dl.gpu.matmul.MatmulTensorization().apply(func, target, tunable)
                except Exception as err:  # pylint: disable=broad-except
                    logger.debug("tensor-core attention matmul failed (%s)", err)
                    sch = None
                if sch is not None:
                    return sch
            try:
                return super().apply(func, target, tunable)
            except Exception as err:  # pylint: disable=broad-except
                if "dlight.do_not_tensorize" in func.attrs:
                    raise
                name = func.attrs.get("global_symbol", "?")
                logger.debug("%s: tensor-core matmul failed (%s); scheduling without", name, err)
                return super().apply(func.with_attr("dlight.do_not_tensorize", True), target, tunable)

    return MatmulWithFallback()


#: Smallest static extent (rows, columns or reduction) that we still put on tensor cores.
MIN_TENSOR_CORE_EXTENT = 32


def _small_fp16_cuda_matmul(func, target) -> bool:
    """True for a CUDA fp16 matmul that dlight leaves on CUDA cores only for its size.

    ``gpu.Matmul`` tensorizes only when every static extent of the normalized
    ``[batch, I, J, K]`` matmul is above 64. The attention matmuls of a ViT
    have head_dim 64 as K (Q·K^T) or as J (P·V), so with that rule they ran at
    a tenth of the tensor-core matmuls' speed (18 vs ~180 TFLOP/s on an H100).
    WMMA tiles are 16 x 16 x 16 and dlight's WMMA schedule pads every extent
    (128 x 128 output tiles, K in steps of 64), so an extent of 64 wastes at
    most half a tile: still several times faster than CUDA cores. Below
    ``MIN_TENSOR_CORE_EXTENT`` we leave dlight's choice alone.
    """
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import get_in_out_dtypes, get_index_map, get_reduction_blocks

    if target.kind.name != "cuda" or not isinstance(func, tirx.PrimFunc):
        return False
    if "dlight.do_not_tensorize" in func.attrs:  # (every CUDA arch we accept is sm_70+)
        return False
    try:
        sch = s_tir.Schedule(func)
        blocks = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
        if not blocks:
            return False
        block = sch.get(blocks[0])
        maps = get_index_map(block)
        if maps is None or get_in_out_dtypes(block) not in (("float16", "float16"), ("float16", "float32")):
            return False
        sch.transform_block_layout(blocks[0], maps[0])  # -> [batch, I, J, K], as gpu.Matmul does
        normalized = [iv.dom.extent for iv in sch.get(blocks[0]).iter_vars[1:]]
    except Exception:  # pylint: disable=broad-except
        return False
    static = [int(e) for e in normalized if isinstance(e, tirx.IntImm)]
    return bool(static) and min(static) <= 64 and min(static) >= MIN_TENSOR_CORE_EXTENT


def gpu_schedule_pass(small_tensor_core: bool = False):
    """dlight's default GPU rules (Matmul, GEMV, Reduction, GeneralReduction, Fallback)."""
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(
        _matmul_rule(small_tensor_core),
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    )


def gpu_relax_pipeline(target):
    """TVM's default Relax pipeline for ``target`` with our dlight scheduling step.

    How ``R.nn.attention`` is lowered depends on the module's attention mode
    (``module.ATTENTION_ATTR``, ``--attention``):

    * ``split`` (the default): matmul / softmax / matmul with permutes, as on
      the CPU; dlight leaves the attention matmuls (head_dim 64) on CUDA cores.
    * ``fused`` (CUDA): our flash-style kernel (``compiler/attention.py``,
      head_dim <= 128, CUDA cores): the scores never reach global memory.
    * ``tensorcore`` (CUDA): ``split_attention_cuda``: no permutes, the two
      matmuls on tensor cores (:func:`_small_fp16_cuda_matmul`), our
      warp-per-row softmax (``compiler/softmax.py``). Opt-in until timed on a GPU.

    On other GPU targets every mode is the plain split.
    """
    import tvm

    from .module import ATTENTION_ATTR

    @tvm.transform.module_pass(opt_level=0, name="MlcVisionGPUPipeline")
    def _pipeline(mod, _ctx):
        mode = str(mod.attrs.get(ATTENTION_ATTR, "split")) if mod.attrs is not None else "split"
        with target:
            return tvm.transform.Sequential(_gpu_passes(target, mode))(mod)

    return _pipeline


def _gpu_passes(target, attention: str) -> list:
    from tvm import relax

    # The per-backend modules, not tvm.relax.pipeline's dispatchers: in 0.27
    # relax.pipeline.dataflow_lower_passes(cuda) fails (not re-exported).
    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as rp
    else:
        from tvm.relax.backend.gpu_generic import pipeline as rp

    # R.nn.attention is split into matmul / softmax / matmul first, as on the
    # CPU: TVM 0.27's own legalization of it multiplies fp16 scores by a
    # float32 scale, and the next matmul then fails to type-check.
    from .attention import fuse_attention, split_attention, split_attention_cuda

    cuda = target.kind.name == "cuda"
    tensorcore = cuda and attention == "tensorcore"
    if tensorcore:
        lower_attention = [split_attention_cuda]
    elif cuda and attention == "fused":
        lower_attention = [fuse_attention, split_attention]  # split: what the fused kernel cannot take
    else:
        lower_attention = [split_attention]
    return (
        lower_attention
        + rp.library_dispatch_passes(target)
        + [
            # nn.Linear is matmul(x, permute_dims(w)): fold the transpose into
            # the matmul, else every call transposes every weight first.
            relax.transform.FuseTransposeMatmul(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            gpu_schedule_pass(small_tensor_core=tensorcore),
        ]
        + rp.dataflow_lower_passes(target)
        + rp.finalize_passes(target)
    )


def _preload_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` quickly (50 s -> 14 s on this machine).

    dlight's CUDA/Metal matmul rules import that package, which parses ~500
    TVMScript functions; each parse calls ``inspect.stack()``, and for every
    frame whose "file" is not a file (``<frozen runpy>``, ``<frozen
    importlib._bootstrap>``, ``<ast>``, ``<string>``) ``inspect.getmodule``
    rescans all of ``sys.modules``. Recording in inspect's own cache that
    those names belong to no module gives the answer the scan gives (None),
    without the scan.
    """
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    pseudo_files = {"<ast>", "<string>", "<stdin>"}
    pseudo_files.update(
        f"<frozen {name}>"
        for name, module in list(sys.modules.items())
        if getattr(getattr(module, "__spec__", None), "origin", None) == "frozen"
    )
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_filename.startswith("<"):
            pseudo_files.add(frame.f_code.co_filename)
        frame = frame.f_back
    for pseudo_file in pseudo_files:
        inspect.modulesbyfile.setdefault(pseudo_file, "<no module>")
    import tvm.s_tir.tensor_intrin  # noqa: F401


def relax_pipeline_for(target_name: str, target):
    """The Relax pipeline that :func:`compile_module` uses for ``target_name``."""
    if target_name == "cpu":
        return _cpu_pipeline(target)
    return gpu_relax_pipeline(target)


# ---------------------------------------------------------------------------
# CUDA: nvcc fatbin
# ---------------------------------------------------------------------------


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


def _embed_cuda_fatbin(blob: bytes, sources: list[str], archs: list[str]) -> bytes:
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
        # put the fatbin in (see _nvcc_compile_callback).
        return payload
    for source in sources:
        code = source.encode()
        tail = _pack_str(code)
        if payload.endswith(tail):
            fmap = payload[body_start : len(payload) - len(tail)]
            return _pack_str(b"fatbin") + fmap + _pack_str(nvcc_fatbin(source, archs))
    raise RuntimeError("could not match the packed CUDA module to its source")


@contextlib.contextmanager
def _nvcc_compile_callback(archs: list[str]):
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


def _pack_imports_with_fatbin(archs: list[str]):
    """An ``fpack_imports`` for ``export_library`` that embeds CUDA fatbins."""
    from tvm.runtime import _ffi_api
    import tvm_ffi

    def fpack(mod, is_system_lib, prefix, workspace_dir):
        blob = _ffi_api.ModulePackImportsToTensor(mod).numpy().tobytes()
        sources = [m.inspect_source("cuda") for m in _walk(mod) if m.kind == "cuda"]
        blob = _embed_cuda_fatbin(blob, [s for s in sources if s], archs)
        host = next(m for m in _walk(mod) if m.kind == "llvm")
        llvm_target = host.get_function("_get_target_string")()
        codegen_blob = tvm_ffi.get_global_func("codegen.codegen_blob")
        packed = codegen_blob(blob, is_system_lib, llvm_target, prefix)
        path = os.path.join(workspace_dir, f"{prefix}devc.o")
        packed.write_to_file(path)
        return path

    return fpack


# ---------------------------------------------------------------------------
# Compile, export
# ---------------------------------------------------------------------------


def _walk(module):
    """Every module in an import tree, root first, each once."""
    seen, stack = set(), [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        yield m
        stack.extend(m.imports)


def compile_module(mod, target_name: str, *, arch=None, host=None):
    """Compile ``mod`` for ``target_name``; returns TVM's executable (not yet exported)."""
    import tvm

    target = _targets.make_target(target_name, arch=arch, host=host)
    if target_name != "cpu":
        _preload_tensor_intrinsics()
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if target_name == "cuda":
            stack.enter_context(_nvcc_compile_callback(_targets.parse_cuda_archs(arch)))
        executable = tvm.compile(mod, target, relax_pipeline=relax_pipeline_for(target_name, target))
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


def _temp_sibling(path: Path) -> Path:
    """A unique temporary name in ``path``'s directory that keeps its suffix."""
    suffix = ".tar" if path.name.endswith(".tar") else path.suffix
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial{suffix}")


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = _temp_sibling(path)
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_executable(executable, target_name: str, output: Path, *, arch=None, metadata: dict) -> Path:
    """Export ``executable`` to ``output`` (and ``<output>.json``) atomically.

    Both are written to temporary names beside the destination and renamed
    into place only when complete: a failed export leaves no file at
    ``output`` (an earlier library there stays as it was).
    """
    output = Path(output)
    check_output_suffix(target_name, output)
    if not output.parent.is_dir():
        raise MlcVisionError(f"output directory {str(output.parent)!r} does not exist")
    kwargs = {}
    if target_name == "cuda":
        kwargs["fpack_imports"] = _pack_imports_with_fatbin(_targets.parse_cuda_archs(arch))
    tmp = _temp_sibling(output)
    try:
        executable.export_library(str(tmp), **kwargs)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    _write_json_atomic(output.with_name(output.name + ".json"), metadata)
    return output


def build_library(mod, target_name: str, output: Path, *, arch=None, host=None, metadata: dict) -> Path:
    """Compile ``mod`` for ``target_name`` and export it to ``output`` (+ ``<output>.json``)."""
    output = Path(output)
    _targets.check_buildable(target_name)
    check_output_suffix(target_name, output)  # before minutes of compiling
    executable = compile_module(mod, target_name, arch=arch, host=host)
    return export_executable(executable, target_name, output, arch=arch, metadata=metadata)


def generated_source(lib_or_executable) -> str:
    """The device source (CUDA C, Metal, OpenCL C, WGSL) in a built library, for inspection.

    Takes a compiled executable or a loaded module. A CUDA library loaded
    back from disk holds only its fatbin, so inspect the executable instead.
    """
    root = getattr(lib_or_executable, "mod", lib_or_executable)
    sources = []
    for module in _walk(root):
        if module.kind in DEVICE_MODULE_KINDS:
            text = module.inspect_source(module.kind) or module.inspect_source("")
            if text:
                sources.append(text)
    if not sources:
        raise MlcVisionError("no device source in this library (CPU library, or a CUDA library loaded from disk)")
    return "\n".join(sources)
