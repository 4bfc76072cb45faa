"""The runtime loads alone: under a runtime-only TVM, and without the compiler, the models or the converter.

Each check runs in a fresh interpreter, so what another test imported does
not count. The package graph of docs/internals.md is derived here from the
sources (static imports, including those inside functions) and compared.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlc_vision"

# What importing the runtime must not import. With the full TVM, ``import tvm``
# itself loads tvm.relax, so that one is checked under the runtime-only library.
OURS_FORBIDDEN = ("mlc_vision.compiler", "mlc_vision.models", "mlc_vision.checkpoint", "mlc_vision.weights.convert")
RUNTIME_ONLY_FORBIDDEN = OURS_FORBIDDEN + ("tvm.relax",)

# docs/internals.md, "Packages and the direction of imports" (errors.py and the
# package root are left out: everything imports errors, the root imports nothing eagerly).
DOCUMENTED = {
    "atomic": set(),
    "bench": {"bench_peers", "compiler", "config", "runtime", "testing", "weights.params"},
    "bench_peers": {"compiler"},
    "checkpoint": {"config", "models", "validate", "weights.reader"},
    "cli": {"atomic", "bench", "checkpoint", "compiler", "config", "runtime", "weights.convert"},
    "compiler": {"atomic", "config", "cpu_features", "models"},
    "config": {"validate"},
    "cpu_features": set(),
    "models": {"config"},
    "runtime": {"config", "cpu_features", "weights.integrity", "weights.params"},
    "testing": {"config"},
    "validate": set(),
    "weights.convert": {"checkpoint", "config", "models", "weights.params", "weights.reader"},
    "weights.integrity": {"weights.params"},
    "weights.params": {"atomic"},
    "weights.reader": set(),
}
SUBPACKAGES = ("checkpoint", "compiler", "models", "runtime", "testing")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)


PROBE = (
    "import json, sys; import mlc_vision.runtime.encoder, mlc_vision.runtime.preprocess; "
    "from mlc_vision import VisionEncoder; print(json.dumps(sorted(sys.modules)))"
)


@pytest.mark.parametrize(
    "env, forbidden",
    [({"TVM_USE_RUNTIME_LIB": "1"}, RUNTIME_ONLY_FORBIDDEN), ({}, OURS_FORBIDDEN)],
    ids=["runtime-only-tvm", "full-tvm"],
)
def test_runtime_imports_alone(env, forbidden):
    done = _python(PROBE, **env)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert "mlc_vision.runtime.encoder" in loaded and "tvm.runtime" in loaded  # the probe did import them
    bad = [name for name in loaded if name.startswith(forbidden)]
    assert not bad, f"importing the runtime imported {bad[:8]}"


def _unit(module: str) -> str | None:
    """The package of the docs' graph that a ``mlc_vision.*`` module belongs to."""
    parts = module.split(".")[1:]
    if not parts or parts[0] == "errors" or not _is_module(PACKAGE / parts[0]):
        return None  # errors.py, or a name of the package root (``from .. import __version__``)
    if parts[0] in SUBPACKAGES:
        return parts[0]
    if parts[0] == "weights":
        return "weights." + parts[1] if len(parts) > 1 else None
    return parts[0]


def _is_module(path: Path) -> bool:
    return path.is_dir() or path.with_suffix(".py").is_file()


def _imported(path: Path, module: str) -> set[str]:
    """Every ``mlc_vision`` module a source file imports, anywhere in it."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("mlc_vision")}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if node.level and not node.module:
                found |= {f"{target}.{alias.name}" for alias in node.names}
            elif target.startswith("mlc_vision"):
                found.add(target)
    return found


def test_package_graph_is_the_documented_one():
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        source = _unit(module)
        if source is None:
            continue
        targets = {_unit(name) for name in _imported(path, module)} - {None, source}
        graph.setdefault(source, set()).update(targets)
    assert graph == DOCUMENTED
