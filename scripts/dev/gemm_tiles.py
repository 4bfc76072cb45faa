"""Dev benchmark: the CPU GEMM rule's register tile (MR x NR) on the ViT linear-layer shapes.

Times ``out[b, m, n] = A[b, m, :] . W[n, :] + bias[n]`` scheduled by
``mlc_vision.compiler.schedules.cpu.GEMM(mr, nr)`` with both threads, for each tile in
TILES and each (K, N) of a ViT-L layer (qkv/out-proj, fc1, fc2):

    python scripts/dev/gemm_tiles.py 8 577     # batch 8 of 577 tokens
    python scripts/dev/gemm_tiles.py 1 197
"""
import sys
import time

import numpy as np
import tvm
from tvm import te
import mlc_vision.compiler.schedules.cpu as cpu
target = tvm.target.Target.from_device("cpu")
BATCH, M = int(sys.argv[1]), int(sys.argv[2])
TILES = [(12, 32), (6, 64), (4, 64), (5, 64), (3, 128)]


def build(K, N, mr, nr):
    A = te.placeholder((BATCH, M, K), "float32", name="A"); W = te.placeholder((N, K), "float32", name="W"); bias = te.placeholder((N,), "float32", name="bias")
    k = te.reduce_axis((0, K), "k")
    C = te.compute((BATCH, M, N), lambda b, i, j: te.sum(A[b, i, k] * W[j, k], axis=k), name="NT_matmul")
    D = te.compute((BATCH, M, N), lambda b, i, j: C[b, i, j] + bias[j], name="add")
    f = te.create_prim_func([A, W, bias, D])
    g = cpu.GEMM(mr, nr); g.strict = True
    with target:
        sch = g.apply(f, target, False)
    return tvm.compile(sch.mod, target=target)


def bench(fn, runs=5):
    fn(); ts=[]
    for _ in range(runs):
        t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
    return sorted(ts)[len(ts)//2]


for K, N in [(1024, 4096), (4096, 1024), (1024, 1024)]:
    rng = np.random.default_rng(0)
    a, w, b = [rng.standard_normal(s).astype("float32") for s in [(BATCH,M,K),(N,K),(N,)]]
    ta, tw, tb = [tvm.runtime.tensor(x) for x in (a, w, b)]; out = tvm.runtime.tensor(np.zeros((BATCH,M,N),"float32"))
    for mr, nr in TILES:
        try:
            lib = build(K, N, mr, nr)
        except Exception as e:
            print(mr, nr, "failed", str(e).splitlines()[0][:80]); continue
        t = bench(lambda: lib["main"](ta, tw, tb, out))
        np.testing.assert_allclose(out.numpy()[0], a[0] @ w.T + b, rtol=1e-3, atol=1e-3)
        print(f"K{K} N{N} tile {mr}x{nr}: {t*1e3:.1f} ms {2*BATCH*M*K*N/t/1e9:.1f} GF/s", flush=True)
