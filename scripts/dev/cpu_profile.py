"""Dev profile: where an fp32 CPU library of a preset spends its time, per kernel (PrimFunc).

Builds the product's library (every layer, every token; the C kernels linked in), runs ``encode``
on random params as ``VisionEncoder`` does (an fp32 library's ``encode_prepacked`` on the weights
its ``prepack_params`` packed) with a VM instrument that reads the wall clock and the process CPU time around
every kernel call, and prints the kernels grouped by PrimFunc name, largest first:

    python scripts/dev/cpu_profile.py clip-vit-base-patch16 --batch 1
    python scripts/dev/cpu_profile.py clip-vit-large-patch14-336 --batch 1 --dtype bfloat16

CPU time is the robust number on a shared machine (it also counts the thread pool's spinning).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import tempfile
import time
from pathlib import Path

import numpy as np


def random_params(specs, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for spec in specs:
        shape = spec["shape"]
        if spec["name"].endswith("weight") and len(shape) == 1:
            a = 1 + 0.1 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) * (0.02 if len(shape) == 2 else 0.1)
        out.append(a.astype("float32"))
    return out


def main() -> None:
    import tvm
    from tvm import relax

    from mlc_vision.compiler.export import build_library
    from mlc_vision.compiler.module import build_module
    from mlc_vision.config import load_preset
    from mlc_vision.runtime.encoder import entry_function, prepacked_params

    ap = argparse.ArgumentParser()
    ap.add_argument("preset")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    config = dataclasses.replace(load_preset(args.preset), select_layer=-1, feature="cls_patch")
    built = build_module(config, args.dtype, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        lib_path = build_library(built.mod, "cpu", Path(tmp) / "lib.so", metadata=built.metadata)
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
    dev = tvm.cpu()
    cast = (lambda a: a.astype("bfloat16")) if args.dtype == "bfloat16" else (lambda a: a)
    import ml_dtypes  # noqa: F401 (numpy bfloat16)

    loaded = [tvm.runtime.tensor(cast(a), dev) for a in random_params(built.metadata["params"])]
    # as VisionEncoder calls it: an fp32 library's weights packed once, its _prepacked twin
    params = prepacked_params(vm, built.metadata, loaded)
    encode = vm[entry_function(built.metadata, "encode")]
    size = config.image_size
    pixels = tvm.runtime.tensor(cast(np.random.default_rng(1).standard_normal((args.batch, 3, size, size)).astype("float32")), dev)

    wall, cpu, count = collections.Counter(), collections.Counter(), collections.Counter()
    start = {}

    def instrument(func, name, before_run, ret_value, *fargs):  # noqa: ARG001
        if before_run:
            start["t"] = (time.perf_counter(), time.process_time())
        else:
            w0, c0 = start["t"]
            key = re.sub(r"\d+$", "", str(name)) if not str(name).startswith(("f32_linear", "bf16_linear")) else str(name)
            wall[key] += time.perf_counter() - w0
            cpu[key] += time.process_time() - c0
            count[key] += 1

    encode(pixels, params)  # warm-up
    vm.set_instrument(instrument)
    for _ in range(args.runs):
        encode(pixels, params)
    total_w, total_c = sum(wall.values()) / args.runs, sum(cpu.values()) / args.runs
    print(f"{args.preset} b={args.batch} {args.dtype}: kernels {total_w * 1e3:.1f} ms wall, {total_c * 1e3:.1f} ms CPU per call")
    for key, c in cpu.most_common():
        print(f"{c / args.runs * 1e3:9.2f} ms CPU {100 * c / sum(cpu.values()):5.1f} %  {wall[key] / args.runs * 1e3:9.2f} ms wall"
              f"  x{count[key] // args.runs:3d}  {key}")


if __name__ == "__main__":
    main()
