"""Private dev benchmark for mlc_vision/compiler/cpu.py (not the product bench).

Builds a CLIP-like ViT with tvm.relax.frontend.nn at real shapes, compiles it with
the CPU pipeline and times it against torch eager (2 threads).

    python scripts/dev_cpu_bench.py --model b16 --batch 1 8
    python scripts/dev_cpu_bench.py --model l14 --batch 1 --check
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

SHAPES = {
    # name: (image, patch, hidden, heads, mlp, layers)
    "b16": (224, 16, 768, 12, 3072, 12),
    "l14": (336, 14, 1024, 16, 4096, 24),
    "tiny": (40, 8, 64, 4, 128, 2),
}


class Attn(nn.Module):
    def __init__(self, d, h, sdpa):
        self.h, self.d, self.sdpa = h, d, sdpa
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        b, s, _ = x.shape
        hd = self.d // self.h
        q = op.reshape(self.q_proj(x), [b, s, self.h, hd])
        k = op.reshape(self.k_proj(x), [b, s, self.h, hd])
        v = op.reshape(self.v_proj(x), [b, s, self.h, hd])
        if self.sdpa:
            o = op.scaled_dot_product_attention(q, k, v)
        else:
            q = op.permute_dims(q, [0, 2, 1, 3])
            k = op.permute_dims(k, [0, 2, 3, 1])
            v = op.permute_dims(v, [0, 2, 1, 3])
            a = op.softmax(op.matmul(q, k) * (hd**-0.5), axis=-1)
            o = op.permute_dims(op.matmul(a, v), [0, 2, 1, 3])
        return self.out_proj(op.reshape(o, [b, s, self.d]))


class Layer(nn.Module):
    def __init__(self, d, h, m, sdpa):
        self.layer_norm1 = nn.LayerNorm(d, eps=1e-5)
        self.self_attn = Attn(d, h, sdpa)
        self.layer_norm2 = nn.LayerNorm(d, eps=1e-5)
        self.fc1 = nn.Linear(d, m)
        self.fc2 = nn.Linear(m, d)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        y = self.fc1(self.layer_norm2(x))
        y = y * op.sigmoid(y * 1.702)
        return x + self.fc2(y)


class ViT(nn.Module):
    def __init__(self, img, p, d, h, m, L, sdpa=True):
        self.img, self.p, self.d = img, p, d
        self.n = (img // p) ** 2
        self.patch = nn.Linear(3 * p * p, d, bias=False)
        self.cls = nn.Parameter((d,))
        self.pos = nn.Parameter((self.n + 1, d))
        self.pre = nn.LayerNorm(d, eps=1e-5)
        self.layers = nn.ModuleList([Layer(d, h, m, sdpa) for _ in range(L)])

    def encode(self, px):
        b = px.shape[0]
        g = self.img // self.p
        x = op.reshape(px, [b, 3, g, self.p, g, self.p])
        x = op.permute_dims(x, [0, 2, 4, 1, 3, 5])
        x = op.reshape(x, [b, g * g, 3 * self.p * self.p])
        x = self.patch(x)
        cls = op.broadcast_to(op.reshape(self.cls, [1, 1, self.d]), [b, 1, self.d])
        x = op.concat([cls, x], dim=1) + self.pos
        x = self.pre(x)
        for layer in self.layers:
            x = layer(x)
        return x


def build_module(name, sdpa=True, dtype="float32"):
    img, p, d, h, m, L = SHAPES[name]
    model = ViT(img, p, d, h, m, L, sdpa)
    if dtype != "float32":
        model.to(dtype)
    spec = {
        "encode": {"px": nn.spec.Tensor(["batch", 3, img, img], dtype),
                   "$": {"param_mode": "packed", "effect_mode": "none"}},
    }
    mod, params = model.export_tvm(spec)
    bb = relax.BlockBuilder(mod)
    with bb.function("_metadata", []):
        bb.emit_func_output(relax.expr.String('{"dev": true}'))
    return bb.get(), params, (img, p, d, h, m, L)


def random_params(params, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for name, prm in params:
        shape = [int(s) for s in prm.shape]
        if name.endswith("weight") and len(shape) == 1:
            a = 1 + 0.1 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) * (0.02 if len(shape) == 2 else 0.1)
        out.append(a.astype(prm.dtype))
    return out


def compile_mod(mod, scheduled=True):
    from mlc_vision.compiler.cpu import cpu_relax_pipeline

    target = tvm.target.Target.from_device("cpu")
    t = time.time()
    if scheduled:
        ex = tvm.compile(mod, target, relax_pipeline=cpu_relax_pipeline(target))
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
    img, p, d, h, m, L = SHAPES[name]
    cfg = CLIPVisionConfig(hidden_size=d, intermediate_size=m, num_attention_heads=h, attn_implementation=impl,
                           num_hidden_layers=L, image_size=img, patch_size=p)
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
    ap.add_argument("--model", default="b16", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--torch", action="store_true", help="also time torch eager/sdpa")
    ap.add_argument("--eager-attn", action="store_true", help="matmul+softmax attention, not sdpa")
    ap.add_argument("--cpu-time", action="store_true",
                    help="1 thread, process CPU time (robust when other jobs share the cores)")
    args = ap.parse_args()
    if args.cpu_time:
        import os

        CLOCK, THREADS = time.process_time, 1
        os.environ["TVM_NUM_THREADS"] = "1"
    mod, params, (img, *_rest) = build_module(args.model, sdpa=not args.eager_attn)
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
