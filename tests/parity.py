"""Shared helpers for the parity tests: compile a config for the CPU, convert a
reference checkpoint with our own loader, run, and compare with the bounds of
:mod:`mlc_vision.testing.parity` (the one comparison every test uses).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import tvm

from mlc_vision.config import VisionConfig
from mlc_vision.testing.parity import (  # noqa: F401  (the tests import them from here)
    FP32_MIN_COS,
    FP32_REL_MAX_ERR,
    LOW_PRECISION_MIN_COS,
    LOW_PRECISION_REL_MAX_ERR,
    MEASURED,
    SCALE_TOLERANCE,
    Measured,
    assert_all_close,
    assert_close,
    assert_fp16_close,
    assert_fp32_close,
    cosine,
    failures,
    measure,
    randomize_all,
)
from mlc_vision.weights.convert import convert
from mlc_vision.weights.params import load_params


class CompiledCPU:
    """A CPU library built from a config, loaded with the params converted from a checkpoint.

    Its entries are called as :class:`VisionEncoder` calls them: an fp32 library with the C GEMM
    through the ``_prepacked`` twins on the params its ``prepack_params`` packed (``params``);
    ``loaded_params`` are the params as loaded, which the entries themselves take.
    """

    def __init__(self, config: VisionConfig, params_dir: Path, dtype: str, workdir: Path, hidden_states=True,
                 cpu: str | None = None):  # fmt: skip
        """``cpu``: LLVM's name of the CPU to build for (None: this one)."""
        # The compiler is imported here, where a library is built, not at import time.
        from tvm.runtime.vm import VirtualMachine

        from mlc_vision.compiler.export import build_library
        from mlc_vision.compiler.module import build_module

        built = build_module(config, dtype, "cpu", expose_hidden_states=hidden_states, cpu=cpu)
        digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        tag = f"{config.family}-{config.select_layer}-{config.feature}-{dtype}-{cpu or 'host'}-{digest}"
        lib_path = build_library(built.mod, "cpu", Path(workdir) / f"{tag}.so", metadata=built.metadata)
        self.metadata = built.metadata
        self.lib_path = lib_path
        self.dtype = dtype
        self.vm = VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
        self.load(params_dir)

    def load(self, params_dir: Path) -> None:
        """Load (or replace) the params from ``params_dir``, packed as a runtime packs them."""
        from mlc_vision.runtime.encoder import prepacked_params

        names = [p["name"] for p in self.metadata["params"]]
        self.loaded_params = load_params(params_dir, names, tvm.cpu())
        self.params = prepacked_params(self.vm, self.metadata, self.loaded_params)

    def entry(self, name: str):
        """The library function computing entry ``name`` on :attr:`params`."""
        from mlc_vision.runtime.encoder import entry_function

        return self.vm[entry_function(self.metadata, name)]

    def _input(self, pixel_values: np.ndarray):
        return tvm.runtime.tensor(np.ascontiguousarray(pixel_values.astype(self.dtype)), tvm.cpu())

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """The features (a library with several outputs, InternVL-14B's, returns them first)."""
        out = self.entry("encode")(self._input(pixel_values), self.params)
        features = out if isinstance(out, tvm.runtime.Tensor) else out[0]
        return features.numpy().astype(np.float32)

    def hidden_states(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        out = self.entry("hidden_states")(self._input(pixel_values), self.params)
        return [t.numpy().astype(np.float32) for t in out]


def convert_checkpoint(checkpoint_dir: Path, out_dir: Path, dtype: str | None = None) -> Path:
    return convert(checkpoint_dir, out_dir, dtype=dtype)
