#!/usr/bin/env python
"""The whole path on this machine, offline: checkpoint -> compile -> convert -> run -> parity.

No weights can be downloaded here, so the checkpoint is a randomly initialized
CLIP ViT-B/16 saved by transformers itself (the real architecture and shapes
of openai/clip-vit-base-patch16). Each step is the `mlc-vision` command a user
types; the features are then compared with transformers on the same image.

    python scripts/demo.py [--workdir dist/demo] [--preset clip-vit-base-patch16]
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def sh(*args) -> None:
    cmd = [str(a) for a in args]
    print(f"$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"  ({time.perf_counter() - start:.1f} s)\n", flush=True)


def make_checkpoint(preset: str, path: Path) -> None:
    """A random-init checkpoint of the preset's architecture, saved by transformers."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from mlc_vision.config import load_preset

    c = load_preset(preset)
    torch.manual_seed(0)
    hf = CLIPVisionConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, image_size=c.image_size, patch_size=c.patch_size,
        projection_dim=c.projection_dim,
    )
    CLIPVisionModelWithProjection(hf).save_pretrained(path)
    size = {"shortest_edge": c.image_size}
    CLIPImageProcessor(size=size, crop_size={"height": c.image_size, "width": c.image_size}).save_pretrained(path)


def make_image(path: Path) -> None:
    from PIL import Image

    y, x = np.mgrid[0:375, 0:500]
    rgb = np.stack([x * 255 // 499, y * 255 // 374, (x + y) * 255 // 873], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def reference_features(checkpoint: Path, image: Path, select_layer: int) -> tuple[np.ndarray, float]:
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    processor = CLIPImageProcessor.from_pretrained(checkpoint)
    model = CLIPVisionModelWithProjection.from_pretrained(checkpoint).eval()
    pixels = processor(images=Image.open(image), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        model(pixels)
        start = time.perf_counter()
        out = model(pixels, output_hidden_states=True)
        spent = time.perf_counter() - start
    return out.hidden_states[select_layer][:, 1:].numpy(), spent


def our_latency(lib: Path, params: Path, image: Path) -> float:
    from mlc_vision import VisionEncoder

    encoder = VisionEncoder(lib, params)
    pixels = encoder.preprocess(str(image))
    encoder(pixels)
    start = time.perf_counter()
    encoder(pixels)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("dist/demo"))
    parser.add_argument("--preset", default="clip-vit-base-patch16")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).parent / "mlc-vision"
    ckpt, lib, params = work / "checkpoint", work / "encoder-cpu.so", work / "params"
    image, feats = work / "image.png", work / "features.npy"

    print(f"1. a random-init {args.preset} checkpoint, saved by transformers -> {ckpt}\n")
    if not (ckpt / "config.json").is_file():
        make_checkpoint(args.preset, ckpt)
    make_image(image)
    print("2. compile (config only: no weights, no GPU)")
    sh(exe, "compile", "--model", ckpt, "--target", "cpu", "--select-layer", -2, "--feature", "patch", "-o", lib)
    print("3. convert the weights")
    sh(exe, "convert", "--model", ckpt, "-o", params)
    print("4. run on an image")
    sh(exe, "run", "--lib", lib, "--params", params, "--image", image, "-o", feats)

    ours = np.load(feats)
    ref, torch_s = reference_features(ckpt, image, -2)
    err = float(np.abs(ours - ref).max())
    cos = float((ours.ravel() @ ref.ravel()) / (np.linalg.norm(ours) * np.linalg.norm(ref)))
    print("5. parity with transformers (CLIPImageProcessor + CLIPVisionModel, hidden_states[-2][:, 1:])")
    print(f"   features {list(ours.shape)}; max abs err {err:.2e} (max |ref| {np.abs(ref).max():.2f}); cosine {cos:.8f}")
    ours_s = our_latency(lib, params, image)
    print(f"   one image: ours {1000 * ours_s:.0f} ms, torch eager {1000 * torch_s:.0f} ms "
          f"(single runs; `mlc-vision bench` measures properly)")
    ok = err <= 1e-4 * float(np.abs(ref).max()) and cos >= 0.99999
    print("   PASS" if ok else "   FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
