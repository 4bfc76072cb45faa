"""Dev benchmark: the fp32 C GEMM against ONNX Runtime's (MLAS) on the same chains of linear layers.

Each case is 12 layers of the ViT-B/16 shapes one after the other (x -> y0 -> y1 ...), with 12
different weight matrices, so that the weights come from memory as in a model: ONNX Runtime runs
a graph of Gemm nodes (its weights packed once when the session is made), we run the same layers
by ctypes (``scripts/dev/f32_gemm_bench.py``'s build and chain). The two are timed as ``mlc-vision bench``
times its contenders (``bench.interleaved_medians_ms``: alternated, a pause before each call so that
the previous engine's threads have stopped spinning; ONNX Runtime's session as ``bench`` makes it):

    python scripts/dev/ort_gemm_ab.py --m 197
    python scripts/dev/ort_gemm_ab.py --m 1576 --runs 5 --packed

Prints the median of each and their ratio: where the GEMMs alone stand against ONNX Runtime's, apart
from attention and the rest of a library.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import f32_gemm_bench  # noqa: E402

#: (K, N) of the layers of one block, repeated LAYERS times.
CASES = {"768x768 (q, k, v, out)": [(768, 768)], "MLP 768 -> 3072 -> 768": [(768, 3072), (3072, 768)]}
LAYERS = 12


def onnx_session(m: int, weights, biases, path: Path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mlc_vision.bench_peers import onnxruntime_session

    nodes, initializers, previous = [], [], "x"
    for i, (w, b) in enumerate(zip(weights, biases)):
        initializers += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [previous, f"w{i}", f"b{i}"], [f"y{i}"], transB=1))
        previous = f"y{i}"
    graph = helper.make_graph(
        nodes, "linear_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, weights[0].shape[1]])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [m, weights[-1].shape[0]])], initializers,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return onnxruntime_session(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=197, help="rows (tokens x batch)")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--packed", action="store_true", help="ours on weights packed beforehand, as an fp32 library's")
    args = ap.parse_args()
    from mlc_vision.bench import interleaved_medians_ms

    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        lib = f32_gemm_bench.build(None, tmp, [])
        for name, dims in CASES.items():
            weights, biases = f32_gemm_bench.random_linear_chain(dims, LAYERS)
            session = onnx_session(args.m, weights, biases, Path(tmp) / "chain.onnx")
            x = np.random.default_rng(1).standard_normal((args.m, dims[0][0])).astype(np.float32)
            contenders = {
                "ours": f32_gemm_bench.linear_chain(lib, args.m, weights, biases, args.packed),
                "onnxruntime": lambda x, session=session: session.run(None, {"x": x})[0],
            }
            ref = contenders["onnxruntime"](x)
            error = float(np.abs(contenders["ours"](x) - ref).max() / np.abs(ref).max())
            ms = interleaved_medians_ms({key: (lambda run=run: run(x)) for key, run in contenders.items()}, args.runs)
            gflop = sum(2 * args.m * w.shape[0] * w.shape[1] for w in weights) / 1e9
            ours, theirs = ms["ours"], ms["onnxruntime"]
            print(f"{name:24s} M={args.m}: ours {ours:8.2f} ms ({gflop / ours * 1e3:5.1f} GFLOP/s), "
                  f"ONNX Runtime {theirs:8.2f} ms ({gflop / theirs * 1e3:5.1f}); ours / ORT {ours / theirs:.3f}; "
                  f"max rel. diff {error:.1e}")

if __name__ == "__main__":
    main()
