"""Dev profile: where ONNX Runtime spends its time on a preset, layer by layer, to set beside ``cpu_profile.py``.

Exports the preset's torch model to ONNX as ``bench`` does, runs it in ONNX Runtime's session as
``bench`` creates it but with the session's profiler on, each call after ``bench``'s pause, and
prints the milliseconds per call of each node kind (op) and of each MatMul summed over the layers
(the layer index folded out of the node's name), largest first:

    python scripts/dev/ort_profile.py clip-vit-base-patch16 --runs 10

Run it right before or after ``cpu_profile.py`` on the same preset: the host's speed drifts.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from preset_library import random_pixels

#: The ops whose nodes are listed one layer pattern at a time.
MATMUL_OPS = ("MatMul", "FusedMatMul", "Gemm")


def main() -> None:
    from mlc_vision import bench, bench_peers
    from mlc_vision.config import load_preset
    from mlc_vision.testing.references import torch_model

    ap = argparse.ArgumentParser()
    ap.add_argument("preset")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()

    config = dataclasses.replace(load_preset(args.preset), select_layer=-1, feature="cls_patch")
    pixels = random_pixels(config, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        onnx = bench_peers.export_onnx(torch_model(config).eval(), pixels, Path(tmp) / "model.onnx")
        options = bench_peers.onnxruntime_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = bench_peers.onnxruntime_session(onnx, options)
        run = bench_peers.onnxruntime_runner(session, pixels)
        run()
        times = []
        for _ in range(args.runs):
            time.sleep(bench.QUIET_S)
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
        events = json.loads(Path(session.end_profiling()).read_text())
    calls = sum(1 for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    by_op, by_layer = collections.Counter(), collections.Counter()
    for e in nodes:
        by_op[e["args"]["op_name"]] += e["dur"]
        if e["args"]["op_name"] in MATMUL_OPS:
            by_layer[re.sub(r"layers\.\d+", "layers.N", e["name"].removesuffix("_kernel_time"))] += e["dur"]
    print(f"{args.preset} batch {args.batch}: median call {np.median(times):.1f} ms over {args.runs} "
          f"(profiled calls: {calls}, the untimed first one included)")  # fmt: skip
    for title, counter in (("by op", by_op), ("MatMuls by layer pattern", by_layer)):
        print(title)
        for name, us in counter.most_common(12):
            print(f"  {us / calls / 1e3:8.2f} ms  {name}")


if __name__ == "__main__":
    main()
