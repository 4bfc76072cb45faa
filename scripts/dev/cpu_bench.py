"""Private dev benchmark for mlc_vision/compiler/schedules/cpu.py (not the product bench).

Compiles the product's CLIP module for a preset with the CPU pipeline and times
it against transformers' CLIPVisionModel (eager and sdpa); `--cpu-time` runs
both on one thread and reads process CPU time (robust on a shared machine).

    python scripts/dev/cpu_bench.py --model b16 --batch 1 8
    python scripts/dev/cpu_bench.py --model l14 --batch 1 --torch --cpu-time
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import tvm
from preset_library import random_params  # fp32: the module this script builds is fp32
from tvm import relax

PRESETS = {"b16": "clip-vit-base-patch16", "l14": "clip-vit-large-patch14-336"}


def product_config(name):
    """The preset as `mlc-vision bench` runs it: every layer, every token."""
    from mlc_vision.config import load_preset

    return dataclasses.replace(load_preset(PRESETS[name]), select_layer=-1, feature="cls_patch")


def build_module(name, dtype="float32"):
    """The product's own CLIP module (mlc_vision.compiler.module), not a private copy."""
    from mlc_vision.compiler.module import build_module as build

    built = build(product_config(name), dtype, "cpu")
    return built.mod, built.metadata["params"], product_config(name).image_size


def compile_mod(mod, scheduled=True):
    from mlc_vision.compiler.pipeline import relax_pipeline

    target = tvm.target.Target.from_device("cpu")
    t = time.time()
    if scheduled:
        ex = tvm.compile(mod, target, relax_pipeline=relax_pipeline("cpu", target, "fused"))
    else:
        ex = tvm.compile(mod, target)
    return ex, time.time() - t


def time_tvm(ex, params_np, img, batch, runs=10):
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    ps = [tvm.runtime.tensor(p, dev) for p in params_np]
    x = np.random.default_rng(1).standard_normal((batch, 3, img, img)).astype(params_np[0].dtype)
    xt = tvm.runtime.tensor(x, dev)
    out = vm["encode"](xt, ps)
    vm["encode"](xt, ps)
    ts = []
    for _ in range(runs):
        t = CLOCK()
        vm["encode"](xt, ps)
        ts.append(CLOCK() - t)
    return float(np.median(ts)), out.numpy(), x


def torch_time(name, batch, impl, runs=10):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.set_num_threads(THREADS)
    c = product_config(name)
    cfg = CLIPVisionConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           num_attention_heads=c.num_attention_heads, attn_implementation=impl,
                           num_hidden_layers=c.num_hidden_layers, image_size=c.image_size, patch_size=c.patch_size)
    img = c.image_size
    model = CLIPVisionModel(cfg).eval()
    x = torch.randn(batch, 3, img, img)
    with torch.inference_mode():
        model(pixel_values=x)
        model(pixel_values=x)
        ts = []
        for _ in range(runs):
            t = CLOCK()
            model(pixel_values=x)
            ts.append(CLOCK() - t)
    return float(np.median(ts))


CLOCK = time.perf_counter
THREADS = 2


def main():
    global CLOCK, THREADS
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="b16", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--torch", action="store_true", help="also time torch eager/sdpa")
    ap.add_argument("--cpu-time", action="store_true",
                    help="1 thread, process CPU time (robust when other jobs share the cores)")
    args = ap.parse_args()
    if args.cpu_time:
        import os

        CLOCK, THREADS = time.process_time, 1
        os.environ["TVM_NUM_THREADS"] = "1"
    mod, params, img = build_module(args.model)
    ex, ct = compile_mod(mod)
    print(f"{args.model}: compile {ct:.1f} s")
    pnp = random_params(params)
    for b in args.batch:
        t, _, _ = time_tvm(ex, pnp, img, b, args.runs)
        line = f"{args.model} batch {b}: tvm {t*1e3:.1f} ms"
        if args.torch:
            for impl in ("eager", "sdpa"):
                tt = torch_time(args.model, b, impl, args.runs)
                line += f" | torch {impl} {tt*1e3:.1f} ms"
        print(line, flush=True)


if __name__ == "__main__":
    main()
