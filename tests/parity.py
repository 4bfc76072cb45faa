"""Shared helpers for the parity tests: compile a config for the CPU, convert a
reference checkpoint with our own loader, run, and compare with the tolerances
of the brief (fp32: max abs error <= 1e-4 x max|ref| and cosine >= 0.99999;
fp16: cosine >= 0.999 against the fp32 reference).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import tvm

from mlc_vision.config import VisionConfig
from mlc_vision.weights.convert import convert
from mlc_vision.weights.params import load_params

FP32_REL_MAX_ERR = 1e-4
FP32_MIN_COS = 0.99999
FP16_MIN_COS = 0.999


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def assert_fp32_close(ours, ref, what: str = "output") -> None:
    ours = np.asarray(ours, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    err = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    cos = cosine(ours, ref)
    assert err <= FP32_REL_MAX_ERR * scale, f"{what}: max abs err {err:.3g} > 1e-4 x {scale:.3g}"
    assert cos >= FP32_MIN_COS, f"{what}: cosine {cos:.7f} < {FP32_MIN_COS}"


def assert_fp16_close(ours, ref32, what: str = "output") -> None:
    ours = np.asarray(ours, dtype=np.float32)
    assert ours.shape == np.shape(ref32), f"{what}: shape {ours.shape} != reference {np.shape(ref32)}"
    assert np.isfinite(ours).all(), f"{what}: non-finite values in fp16 output"
    cos = cosine(ours, ref32)
    assert cos >= FP16_MIN_COS, f"{what}: fp16 cosine {cos:.5f} < {FP16_MIN_COS}"


class CompiledCPU:
    """A CPU library built from a config, loaded with the params converted from a checkpoint."""

    def __init__(self, config: VisionConfig, params_dir: Path, dtype: str, workdir: Path, hidden_states=True):
        # The compiler is imported here so that the rest of this file loads with a runtime-only
        # TVM (scripts/gpu_check.py uses the helpers on a machine with no TVM compiler).
        from tvm.runtime.vm import VirtualMachine

        from mlc_vision.compiler.export import build_library
        from mlc_vision.compiler.module import build_module

        built = build_module(config, dtype, "cpu", expose_hidden_states=hidden_states)
        digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        tag = f"{config.family}-{config.select_layer}-{config.feature}-{dtype}-{digest}"
        lib_path = build_library(built.mod, "cpu", Path(workdir) / f"{tag}.so", metadata=built.metadata)
        self.metadata = built.metadata
        self.dtype = dtype
        self.vm = VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
        names = [p["name"] for p in built.metadata["params"]]
        self.params = load_params(params_dir, names, tvm.cpu())

    def _input(self, pixel_values: np.ndarray):
        return tvm.runtime.tensor(np.ascontiguousarray(pixel_values.astype(self.dtype)), tvm.cpu())

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.vm["encode"](self._input(pixel_values), self.params).numpy().astype(np.float32)

    def hidden_states(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        out = self.vm["hidden_states"](self._input(pixel_values), self.params)
        return [t.numpy().astype(np.float32) for t in out]


def randomize_layer_norms(model) -> None:
    """Random init leaves LayerNorms at 1/0, which would hide a swapped weight and bias."""
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))


def convert_checkpoint(checkpoint_dir: Path, out_dir: Path, dtype: str | None = None) -> Path:
    return convert(checkpoint_dir, out_dir, dtype=dtype)
