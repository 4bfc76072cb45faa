"""A preset's CPU library for the dev scripts: built as ``mlc-vision compile`` builds it, loaded in a VM,
with random params, and the params and entry a runtime calls (``entry_params``, ``entry_function``).

    from preset_library import build_preset_library
    lib = build_preset_library(config, "float32")
    params = lib.prepacked()                      # what VisionEncoder loads
    lib.encode()(pixels, params)                  # its encode (the _prepacked twin where packed)

Also the command line the A/B scripts share (:func:`ab_argument_parser`) and their random images
(:func:`random_pixels`).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np


def random_params(specs, seed=0):
    """fp32 arrays of the library's param ``specs``: norm scales near 1, matrices small."""
    rng = np.random.default_rng(seed)
    out = []
    for spec in specs:
        shape = spec["shape"]
        if spec["name"].endswith("weight") and len(shape) == 1:
            a = 1 + 0.1 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) * (0.02 if len(shape) == 2 else 0.1)
        out.append(a.astype("float32"))
    return out


def random_pixels(config, batch: int, seed: int = 1):
    """fp32 ``[batch, 3, size, size]`` standard-normal pixels for ``config``'s image size."""
    size = config.image_size
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype("float32")


def ab_argument_parser(pause_help: str) -> argparse.ArgumentParser:
    """A preset, ``--batch``, ``--runs`` (timed calls of each side) and ``--pause`` (seconds before a
    call; ``pause_help`` says which): what the A/B scripts take, for them to add their own."""
    ap = argparse.ArgumentParser()
    ap.add_argument("preset")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--pause", type=float, default=0.2, help=pause_help)
    return ap


@dataclasses.dataclass
class PresetLibrary:
    """A built library in a VM and its random params as loaded (``loaded``, in the library's dtype)."""

    metadata: dict
    vm: object
    loaded: list

    def prepacked(self):
        """The params as the entries take them: packed once where the library packs its weights."""
        from mlc_vision.runtime.encoder import prepacked_params

        return prepacked_params(self.vm, self.metadata, self.loaded)

    def encode(self, prepacked: bool = True):
        """``encode`` on :meth:`prepacked`'s params (its twin where the library has one), or on ``loaded``."""
        from mlc_vision.runtime.encoder import entry_function

        return self.vm[entry_function(self.metadata, "encode", prepacked)]


def build_preset_library(config, dtype: str = "float32") -> PresetLibrary:
    """``config``'s CPU library in ``dtype`` for this CPU, with random params."""
    import ml_dtypes  # noqa: F401 (numpy bfloat16)
    import tvm
    from tvm import relax

    from mlc_vision.compiler.export import build_library
    from mlc_vision.compiler.module import build_module

    built = build_module(config, dtype, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        library = build_library(built.mod, "cpu", Path(tmp) / "lib.so", metadata=built.metadata)
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    loaded = [tvm.runtime.tensor(a.astype(dtype), tvm.cpu()) for a in random_params(built.metadata["params"])]
    return PresetLibrary(built.metadata, vm, loaded)
