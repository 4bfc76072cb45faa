"""Dev benchmark: the fp32 C GEMM (``kernels/cpu_f32_gemm.c``) on the ViT linear-layer shapes, by ctypes.

Compiles the C file (optionally with another register tile, ``-DF32_MR=.. -DF32_NV=..``), loads
TVM's runtime first so that the kernel runs on TVM's thread pool, and prints GFLOP/s and the
fraction of the fp32 peak (cores x GHz x FMA ports x 32 FLOP per 512-bit FMA):

    python scripts/dev/f32_gemm_bench.py --threads 2 --ghz 2.1 --fma-ports 2
    python scripts/dev/f32_gemm_bench.py --tile 14x32 --threads 1
    python scripts/dev/f32_gemm_bench.py --m 197 --cold --packed   # weights packed once, as a library's twins
    python scripts/dev/f32_gemm_bench.py --attention --threads 1     # the attention on the ViT head shapes

The clock and FMA ports are arguments (the CPU does not tell them reliably). Process CPU time is
printed beside the wall time: the machine may be shared.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).resolve().parents[2] / "mlc_vision" / "compiler" / "kernels" / "cpu_f32_gemm.c"
ROWS = (197, 577, 1576)
KN = ((768, 2304), (768, 768), (768, 3072), (3072, 768), (1024, 4096), (4096, 1024), (1152, 4304), (4304, 1152))
#: (tokens, heads, head dim) of one image: ViT-B/16-224, ViT-L/14-336, InternViT-300M-448, SigLIP so400m-384.
ATTENTION = ((197, 12, 64), (577, 16, 64), (1025, 16, 64), (729, 16, 72))


def measured_peak() -> float:
    """GFLOP/s of one core running only FMAs (the real clock, turbo included): ``bench``'s probe on one thread."""
    from mlc_vision import bench_peers

    flags = set(bench_peers.machine_info()["isa"])
    return bench_peers.measure_fma_peak(flags, 1) or float("nan")


