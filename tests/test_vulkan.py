"""Vulkan: the PyPI TVM wheel has no SPIR-V codegen (no ``target.build.vulkan``).

* Always: ``mlc-vision compile --target vulkan`` with such a TVM fails in one
  line that names Vulkan and what to install, exit code 1, nothing written.
* When a Vulkan-enabled TVM wheel is put in ``../shared/tvm-vulkan/`` (beside
  the repo), a throwaway venv gets that wheel, the pinned ffi, numpy and this
  project (``--no-deps``); the tiny CLIP model is compiled for ``vulkan`` there,
  run on Mesa's lavapipe (CPU Vulkan driver, Debian ``mesa-vulkan-drivers``) and
  compared with our CPU library at the fp32 parity tolerances. The test never
  installs system packages: without lavapipe it skips and says so.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlc_vision.cli import main
from parity import assert_fp32_close

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO.parent / "shared" / "tvm-vulkan"
LAVAPIPE_ICDS = "/usr/share/vulkan/icd.d/lvp_icd*.json"
FFI_PIN = "apache-tvm-ffi==0.1.14.post1"


def _has_vulkan_codegen() -> bool:
    import tvm_ffi

    return tvm_ffi.get_global_func("target.build.vulkan", allow_missing=True) is not None


@pytest.mark.skipif(_has_vulkan_codegen(), reason="this TVM has Vulkan codegen")
def test_compile_vulkan_without_codegen_is_one_line(tmp_path, capsys):
    out = tmp_path / "clip.so"
    code = main(["compile", "-m", "clip-vit-base-patch16", "-t", "vulkan", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert "Vulkan" in err and "USE_VULKAN=ON" in err, err
    assert list(tmp_path.iterdir()) == []


# Runs inside the Vulkan venv: tiny CLIP, compiled for vulkan and cpu, same random params.
CHILD = r"""
import dataclasses, json, sys
from pathlib import Path
import numpy as np, tvm
from tvm import relax
from mlc_vision.compiler.export import build_library
from mlc_vision.compiler.module import build_module
from mlc_vision.config import load_preset

out = Path(sys.argv[1])
config = dataclasses.replace(
    load_preset("clip-vit-base-patch16"), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, image_size=30, patch_size=8, select_layer=-1, feature="cls_patch",
)
rng = np.random.default_rng(0)
pixels = rng.standard_normal((2, 3, 30, 30)).astype("float32")
results, params = {}, None
for target, dev in (("cpu", tvm.cpu()), ("vulkan", tvm.vulkan())):
    built = build_module(config, "float32", target)
    if params is None:
        params = [(rng.standard_normal(p["shape"]) * 0.1).astype("float32") for p in built.metadata["params"]]
    lib = build_library(built.mod, target, out / f"clip-{target}.so", metadata=built.metadata)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), dev)
    y = vm["encode"](tvm.runtime.tensor(pixels, dev), [tvm.runtime.tensor(p, dev) for p in params])
    np.save(out / f"{target}.npy", y.numpy())
print(json.dumps({"device": tvm.vulkan().exist}))
"""


def _vulkan_wheel() -> Path | None:
    wheels = sorted(WHEEL_DIR.glob("*.whl"))
    return wheels[-1] if wheels else None


def _run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _vulkan_venv(root: Path, wheel: Path) -> Path:
    """A separate venv with the Vulkan TVM wheel (the test's own venv keeps the PyPI one)."""
    _run([sys.executable, "-m", "venv", root])
    python = root / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", wheel, FFI_PIN, "numpy"], timeout=900)
    _run([python, "-m", "pip", "install", "-q", "--no-deps", REPO], timeout=600)
    return python


def test_vulkan_on_lavapipe_matches_cpu(tmp_path):
    wheel = _vulkan_wheel()
    if wheel is None:
        pytest.skip(f"no Vulkan-enabled TVM wheel in {WHEEL_DIR} (the PyPI wheel has no SPIR-V codegen)")
    icds = glob.glob(LAVAPIPE_ICDS)
    if not icds:
        pytest.skip(f"Mesa lavapipe not installed ({LAVAPIPE_ICDS} absent): apt-get install mesa-vulkan-drivers")
    python = _vulkan_venv(tmp_path / "venv", wheel)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, VK_ICD_FILENAMES=icds[0], VK_DRIVER_FILES=icds[0])
    proc = _run([python, "-c", CHILD, out], env=env, timeout=900, cwd=tmp_path)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["device"], "lavapipe device not found"
    assert_fp32_close(np.load(out / "vulkan.npy"), np.load(out / "cpu.npy"), "vulkan encode vs cpu library")
