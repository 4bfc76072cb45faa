"""Throughput of one VisionEncoder called from several threads: a lock around one VM, or one VM per thread.

Usage::

    python scripts/dev/thread_bench.py LIB PARAMS [--threads 4] [--calls 16] [--batch 1] [--device cpu]

Both variants share the loaded library and the params on the device; the
lock variant is what ``VisionEncoder`` does. Prints calls per second for the
sequential baseline and for each variant (median of ``--repeats`` rounds),
and checks that every threaded result equals the sequential one.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from mlc_vision.runtime.encoder import VisionEncoder


class PerThreadVM:
    """The alternative to the lock: each calling thread gets its own VM over the same library and params."""

    def __init__(self, encoder: VisionEncoder):
        self.encoder = encoder
        self.module = tvm.runtime.load_module(str(encoder.lib_path))
        self.local = threading.local()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        vm = getattr(self.local, "vm", None)
        if vm is None:
            vm = self.local.vm = VirtualMachine(self.module, self.encoder.tvm_device)
        tensor = tvm.runtime.tensor(pixels, self.encoder.tvm_device)
        return vm["encode"](tensor, self.encoder._params).numpy()


def timed_threads(call, inputs: list[np.ndarray], threads: int) -> tuple[float, list]:
    results: list = [None] * len(inputs)

    def work(indices):
        for i in indices:
            results[i] = call(inputs[i])

    workers = [threading.Thread(target=work, args=(range(t, len(inputs), threads),)) for t in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lib")
    parser.add_argument("params")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    encoder = VisionEncoder(args.lib, args.params, device=args.device)
    size, channels = encoder.image_size, encoder.config["num_channels"]
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((args.batch, channels, size, size)).astype(np.float32) for _ in range(args.calls)]
    per_thread = PerThreadVM(encoder)
    encoder(inputs[0]), per_thread(inputs[0])  # warm up: thread pools, first-call allocations
    expected = [encoder(x) for x in inputs]

    rows = {"sequential": [], "lock (VisionEncoder)": [], "one VM per thread": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        for x in inputs:
            encoder(x)
        rows["sequential"].append(time.perf_counter() - start)
        for name, call in (("lock (VisionEncoder)", encoder), ("one VM per thread", per_thread)):
            seconds, results = timed_threads(call, inputs, args.threads)
            assert all(np.array_equal(r, e) for r, e in zip(results, expected)), f"{name}: results differ"
            rows[name].append(seconds)
    print(f"{encoder!r}, {args.calls} calls of batch {args.batch}, {args.threads} threads, median of {args.repeats}")
    for name, times in rows.items():
        median = statistics.median(times)
        print(f"  {name:<22} {args.calls / median:8.1f} calls/s  ({median * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
