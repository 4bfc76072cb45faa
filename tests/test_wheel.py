"""A non-editable install works: the wheel carries the presets, and `mlc-vision compile`
runs from a fresh virtual environment that has only the runtime dependencies.

The venv has no test extra (no torch, transformers, timm): what `pip install
mlc-vision` gives a user. Its packages come from the registry (pip's cache makes
a rerun quick); nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRESET = "clip-vit-base-patch16"


def _run(cmd, timeout, **kw):
    # No PYTHONPATH: a source tree on it would shadow (or, with its egg-info, stand in for) the installed wheel.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, REPO], timeout=600)
    (path,) = out.glob("mlc_vision-*.whl")
    return path


def test_wheel_ships_every_preset(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).stem for n in names if n.startswith("mlc_vision/presets/") and n.endswith(".json"))
    in_checkout = sorted(p.stem for p in (REPO / "mlc_vision" / "presets").glob("*.json"))
    assert shipped == in_checkout and PRESET in shipped


def test_compile_from_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], timeout=120)
    python, cli = venv / "bin" / "python", venv / "bin" / "mlc-vision"
    _run([python, "-m", "pip", "install", "-q", wheel], timeout=900)
    probe = "import importlib.util as u; print([m for m in ('torch', 'transformers', 'timm') if u.find_spec(m)])"
    assert _run([python, "-c", probe], timeout=60).stdout.strip() == "[]", "runtime deps pulled in a test-only package"

    out = tmp_path / "lib.so"
    # cwd outside the checkout: the installed package, not the source tree, must be imported.
    _run([cli, "compile", "--model", PRESET, "--target", "cpu", "-o", out], timeout=900, cwd=tmp_path)
    metadata = json.loads(Path(f"{out}.json").read_text())
    assert out.stat().st_size > 0
    assert (metadata["preset"], metadata["num_tokens"], metadata["output_width"]) == (PRESET, 197, 768)
