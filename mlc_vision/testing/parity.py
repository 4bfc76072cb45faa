"""The parity bounds and the one comparison every test uses (and ``scripts/gpu_check.py``).

Bounds sit a few times above what the suite measures (``pytest --parity-report``
prints every comparison's figures), so that a real defect cannot hide under them:

* fp32: max abs error <= ``FP32_REL_MAX_ERR`` x max|ref| and cosine >= 0.99999;
* fp16 / bf16 against the fp32 reference: cosine >= 0.9999, max abs error
  <= a per-dtype fraction of max|ref|, and the output's norm within
  ``SCALE_TOLERANCE`` of the reference's (rounding noise moves the norm only
  at second order, a constant scale error moves it at first order: an output
  scaled by 1.01 fails).

Every random reference checkpoint has every parameter randomized
(:func:`randomize_all`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Bounds, each beside the worst figure the suite measures (``--parity-report``; tiny towers,
# projectors and one real-width layer per family, CPU library against torch):
# fp32 max|err|/max|ref|: measured <= 2.1e-6 (the EVA E/14-width layer), tiny towers <= 1e-6;
# presets at full depth (make test-slow) <= 1.5e-6, the native-resolution Qwen towers (32 layers) <= 3.9e-6
FP32_REL_MAX_ERR = 1e-5
FP32_MIN_COS = 0.99999  # measured 1 - cos < 1e-8
LOW_PRECISION_MIN_COS = 0.9999  # fp16 measured >= 0.99999, bf16 >= 0.999986
# max|err|/max|ref| against the fp32 reference: fp16 measured <= 7.2e-3 (InternViT-6B-width layer);
# bf16 (CPU: bf16 matmuls, the rest in fp32) measured <= 4.7e-3 (tiny CLIP through the CLI)
LOW_PRECISION_REL_MAX_ERR = {"float16": 1.5e-2, "bfloat16": 2e-2}
# |norm(ours) / norm(ref) - 1|: fp16 measured <= 3.1e-4, bf16 <= 2.2e-4; a 1.01 scale error gives 1e-2
SCALE_TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-3}


@dataclass(frozen=True)
class Measured:
    """One comparison's figures, kept for ``pytest --parity-report``."""

    what: str
    dtype: str
    rel_max_err: float
    cosine: float
    norm_ratio: float

    def line(self) -> str:
        return (f"{self.dtype:<8} max|err|/max|ref| {self.rel_max_err:.2e}  cosine {self.cosine:.8f}  "
                f"norm ratio {self.norm_ratio:.6f}  {self.what}")


MEASURED: list[Measured] = []


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def measure(ours, ref, what: str = "output", dtype: str = "float32") -> Measured:
    """The figures ``assert_close`` bounds (recorded for ``--parity-report``)."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    assert ours.size > 0, f"{what}: empty output"
    scale = float(np.abs(ref).max()) + 1e-30
    result = Measured(
        what, dtype, float(np.abs(ours - ref).max()) / scale, cosine(ours, ref),
        float(np.linalg.norm(ours) / (np.linalg.norm(ref) + 1e-30)),
    )
    MEASURED.append(result)
    return result


def failures(m: Measured, rel_max_err: float | None = None) -> list[str]:
    """The bounds ``m`` breaks (empty when it passes). NaNs break every bound."""
    if m.dtype == "float32":
        bound, min_cos = FP32_REL_MAX_ERR, FP32_MIN_COS
    else:
        bound, min_cos = LOW_PRECISION_REL_MAX_ERR[m.dtype], LOW_PRECISION_MIN_COS
    bound = bound if rel_max_err is None else rel_max_err
    broken = []
    if not m.rel_max_err <= bound:
        broken.append(f"max|err|/max|ref| {m.rel_max_err:.3g} > {bound:g}")
    if not m.cosine >= min_cos:
        broken.append(f"cosine {m.cosine:.8f} < {min_cos}")
    if not abs(m.norm_ratio - 1) <= SCALE_TOLERANCE[m.dtype]:
        broken.append(f"norm(ours)/norm(ref) {m.norm_ratio:.6f} is off by more than {SCALE_TOLERANCE[m.dtype]:g}")
    return broken


def assert_close(ours, ref, what: str = "output", dtype: str = "float32", rel_max_err: float | None = None) -> None:
    """``ours`` (a library compiled in ``dtype``) against the fp32 reference ``ref``.

    ``rel_max_err`` overrides the dtype's max-error bound where one test needs
    another (say why beside the call).
    """
    broken = failures(measure(ours, ref, what, dtype), rel_max_err)
    assert not broken, f"{what} ({dtype}): " + "; ".join(broken)


def assert_fp32_close(ours, ref, what: str = "output", rel_max_err: float | None = None) -> None:
    assert_close(ours, ref, what, "float32", rel_max_err)


def assert_fp16_close(ours, ref32, what: str = "output") -> None:
    assert_close(ours, ref32, what, "float16")


def assert_all_close(ours, refs, what: str, dtype: str = "float32") -> None:
    """Every hidden state: the same count (a short or empty tuple fails), then each one."""
    ours, refs = list(ours), list(refs)
    assert len(ours) == len(refs) > 0, f"{what}: {len(ours)} outputs, the reference has {len(refs)}"
    for i, (a, ref) in enumerate(zip(ours, refs, strict=True)):
        assert_close(a, ref, f"{what}[{i}]", dtype)


def randomize_all(model, seed: int):
    """Every parameter of ``model`` random and non-trivial, in place; returns the model in eval mode.

    Init leaves biases at 0, norms at 1/0, class tokens and layer scales
    constant and some heads near zero: each would hide a swap (q/k bias
    slices, weight/bias of a norm, ls1/ls2). Norm weights (1-D ``weight``)
    become 1 + 0.2 n, other 1-D and 0-D parameters (biases, tokens, layer
    scales) 0.2 n, and matrices/kernels n / sqrt(fan_in) for O(1) activations.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim >= 2:
                value = noise / float(np.sqrt(param[0].numel()))
            elif name.endswith("weight"):
                value = 1 + 0.2 * noise
            else:
                value = 0.2 * noise
            param.copy_(value.to(param.dtype))
    return model.eval()
