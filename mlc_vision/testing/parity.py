"""The parity tolerances of the brief and the measures they apply to.

fp32: max abs error <= 1e-4 x max|ref| and cosine >= 0.99999; fp16: cosine
>= 0.999 against the fp32 reference. One definition for the tests and for
the GPU check, so both hold our libraries to the same bar.
"""

from __future__ import annotations

import numpy as np

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


def randomize_layer_norms(model, seed: int = 1) -> None:
    """Random init leaves LayerNorms at 1/0, which would hide a swapped weight and bias."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
