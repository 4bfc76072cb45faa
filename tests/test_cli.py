"""The CLI end to end (compile -> convert -> run -> inspect) and its errors:
every bad input gives one line naming the culprit, a non-zero exit, and
nothing at the output path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from mlc_vision.cli import main
from parity import assert_fp32_close, randomize_all

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-ckpt")
    model = randomize_all(CLIPVisionModel(CLIPVisionConfig(**TINY)), seed=0)
    model.save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def built(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-out")
    lib, params = root / "clip.so", root / "params"
    assert main(["compile", "--model", str(checkpoint), "--target", "cpu", "--select-layer", "-2", "-o", str(lib)]) == 0
    assert main(["convert", "--model", str(checkpoint), "-o", str(params)]) == 0
    return lib, params


def test_round_trip_image_equals_transformers(built, checkpoint, tmp_path, capsys):
    lib, params = built
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 61, 3), dtype=np.uint8))
    image.save(tmp_path / "cat.png")
    code, out, err = run_cli(capsys, "run", "--lib", lib, "--params", params, "--image", tmp_path / "cat.png", "-o", tmp_path / "f.npy")
    assert code == 0, err
    feats = np.load(tmp_path / "f.npy")
    processor = CLIPImageProcessor.from_pretrained(checkpoint)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    model = CLIPVisionModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        ref = model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
    assert feats.shape == ref.shape == (1, 16, 64)
    assert_fp32_close(feats, ref, "mlc-vision run --image")


def test_run_pixel_values_and_inspect(built, tmp_path, capsys):
    lib, params = built
    pixels = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype("float32")
    np.save(tmp_path / "px.npy", pixels)
    code, _, err = run_cli(capsys, "run", "--lib", lib, "--params", params, "--pixel-values", tmp_path / "px.npy", "-o", tmp_path / "f.npy")
    assert code == 0, err
    assert np.load(tmp_path / "f.npy").shape == (3, 16, 64)
    code, out, _ = run_cli(capsys, "inspect", lib)
    meta = json.loads(out)
    assert meta == json.loads(Path(f"{lib}.json").read_text())
    assert (meta["num_tokens"], meta["output_width"], meta["select_layer"], meta["feature"]) == (16, 64, -2, "patch")
    assert meta["preprocess"]["mean"] == list(CLIPImageProcessor().image_mean)
    assert [p["name"] for p in meta["params"]][:2] == ["embeddings.class_embedding", "embeddings.patch_embedding.weight"]


def test_run_and_inspect_with_runtime_only_tvm(built, tmp_path, capsys):
    """`run` and `inspect` load with TVM's runtime alone (a deployment box, scripts/gpu_check.py)."""
    lib, params = built
    pixels = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype("float32")
    np.save(tmp_path / "px.npy", pixels)
    assert run_cli(capsys, "run", "--lib", lib, "--params", params, "--pixel-values", tmp_path / "px.npy", "-o", tmp_path / "a.npy")[0] == 0
    script = (
        "import sys, tvm; from mlc_vision.cli import main; code = main(sys.argv[1:]); "
        "assert tvm.base._RUNTIME_ONLY and 'tvm.relax' not in sys.modules; sys.exit(code)"
    )
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    for args in (["run", "--lib", lib, "--params", params, "--pixel-values", tmp_path / "px.npy", "-o", tmp_path / "b.npy"], ["inspect", lib]):
        proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_console_script_help():
    exe = shutil.which("mlc-vision", path=str(Path(sys.executable).parent))
    assert exe, "the mlc-vision console script is not installed"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "compile" in proc.stdout and "convert" in proc.stdout


# ---- bad inputs -----------------------------------------------------------------------


def _broken_checkpoint(checkpoint: Path, dst: Path, edit) -> Path:
    shutil.copytree(checkpoint, dst)
    edit(dst)
    return dst


def _edit_weights(fn):
    def edit(path: Path):
        tensors = load_file(path / "model.safetensors")
        fn(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})

    return edit


def _drop(t):
    t.pop("encoder.layers.0.mlp.fc1.bias")


def _extra(t):
    t["encoder.layers.0.mlp.fc3.weight"] = np.zeros((4, 4), np.float32)


def _reshape(t):
    t["encoder.layers.1.self_attn.q_proj.weight"] = np.zeros((64, 63), np.float32)


def _truncate(path: Path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _unknown_family(path: Path):
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "resnet", ["ResNetModel"]
    (path / "config.json").write_text(json.dumps(cfg))


CONVERT_ERRORS = {
    "missing key": (_edit_weights(_drop), "encoder.layers.0.mlp.fc1.bias"),
    "extra key": (_edit_weights(_extra), "encoder.layers.0.mlp.fc3.weight"),
    "wrong shape": (_edit_weights(_reshape), "encoder.layers.1.self_attn.q_proj.weight"),
    "truncated safetensors": (_truncate, "model.safetensors"),
    "unknown family": (_unknown_family, "resnet"),
    "no config.json": (lambda p: (p / "config.json").unlink(), "config.json"),
}


@pytest.mark.parametrize("case", sorted(CONVERT_ERRORS))
def test_convert_errors_name_the_culprit(case, checkpoint, tmp_path, capsys):
    edit, culprit = CONVERT_ERRORS[case]
    ckpt = _broken_checkpoint(checkpoint, tmp_path / "ckpt", edit)
    out = tmp_path / "params"
    code, _, err = run_cli(capsys, "convert", "--model", ckpt, "-o", out)
    assert code != 0
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert culprit in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".params")], "temporary output left behind"


