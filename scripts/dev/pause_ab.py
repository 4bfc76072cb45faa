"""Dev A/B: a preset's fp32 library against ONNX Runtime, each call timed after an idle pause and right after a call.

``bench`` sleeps before every call so that one engine's spinning threads do not slow the next; this
times both engines that way and also right after a call of their own (one untimed call first), in
alternation in one process, and prints the medians and the two ratios (docs/performance.md has
the runs on a Zen 3):

    python scripts/dev/pause_ab.py clip-vit-base-patch16 --batch 1 --runs 25
    TVM_BIND_THREADS=0 python scripts/dev/pause_ab.py clip-vit-base-patch16   # TVM's threads unpinned
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
from preset_library import ab_argument_parser, build_preset_library, random_pixels


def main() -> None:
    import tvm

    from mlc_vision import bench_peers
    from mlc_vision.config import load_preset
    from mlc_vision.testing.references import torch_model

    args = ab_argument_parser("seconds of idle before a call (bench's)").parse_args()
    config = dataclasses.replace(load_preset(args.preset), select_layer=-1, feature="cls_patch")
    pixels = random_pixels(config, args.batch)
    lib = build_preset_library(config)
    params, encode = lib.prepacked(), lib.encode()  # as VisionEncoder and bench call it
    with tempfile.TemporaryDirectory() as tmp:
        onnx = bench_peers.export_onnx(torch_model(config).eval(), pixels, Path(tmp) / "model.onnx")
        session = bench_peers.onnxruntime_session(onnx)
    tensor = tvm.runtime.tensor(pixels, tvm.cpu())
    calls = {"ours": lambda: encode(tensor, params), "ONNX Runtime": bench_peers.onnxruntime_runner(session, pixels)}
    for call in calls.values():
        call()
        call()
    times = {(name, after_pause): [] for name in calls for after_pause in (True, False)}
    for _ in range(args.runs):
        for after_pause in (True, False):
            for name, call in calls.items():
                time.sleep(args.pause if after_pause else 0.01)
                if not after_pause:
                    call()  # the timed call follows a call of its own
                start = time.perf_counter()
                call()
                times[(name, after_pause)].append(time.perf_counter() - start)
    medians = {key: float(np.median(t)) * 1e3 for key, t in times.items()}
    for (name, after_pause), ms in medians.items():
        print(f"{name:13s} {'after a pause' if after_pause else 'right after a call':18s} median {ms:8.1f} ms")
    for after_pause in (True, False):
        ratio = medians[("ours", after_pause)] / medians[("ONNX Runtime", after_pause)]
        print(f"ours / ONNX Runtime {'after a pause' if after_pause else 'right after a call'}: {ratio:.3f}")


if __name__ == "__main__":
    main()
