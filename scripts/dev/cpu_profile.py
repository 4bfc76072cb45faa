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
import time

from preset_library import build_preset_library, random_pixels


def main() -> None:
    import tvm

    from mlc_vision.config import load_preset

    ap = argparse.ArgumentParser()
    ap.add_argument("preset")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    config = dataclasses.replace(load_preset(args.preset), select_layer=-1, feature="cls_patch")
    lib = build_preset_library(config, args.dtype)
    vm = lib.vm
    # as VisionEncoder calls it: an fp32 library's weights packed once, its _prepacked twin
    params, encode = lib.prepacked(), lib.encode()
    pixels = tvm.runtime.tensor(random_pixels(config, args.batch).astype(args.dtype), tvm.cpu())

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