def test_missing_checkpoint_dir(tmp_path, capsys):
    code, _, err = run_cli(capsys, "convert", "--model", tmp_path / "nope", "-o", tmp_path / "out")
    assert code != 0 and str(tmp_path / "nope") in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_unknown_target(checkpoint, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compile", "--model", checkpoint, "--target", "tpu", "-o", tmp_path / "x.so")
    assert code != 0 and "tpu" in err and err.count("\n") == 1
    assert not (tmp_path / "x.so").exists()


def test_unknown_model(tmp_path, capsys):
    code, _, err = run_cli(capsys, "compile", "--model", "clip-vit-huge", "-o", tmp_path / "x.so")
    assert code != 0 and "clip-vit-huge" in err and err.count("\n") == 1


def test_lib_params_dtype_mismatch(built, checkpoint, tmp_path, capsys):
    lib, _ = built
    params16 = tmp_path / "p16"
    assert main(["convert", "--model", str(checkpoint), "-o", str(params16), "--dtype", "float16"]) == 0
    capsys.readouterr()
    np.save(tmp_path / "px.npy", np.zeros((1, 3, 32, 32), np.float32))
    code, _, err = run_cli(capsys, "run", "--lib", lib, "--params", params16, "--pixel-values", tmp_path / "px.npy", "-o", tmp_path / "f.npy")
    assert code != 0 and "float16" in err and "float32" in err and err.count("\n") == 1
    assert not (tmp_path / "f.npy").exists()


def test_lib_params_shape_mismatch(built, tmp_path, capsys):
    lib, _ = built
    other = dict(TINY, hidden_size=32, intermediate_size=64)
    randomize_all(CLIPVisionModel(CLIPVisionConfig(**other)), seed=1).save_pretrained(tmp_path / "other")
    assert main(["convert", "--model", str(tmp_path / "other"), "-o", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    np.save(tmp_path / "px.npy", np.zeros((1, 3, 32, 32), np.float32))
    code, _, err = run_cli(capsys, "run", "--lib", lib, "--params", tmp_path / "p", "--pixel-values", tmp_path / "px.npy", "-o", tmp_path / "f.npy")
    assert code != 0 and "shape" in err and "embeddings." in err and err.count("\n") == 1


def test_lib_params_family_mismatch(built, tmp_path, capsys):
    """SigLIP params with a CLIP library: refused before any call, naming both families."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    siglip = dict(TINY, num_hidden_layers=1)
    randomize_all(SiglipVisionModel(SiglipVisionConfig(**siglip)), seed=2).save_pretrained(tmp_path / "siglip")
    assert main(["convert", "--model", str(tmp_path / "siglip"), "-o", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    lib, _ = built
    np.save(tmp_path / "px.npy", np.zeros((1, 3, 32, 32), np.float32))
    code, _, err = run_cli(capsys, "run", "--lib", lib, "--params", tmp_path / "p", "--pixel-values", tmp_path / "px.npy", "-o", tmp_path / "f.npy")
    assert code == 1 and err.count("\n") == 1 and "'siglip'" in err and "'clip'" in err
    assert not (tmp_path / "f.npy").exists()


def test_unreadable_image(built, tmp_path, capsys):
    lib, params = built
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    code, _, err = run_cli(capsys, "run", "--lib", lib, "--params", params, "--image", tmp_path / "broken.jpg", "-o", tmp_path / "f.npy")
    assert code != 0 and "broken.jpg" in err and err.count("\n") == 1
    assert not (tmp_path / "f.npy").exists()


def test_wrong_pixel_shape(built, tmp_path, capsys):
    lib, params = built
    np.save(tmp_path / "px.npy", np.zeros((1, 3, 30, 32), np.float32))
    code, _, err = run_cli(capsys, "run", "--lib", lib, "--params", params, "--pixel-values", tmp_path / "px.npy", "-o", tmp_path / "f.npy")
    assert code != 0 and "[1, 3, 30, 32]" in err and err.count("\n") == 1


def test_encode_rgb8_equals_encode(built):
    """The uint8 entry normalizes inside the library exactly as the float path does outside."""
    from mlc_vision.runtime.encoder import VisionEncoder

    lib, params = built
    encoder = VisionEncoder(lib, params)
    rgb = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    via_rgb8 = encoder.encode_rgb8(rgb)
    via_float = encoder([Image.fromarray(image) for image in rgb])
    np.testing.assert_allclose(via_rgb8, via_float, rtol=1e-5, atol=1e-5)
