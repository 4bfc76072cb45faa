"""Throughput of one VisionEncoder called from several threads: one VM per thread, or a lock around one VM.

Usage::

    python scripts/dev/thread_bench.py LIB PARAMS [--threads 4] [--calls 16] [--batch 1] [--device cpu]

Both variants share the loaded library and the params on the device; one VM
per thread is what ``VisionEncoder`` does. Prints,
for the sequential baseline and each variant (median of ``--repeats``
rounds), calls per second of wall time and the process CPU time per call (on
a machine shared with other work, a variant with more threads can win wall
time by taking a bigger share of the CPUs; CPU per call shows what it costs),
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

from mlc_vision.runtime.encoder import VisionEncoder, entry_function


class LockedVM:
    """The alternative to one VM per thread: one VM, and calls take turns."""

    def __init__(self, encoder: VisionEncoder):
        self.encoder = encoder
        self.vm = VirtualMachine(tvm.runtime.load_module(str(encoder.lib_path)), encoder.tvm_device)
        self.lock = threading.Lock()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        tensor = tvm.runtime.tensor(pixels, self.encoder.tvm_device)
        with self.lock:
            params = self.encoder._loaded_params()  # the encoder's own weights, packed or not
            return self.vm[entry_function(self.encoder.metadata, "encode", params.packed)](tensor, params.tensors).numpy()


def timed_threads(call, inputs: list[np.ndarray], threads: int) -> tuple[tuple[float, float], list]:
    results: list = [None] * len(inputs)

    def work(indices):
        for i in indices:
            results[i] = call(inputs[i])

    workers = [threading.Thread(target=work, args=(range(t, len(inputs), threads),)) for t in range(threads)]
    start, cpu = time.perf_counter(), time.process_time()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return (time.perf_counter() - start, time.process_time() - cpu), results


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
    locked = LockedVM(encoder)
    encoder(inputs[0]), locked(inputs[0])  # warm up: thread pools, first-call allocations
    expected = [encoder(x) for x in inputs]

    rows = {"sequential": [], "one VM per thread (VisionEncoder)": [], "lock around one VM": []}
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        for x in inputs:
            encoder(x)
        rows["sequential"].append((time.perf_counter() - start, time.process_time() - cpu))
        for name, call in (("one VM per thread (VisionEncoder)", encoder), ("lock around one VM", locked)):
            seconds, results = timed_threads(call, inputs, args.threads)
            assert all(np.array_equal(r, e) for r, e in zip(results, expected)), f"{name}: results differ"
            rows[name].append(seconds)
    print(f"{encoder!r}, {args.calls} calls of batch {args.batch}, {args.threads} threads, median of {args.repeats}")
    for name, times in rows.items():
        wall = statistics.median(t[0] for t in times)
        cpu = statistics.median(t[1] for t in times)
        print(f"  {name:<34} {args.calls / wall:8.1f} calls/s  ({wall * 1000:.0f} ms wall, {cpu / args.calls * 1000:.1f} ms CPU per call)")


if __name__ == "__main__":
    main()
