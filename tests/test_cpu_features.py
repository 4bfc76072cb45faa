"""``compile --cpu`` and the runtime's refusal of a library built for a CPU with
instructions this one lacks (one line, exit 1, instead of SIGILL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from mlc_vision.cli import main
from mlc_vision.compiler.targets import cpu_spec
from mlc_vision.errors import MlcVisionError
from mlc_vision.cpu_features import check_cpu_library, host_cpu_flags, missing_features

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)
#: CPUs to build for, one of which should need something this machine lacks
#: (AMX on an AMD machine, AVX-512 FP16 or AMX-FP16 on older Intel, Zen 5's VP2INTERSECT on Intel).
FOREIGN_CPUS = ("graniterapids", "sapphirerapids", "znver5", "x86-64-v4", "neoverse-v2")


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _metadata(features, triple="x86_64-linux-gnu"):
    return {"target": "cpu", "cpu": {"mcpu": "test-cpu", "triple": triple, "features": features}}


def test_missing_feature_is_refused_in_one_line():
    with pytest.raises(MlcVisionError) as err:
        check_cpu_library(_metadata(["avx2", "mlcv-test-feature"]), "lib.so", flags={"avx2", "fma"}, machine="x86_64")
    assert "mlcv-test-feature" in str(err.value) and "\n" not in str(err.value)
    assert "avx2," not in str(err.value)


def test_features_are_compared_by_their_cpuinfo_names():
    flags = {"avx512_bf16", "amx_tile", "sse4_2"}
    assert missing_features(["avx512bf16", "amx-tile", "sse4.2", "amx-bf16"], flags) == ["amx-bf16"]


def test_other_architecture_is_refused():
    with pytest.raises(MlcVisionError, match="aarch64 code"):
        check_cpu_library(_metadata(["neon"], triple="aarch64-linux-gnu"), "lib.so", flags=set(), machine="x86_64")


def test_default_build_runs_here():
    """The default (this machine's CPU) never needs a feature this machine lacks."""
    spec = cpu_spec()
    flags = host_cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    assert spec["features"] and missing_features(spec["features"], flags) == []


def test_unknown_cpu_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "compile", "-m", "clip-vit-base-patch16", "--cpu", "pentium-9000", "-o", tmp_path / "x.so")
    assert code == 1 and err.count("\n") == 1 and "unknown --cpu 'pentium-9000'" in err
    assert not (tmp_path / "x.so").exists()


def test_cpu_only_for_cpu_target(capsys, tmp_path):
    code, _, err = run_cli(capsys, "compile", "-m", "clip-vit-base-patch16", "-t", "vulkan", "--cpu", "znver4", "-o", tmp_path / "x.so")
    assert code == 1 and err.startswith("error:") and err.count("\n") == 1


def _foreign_cpu():
    flags = host_cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to compare with")
    for name in FOREIGN_CPUS:
        try:
            spec = cpu_spec(name)
        except MlcVisionError:
            continue
        if spec["triple"].startswith(("x86_64", "aarch64")) and missing_features(spec["features"], flags):
            try:
                from mlc_vision.compiler.targets import check_cpu_linkable

                check_cpu_linkable(spec)
            except MlcVisionError:
                continue
            return name, missing_features(spec["features"], flags)
    pytest.skip("this CPU has every feature of the CPUs tried")


def test_library_for_a_cpu_with_more_features_is_refused(capsys, tmp_path):
    name, missing = _foreign_cpu()
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    CLIPVisionModel(CLIPVisionConfig(**TINY)).eval().save_pretrained(ckpt)
    lib, params, pixels = tmp_path / "foreign.so", tmp_path / "params", tmp_path / "px.npy"
    code, out, err = run_cli(capsys, "compile", "-m", ckpt, "--cpu", name, "-o", lib)
    assert code == 0, err
    assert main(["convert", "-m", str(ckpt), "-o", str(params)]) == 0
    np.save(pixels, np.zeros((1, 3, 16, 16), dtype=np.float32))
    capsys.readouterr()
    code, _, err = run_cli(capsys, "run", "--lib", lib, "--params", params, "--pixel-values", pixels, "-o", tmp_path / "f.npy")
    assert code == 1 and err.startswith("error:") and err.count("\n") == 1, err
    assert f"--cpu {name}" in err and missing[0] in err
    assert not (tmp_path / "f.npy").exists()