def build(
    tile: str | None, workdir: str, cflags: list[str], source: Path = SOURCE, name: str | None = None
) -> ctypes.CDLL:
    """``source`` (the working tree's kernel by default) compiled with ``cflags`` and loaded after TVM's
    runtime, so that it runs on TVM's thread pool; ``name`` tells two builds in one ``workdir`` apart."""
    import tvm

    ctypes.CDLL(str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so"), mode=ctypes.RTLD_GLOBAL)
    flags = []
    if tile:
        mr, nr = (int(v) for v in tile.split("x"))
        flags = [f"-DF32_MR={mr}", f"-DF32_NV={nr // 16}"]
    out = os.path.join(workdir, f"f32gemm_{name or tile or 'default'}.so")
    cflags = [part for flag in cflags for part in flag.split()]
    subprocess.run(["cc", "-O3", "-fPIC", "-shared", "-std=gnu11", *flags, *cflags, str(source), "-o", out], check=True)
    lib = ctypes.CDLL(out)
    lib.mlcv_f32_linear.restype = ctypes.c_int
    lib.mlcv_f32_linear.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3 + [ctypes.c_int32]
    lib.mlcv_f32_linear_packed.argtypes = lib.mlcv_f32_linear.argtypes
    lib.mlcv_f32_pack_weights.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    lib.mlcv_f32_packed_floats.restype = ctypes.c_int64
    lib.mlcv_f32_packed_floats.argtypes = [ctypes.c_int64] * 2
    return lib


def packed_weights(lib, w: np.ndarray) -> np.ndarray:
    """``w`` [N, K] packed for the fastest path here, in a 64-byte aligned buffer (what a library's
    ``prepack_params`` makes once)."""
    n, k = w.shape
    floats = lib.mlcv_f32_packed_floats(n, k)
    raw = np.empty(floats + 16, np.float32)
    start = (-raw.ctypes.data % 64) // 4
    out = raw[start : start + floats]
    assert lib.mlcv_f32_pack_weights(w.ctypes.data, out.ctypes.data, n, k) == 0
    return out


def random_linear_chain(dims, layers: int, seed: int = 0):
    """Weights ``[N, K]`` and biases of ``layers`` repeats of ``dims`` ((K, N) per layer), fp32."""
    rng = np.random.default_rng(seed)
    weights, biases = [], []
    for _ in range(layers):
        for k, n in dims:
            weights.append((rng.standard_normal((n, k)) * k**-0.5).astype(np.float32))
            biases.append((rng.standard_normal(n) * 0.1).astype(np.float32))
    return weights, biases


def linear_chain(lib, m: int, weights, biases, packed: bool = False):
    """A callable running the linear layers one after the other (x -> y0 -> y1 ...) with ``lib``'s
    GEMM, each layer's output buffer made once; ``packed``: on weights ``lib`` packed beforehand."""
    outputs = [np.empty((m, w.shape[0]), np.float32) for w in weights]
    shapes = [w.shape for w in weights]
    linear = lib.mlcv_f32_linear_packed if packed else lib.mlcv_f32_linear
    if packed:
        weights = [packed_weights(lib, w) for w in weights]

    def run(x):
        for (n, k), w, b, y in zip(shapes, weights, biases, outputs):
            assert linear(x.ctypes.data, w.ctypes.data, b.ctypes.data, None, None, None, y.ctypes.data, m, n, k, 0) == 0
            x = y
        return x

    return run


def time_one(lib, m: int, k: int, n: int, runs: int, cold: bool = False, packed: bool = False) -> tuple[float, float]:
    """Best wall and CPU seconds of ``runs`` calls. ``cold``: every call reads another weight matrix
    (512 MiB of them in turn), so the weights come from memory as in a model, not from the L3 cache.
    ``packed``: the weights packed once beforehand (the ``_packed`` entry a prepacked library calls)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    copies = max(1, (512 << 20) // (4 * n * k)) if cold else 1
    ws = [rng.standard_normal((n, k), dtype=np.float32) for _ in range(copies)]
    if packed:
        ws = [packed_weights(lib, w) for w in ws]
    linear = lib.mlcv_f32_linear_packed if packed else lib.mlcv_f32_linear
    b = rng.standard_normal(n, dtype=np.float32)
    y = np.empty((m, n), np.float32)
    ptr = lambda a: a.ctypes.data  # noqa: E731
    calls = itertools.count()

    def call():
        w = ws[next(calls) % copies]
        assert linear(ptr(x), ptr(w), ptr(b), None, None, None, ptr(y), m, n, k, 0) == 0

    call()
    walls, cpus = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        call()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def time_attention(lib, runs: int) -> None:
    """Best wall time of ``runs`` calls of the fastest path's attention per ATTENTION shape (one image)."""
    lib.mlcv_f32_attention.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_float]
    rng = np.random.default_rng(0)
    for s, h, d in ATTENTION:
        q, k, v = (rng.standard_normal((1, s, h, d), dtype=np.float32) for _ in range(3))
        out = np.empty_like(q)
        ptrs = [a.ctypes.data for a in (q, k, v, out)]
        assert lib.mlcv_f32_attention(*ptrs, 1, s, h, d, d**-0.5) == 0
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            lib.mlcv_f32_attention(*ptrs, 1, s, h, d, d**-0.5)
            best = min(best, time.perf_counter() - start)
        print(f"attention S={s:5d} H={h:3d} D={d:4d}  {best * 1e3:7.2f} ms {4 * s * s * h * d / best / 1e9:6.1f} GFLOP/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tile", default=None, help="AVX-512 tile MRxNR, e.g. 6x64, 14x32, 8x48 (default: the file's)")
    ap.add_argument("--cflags", nargs="*", default=[],
                    help="e.g. -DF32_L1_SHARE=4 (write as --cflags=-D..., several in one quoted argument)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ghz", type=float, default=2.1)
    ap.add_argument("--fma-ports", type=int, default=2, help="512-bit FMAs per cycle (an AVX2 CPU: half its 256-bit ones)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--cold", action="store_true", help="weights from memory, not cache (as in a model)")
    ap.add_argument("--packed", action="store_true", help="weights packed once beforehand (a prepacked library)")
    ap.add_argument("--m", type=int, nargs="*", default=None, help=f"rows (default {ROWS})")
    ap.add_argument("--attention", action="store_true", help="time the attention instead of the GEMMs")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    peak = args.threads * args.ghz * args.fma_ports * 32
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(args.tile, tmp, args.cflags)
        info = (ctypes.c_int64 * 3)()
        core = measured_peak()
        lib.mlcv_f32_tile_info(ctypes.c_int64(768), info)  # the fastest path's tile on this CPU
        print(f"tile {info[0]}x{info[1]}, {args.threads} thread(s), nominal peak {peak:.0f} GFLOP/s, "
              f"measured FMA peak {core:.0f} GFLOP/s on one core")
        if args.attention:
            time_attention(lib, args.runs)
            return
        for m, (k, n) in itertools.product(args.m or ROWS, KN):
            lib.mlcv_f32_tile_info(ctypes.c_int64(k), info)
            wall, cpu = time_one(lib, m, k, n, args.runs, args.cold, args.packed)
            gf = 2 * m * k * n / wall / 1e9
            per_cpu = 2 * m * k * n / cpu / 1e9
            print(f"M={m:5d} K={k:5d} N={n:5d} KC={info[2]:4d}  {wall * 1e3:7.2f} ms {gf:6.1f} GFLOP/s "
                  f"{100 * gf / peak:5.1f} % of nominal | cpu {cpu * 1e3:7.2f} ms {per_cpu:6.1f} GFLOP/cpu-s "
                  f"{100 * per_cpu / core:5.1f} % of measured")


if __name__ == "__main__":
    main()
