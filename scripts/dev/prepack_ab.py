"""Dev A/B: an fp32 CPU library's entry on the params as loaded (its GEMMs pack the weights in every
call) against its ``_prepacked`` twin on the params ``prepack_params`` packed once.

One library holds both, so the two sides share every kernel but the packing; calls alternate, with
a short pause between them, and the medians and their ratio are printed:

    python scripts/dev/prepack_ab.py clip-vit-base-patch16 --batch 1 --runs 21

Also prints how long ``prepack_params`` took (once, at load).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from preset_library import ab_argument_parser, build_preset_library, random_pixels


def main() -> None:
    import tvm

    from mlc_vision.bench import machine_info
    from mlc_vision.config import load_preset

    args = ab_argument_parser("seconds between calls").parse_args()

    config = load_preset(args.preset)
    lib = build_preset_library(config)
    if lib.metadata.get("prepack") is None:
        raise SystemExit("error: this CPU's fp32 libraries have no prepacked entries (no AVX2 + FMA or AVX-512F)")
    start = time.perf_counter()
    packed = lib.prepacked()
    pack_s = time.perf_counter() - start
    x = tvm.runtime.tensor(random_pixels(config, args.batch, seed=0))
    sides = {
        "per call": (lib.encode(prepacked=False), lib.loaded),
        "prepacked": (lib.encode(), packed),
    }
    outputs = {name: f(x, p).numpy() for name, (f, p) in sides.items()}
    same = np.array_equal(outputs["per call"], outputs["prepacked"])
    times = {name: [] for name in sides}
    for _ in range(args.runs):
        for name, (f, p) in sides.items():
            time.sleep(args.pause)
            start = time.perf_counter()
            f(x, p)
            times[name].append((time.perf_counter() - start) * 1e3)
    medians = {name: statistics.median(t) for name, t in times.items()}
    info = machine_info()
    print(f"{args.preset} batch {args.batch}, {args.runs} calls each, CPU: {info.get('cpu')}")
    print(f"prepack_params: {pack_s * 1e3:.0f} ms once; outputs bit-identical: {same}")
    for name, ms in medians.items():
        print(f"  {name:<10} {ms:9.1f} ms (min {min(times[name]):.1f})")
    print(f"  prepacked / per call: {medians['prepacked'] / medians['per call']:.3f}")


if __name__ == "__main__":
    main()
