"""Measure convert's peak memory on a generated ~1 GiB CLIP-shaped checkpoint.

    python scripts/convert_memory.py [--gib 1.0] [--workdir /tmp/mlcv-mem] [--dtype float16]

Writes a CLIP vision checkpoint (config.json + model.safetensors, random
values, hidden 2048 / MLP 8192 so the largest tensor is 64 MiB in fp32),
then converts it in a fresh process and prints the peak RSS growth over the
imports (ru_maxrss) and tracemalloc's peak (numpy buffers are traced).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

HIDDEN, MLP, HEADS, PATCH, IMAGE = 2048, 8192, 16, 14, 224
LAYER_BYTES = 4 * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * MLP)


def write_checkpoint(path: Path, gib: float) -> None:
    """Stream a safetensors file tensor by tensor (so generating it stays small too)."""
    layers = max(1, math.ceil(gib * (1 << 30) / LAYER_BYTES))  # at least `gib`
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"], "hidden_size": HIDDEN,
        "intermediate_size": MLP, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "image_size": IMAGE, "patch_size": PATCH, "hidden_act": "quick_gelu", "projection_dim": 512,
    }))
    shapes = {
        "vision_model.embeddings.class_embedding": (HIDDEN,),
        "vision_model.embeddings.patch_embedding.weight": (HIDDEN, 3, PATCH, PATCH),
        "vision_model.embeddings.position_embedding.weight": ((IMAGE // PATCH) ** 2 + 1, HIDDEN),
    }
    for norm in ("pre_layrnorm", "post_layernorm"):
        shapes.update({f"vision_model.{norm}.weight": (HIDDEN,), f"vision_model.{norm}.bias": (HIDDEN,)})
    for i in range(layers):
        p = f"vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
            shapes[p + f"self_attn.{proj}.bias"] = (HIDDEN,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[p + f"{norm}.weight"] = (HIDDEN,)
            shapes[p + f"{norm}.bias"] = (HIDDEN,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (MLP, HIDDEN), (MLP,)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (HIDDEN, MLP), (HIDDEN,)
    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 4
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(path / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for shape in shapes.values():
            f.write(rng.standard_normal(shape, dtype=np.float32).tobytes())
    print(f"checkpoint: {path} ({offset / (1 << 30):.2f} GiB, {layers} layers, largest tensor "
          f"{HIDDEN * MLP * 4 / (1 << 20):.0f} MiB fp32)")


MEASURE = r"""
import json, resource, sys, time, tracemalloc
import tvm, mlc_vision.weights.convert as c, mlc_vision.models.clip  # imports are not the conversion
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
t = time.time()
c.convert(sys.argv[1], sys.argv[2], dtype=sys.argv[3] if sys.argv[3] != "keep" else None)
elapsed = time.time() - t
_, peak = tracemalloc.get_traced_memory()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"convert: {elapsed:.1f} s; tracemalloc peak {peak / 2**20:.1f} MiB; "
      f"ru_maxrss {rss / 1024:.0f} MiB (after imports {base / 1024:.0f} MiB, growth {(rss - base) / 1024:.0f} MiB)")
print("JSON", json.dumps({"seconds": round(elapsed, 1), "tracemalloc_peak_mib": round(peak / 2**20, 1),
                          "rss_after_imports_mib": round(base / 1024), "rss_growth_mib": round((rss - base) / 1024)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mlcv-mem"))
    parser.add_argument("--dtype", default="keep")
    parser.add_argument("--output", type=Path, default=Path("bench-results/convert_memory.json"))
    args = parser.parse_args()
    ckpt, out = args.workdir / "ckpt", args.workdir / "params"
    if not (ckpt / "model.safetensors").is_file():
        write_checkpoint(ckpt, args.gib)
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(ckpt), str(out), args.dtype],
                          check=True, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith("JSON ")))
    result = json.loads(next(line for line in lines if line.startswith("JSON "))[5:])
    largest_mib = HIDDEN * MLP * 4 / (1 << 20)
    result.update(
        checkpoint_gib=round((ckpt / "model.safetensors").stat().st_size / (1 << 30), 2),
        largest_tensor_mib=largest_mib,
        dtype=args.dtype,
        within_budget=result["rss_growth_mib"] <= largest_mib + 256,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"peak growth {result['rss_growth_mib']} MiB vs budget largest tensor + 256 = {largest_mib + 256:.0f} MiB "
          f"-> {'OK' if result['within_budget'] else 'OVER'}; wrote {args.output}")


if __name__ == "__main__":
    main()
