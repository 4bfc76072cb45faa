"""The CPU legalizations (compiler/passes/legalize_cpu.py) against the exact formulas.

Every activation a family can name (``models.layers.ACTIVATIONS``) and every
op the CPU legalize map overrides is compiled alone through the CPU pipeline
and compared, element by element, with its definition evaluated in float64.
The bounds sit a few times above what is measured (the figures beside them),
far below the gap between neighbouring formulas (erf vs tanh GELU: up to
4.7e-4), which the last test checks so the bounds stay meaningful.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from mlc_vision.compiler.passes.legalize_cpu import LEGALIZE_OVERRIDES
from mlc_vision.compiler.pipeline import relax_pipeline
from mlc_vision.models.layers import ACTIVATIONS, GATED_ACTIVATIONS

TARGET = tvm.target.Target.from_device("cpu")
# -12..12 covers the saturated tails; dense enough to hit the polynomial's worst points
POINTS = np.linspace(-12.0, 12.0, 4801)

_erf = np.vectorize(math.erf)


def gelu_erf(x):
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def quick_gelu(x):
    return x * sigmoid(1.702 * x)


# activation name (as a config spells it) -> its exact definition
EXACT_ACTIVATIONS = {
    "gelu": gelu_erf,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
}

def silu(x):
    return x * sigmoid(x)


# gated MLP name (hidden_act) -> the exact activation of its gate
EXACT_GATES = {"swiglu": silu}

# max |ours - exact| / max(1, |x|): absolute error, scaled where |x| > 1. (Relative error
# means nothing in GELU's negative tail, where the result underflows towards 0.)
# measured fp32: gelu 1.6e-7, tanh forms 1.5e-7, quick_gelu 1.2e-7, silu (swiglu gate) 1.4e-7 (4801 points in [-12, 12])
FP32_ABS_ERR = 1e-6
# fp16: the input and the result are rounded to fp16 and 1 + erf(..) is summed in fp16;
# measured: gelu 7.6e-4, tanh forms 7.6e-4, quick_gelu 9.3e-4, silu 9.4e-4 (the negative tails)
FP16_ABS_ERR = 4e-3


def scaled_abs_err(ours: np.ndarray, exact: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.abs(ours - exact) / np.maximum(1, np.abs(x))


class _Elementwise(nn.Module):
    def __init__(self, fn):
        self.fn = fn

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.fn(x)


def compile_elementwise(fn, dtype: str, shape=(POINTS.size,)):
    spec = {"forward": {"x": nn.spec.Tensor(list(shape), dtype), "$": {"param_mode": "none", "effect_mode": "none"}}}
    mod, _ = _Elementwise(fn).export_tvm(spec=spec)
    ex = tvm.compile(mod, TARGET, relax_pipeline=relax_pipeline("cpu", TARGET, "fused"))
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())

    def run(x: np.ndarray) -> np.ndarray:
        return vm["forward"](tvm.runtime.tensor(x.astype(dtype), tvm.cpu())).numpy().astype(np.float64)

    return run


def test_every_activation_has_an_exact_formula():
    assert sorted(EXACT_ACTIVATIONS) == sorted(ACTIVATIONS)
    assert sorted(EXACT_GATES) == sorted(GATED_ACTIVATIONS)


@pytest.mark.parametrize("dtype, bound", [("float32", FP32_ABS_ERR), ("float16", FP16_ABS_ERR)])
@pytest.mark.parametrize("name", sorted(EXACT_ACTIVATIONS))
def test_activation(name, dtype, bound):
    check_elementwise(ACTIVATIONS[name], EXACT_ACTIVATIONS[name], name, dtype, bound)


@pytest.mark.parametrize("dtype, bound", [("float32", FP32_ABS_ERR), ("float16", FP16_ABS_ERR)])
@pytest.mark.parametrize("name", sorted(EXACT_GATES))
def test_gate_activation(name, dtype, bound):
    check_elementwise(GATED_ACTIVATIONS[name], EXACT_GATES[name], f"{name} gate", dtype, bound)


def check_elementwise(ours_fn, exact, label: str, dtype: str, bound: float) -> None:
    """Our compiled activation against its exact float64 formula on POINTS."""
    x = POINTS.astype(dtype)
    ours = compile_elementwise(ours_fn, dtype)(x)
    x = x.astype(np.float64)
    err = scaled_abs_err(ours, exact(x), x)
    print(f"{label} {dtype}: max |err| / max(1, |x|) = {err.max():.2e}")
    assert err.max() <= bound, f"{label} {dtype}: {err.max():.3g} at x = {x[err.argmax()]}"


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# relax op (a key of LEGALIZE_OVERRIDES) -> (nn function, exact definition, input range, error measure)
EXACT_OPS = {
    "relax.nn.gelu": (lambda x: op.gelu(x), gelu_erf, 12.0, "scaled_abs"),
    "relax.nn.gelu_tanh": (lambda x: op.gelu(x, approximate="tanh"), gelu_tanh, 12.0, "scaled_abs"),
    "relax.sigmoid": (op.sigmoid, sigmoid, 30.0, "relative"),
    "relax.exp": (op.exp, np.exp, 80.0, "relative"),
    "relax.nn.softmax": (lambda x: op.softmax(x, axis=-1), _softmax, 30.0, "relative"),
}
# measured: gelu 1.5e-7, gelu_tanh 1.3e-7 (scaled absolute); sigmoid 1.3e-7, exp 7.3e-8, softmax 2.2e-6
# (relative; softmax's smallest outputs inherit the fp32 rounding of x - max(x), up to 60 here)
OP_BOUNDS = {"scaled_abs": FP32_ABS_ERR, "relative": 5e-6}


def test_every_override_is_tested():
    assert sorted(EXACT_OPS) == sorted(LEGALIZE_OVERRIDES)


@pytest.mark.parametrize("name", sorted(EXACT_OPS))
def test_legalized_op(name):
    """Each overridden op on a [37, 129] input (softmax along rows of a ragged width)."""
    fn, exact_fn, span, measure = EXACT_OPS[name]
    x = np.random.default_rng(0).uniform(-span, span, (37, 129)).astype(np.float32)
    ours = compile_elementwise(fn, "float32", x.shape)(x)
    x = x.astype(np.float64)
    exact = exact_fn(x)
    if measure == "relative":
        err = np.abs(ours - exact) / np.abs(exact)
    else:
        err = scaled_abs_err(ours, exact, x)
    print(f"{name}: max {measure} error {err.max():.2e}")
    assert err.max() <= OP_BOUNDS[measure], f"{name}: {measure} error {err.max():.3g}"


def test_bounds_tell_the_gelu_forms_apart():
    """The erf and tanh GELUs differ by far more than the bounds above: a swap cannot pass."""
    gap = np.abs(gelu_erf(POINTS) - gelu_tanh(POINTS)).max()
    assert gap > 100 * FP32_ABS_ERR
    assert np.abs(quick_gelu(POINTS) - gelu_erf(POINTS)).max() > 100 * FP32_ABS_ERR
