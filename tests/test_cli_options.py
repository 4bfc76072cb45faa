"""Every CLI option and command the README lists, on a tiny random CLIP: what each
flag changes in the library (its metadata, its output) and that the numbers
still equal transformers' (fp32, fp16 and bf16 libraries; the uint8 entry;
the VisionEncoder properties; the `targets` and `bench` commands)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from mlc_vision import __version__
from mlc_vision.cli import main
from mlc_vision.compiler import targets as T
from mlc_vision.compiler.cuda_fatbin import fatbin_entries
from mlc_vision.config import PRESET_DIR
from mlc_vision.runtime.encoder import VisionEncoder
from parity import assert_close, assert_fp32_close, randomize_all

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
TOKENS = (32 // 8) ** 2


def cli(capsys, *args) -> str:
    """Run the CLI in-process; it must succeed. Returns its stdout."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-clip")
    model = randomize_all(CLIPVisionModel(CLIPVisionConfig(**TINY)), seed=21)
    model.save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    return model, root


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)


def reference_hidden(model, pixels: np.ndarray, **kwargs) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), output_hidden_states=True, **kwargs)
    return tuple(h.numpy() for h in out.hidden_states)


@pytest.fixture(scope="module")
def libraries(checkpoint, tmp_path_factory):
    """``libraries(dtype)``: (lib, params) compiled and converted through the CLI, once per dtype."""
    _, ckpt = checkpoint
    root = tmp_path_factory.mktemp("libs")
    cache = {}

    def get(dtype: str):
        if dtype not in cache:
            lib, params = root / f"clip-{dtype}.so", root / f"params-{dtype}"
            assert main(["compile", "-m", str(ckpt), "--dtype", dtype, "--select-layer", "-2", "-o", str(lib)]) == 0
            assert main(["convert", "-m", str(ckpt), "--dtype", dtype, "-o", str(params)]) == 0
            cache[dtype] = lib, params
        return cache[dtype]

    return get


# ---- dtypes end to end: compile --dtype, convert --dtype, run ------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_run_each_dtype_against_fp32_reference(dtype, checkpoint, libraries, pixels, tmp_path, capsys):
    model, _ = checkpoint
    lib, params = libraries(dtype)
    np.save(tmp_path / "px.npy", pixels)
    out = cli(capsys, "run", "--lib", lib, "--params", params, "--pixel-values", tmp_path / "px.npy", "-o", tmp_path / "f.npy")
    assert dtype in out
    features = np.load(tmp_path / "f.npy")
    assert features.dtype == (np.float32 if dtype == "bfloat16" else dtype)  # .npy has no bf16: widened exactly
    assert features.shape == (2, TOKENS, TINY["hidden_size"])
    assert_close(features.astype(np.float32), reference_hidden(model, pixels)[-2][:, 1:], f"mlc-vision run {dtype}", dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_vision_encoder_low_precision_images(dtype, checkpoint, libraries):
    """Images through VisionEncoder (our preprocess, then the library) against transformers' pipeline."""
    model, ckpt = checkpoint
    encoder = VisionEncoder(*libraries(dtype))
    images = [Image.fromarray(np.random.default_rng(s).integers(0, 256, (40 + 9 * s, 50, 3), dtype=np.uint8)) for s in range(2)]
    pixel_values = CLIPImageProcessor.from_pretrained(ckpt)(images=images, return_tensors="np")["pixel_values"]
    ours = encoder(images)
    assert str(ours.dtype) == dtype == encoder.dtype
    assert_close(ours.astype(np.float32), reference_hidden(model, pixel_values)[-2][:, 1:], f"VisionEncoder {dtype}", dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_encode_rgb8_against_reference(dtype, checkpoint, libraries):
    """The uint8 entry normalizes inside the library; fp16 libraries too."""
    model, _ = checkpoint
    encoder = VisionEncoder(*libraries(dtype))
    rgb = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    pre = encoder.metadata["preprocess"]
    normalized = (rgb * np.float32(pre["rescale_factor"]) - np.float32(pre["mean"])) / np.float32(pre["std"])
    pixel_values = np.ascontiguousarray(normalized.transpose(0, 3, 1, 2).astype(np.float32))
    expected = reference_hidden(model, pixel_values)[-2][:, 1:]
    assert_close(encoder.encode_rgb8(rgb).astype(np.float32), expected, f"encode_rgb8 {dtype}", dtype)


# ---- the VisionEncoder surface the README advertises ---------------------------------------------


def test_vision_encoder_properties(libraries):
    lib, params = libraries("float32")
    encoder = VisionEncoder(lib, params, device="cpu")
    assert (encoder.hidden_size, encoder.num_patches, encoder.image_size) == (TINY["hidden_size"], TOKENS, 32)
    assert (encoder.dtype, encoder.device, encoder.num_patches_per_side) == ("float32", "cpu", 4)
    assert encoder.dummy_feature.shape == (1, TINY["hidden_size"]) and not encoder.dummy_feature.any()
    assert encoder.config["num_hidden_layers"] == TINY["num_hidden_layers"]
    assert "clip" in repr(encoder) and f"[batch, {TOKENS}, {TINY['hidden_size']}]" in repr(encoder)


# ---- the metadata keys a chat runtime reads -------------------------------------------------------


def test_metadata_keys(libraries, capsys):
    lib, _ = libraries("float16")
    meta = json.loads(cli(capsys, "inspect", lib))
    assert meta["mlc_vision_version"] == __version__
    assert (meta["image_size"], meta["patch_size"], meta["num_patches"], meta["num_tokens"]) == (32, 8, TOKENS, TOKENS)
    assert (meta["dtype"], meta["target"], meta["attention"]) == ("float16", "cpu", "split")  # cpu fp16: split
    assert meta["preprocess"] == {**meta["preprocess"], "size": 32, "crop_size": 32, "resize": "shortest_edge"}
    encode = meta["entries"]["encode"]
    assert encode["inputs"][0]["shape"] == ["batch", 3, 32, 32] and encode["inputs"][0]["dtype"] == "float16"
    assert encode["output"] == {"shape": ["batch", TOKENS, TINY["hidden_size"]], "dtype": "float16"}
    assert meta["entries"]["encode_rgb8"]["inputs"][0] == {**meta["entries"]["encode_rgb8"]["inputs"][0],
                                                           "shape": ["batch", 32, 32, 3], "dtype": "uint8"}
    assert [p["dtype"] for p in meta["params"]] == ["float16"] * len(meta["params"])


# ---- compile options ---------------------------------------------------------------------------


def test_image_size_on_compile_and_convert(checkpoint, tmp_path, capsys):
    """--image-size 40 on both: a 5x5 grid, position embeddings interpolated like transformers'."""
    model, ckpt = checkpoint
    lib, params = tmp_path / "clip40.so", tmp_path / "p40"
    cli(capsys, "compile", "-m", ckpt, "--image-size", 40, "--feature", "cls_patch", "-o", lib)
    cli(capsys, "convert", "-m", ckpt, "--image-size", 40, "-o", params)
    encoder = VisionEncoder(lib, params)
    assert (encoder.image_size, encoder.num_patches) == (40, 26)
    x = np.random.default_rng(6).standard_normal((1, 3, 40, 40)).astype(np.float32)
    expected = reference_hidden(model, x, interpolate_pos_encoding=True)[-1]
    assert_fp32_close(encoder(x), expected, "--image-size 40 (cls_patch, last layer)")


@pytest.mark.parametrize("feature, tokens", [("cls_patch", TOKENS + 1), ("pooled", 1)])
def test_feature_option(feature, tokens, checkpoint, tmp_path, capsys):
    model, ckpt = checkpoint
    lib = tmp_path / f"{feature}.so"
    cli(capsys, "compile", "-m", ckpt, "--feature", feature, "--select-layer", "-1", "-o", lib)
    params = tmp_path / "p"
    cli(capsys, "convert", "-m", ckpt, "-o", params)
    x = np.random.default_rng(7).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ours = VisionEncoder(lib, params)(x)
    assert ours.shape == (2, tokens, TINY["hidden_size"])
    with torch.no_grad():
        out = model(torch.from_numpy(x), output_hidden_states=True)
    expected = out.hidden_states[-1].numpy() if feature == "cls_patch" else out.pooler_output.numpy()[:, None]
    assert_fp32_close(ours, expected, f"--feature {feature}")


def test_projector_options(checkpoint, tmp_path, capsys):
    """--projector / --projector-hidden-size put a projector of that width into the library."""
    _, ckpt = checkpoint
    lib = tmp_path / "proj.so"
    cli(capsys, "compile", "-m", ckpt, "--projector", "mlp2x_gelu", "--projector-hidden-size", 48, "-o", lib)
    meta = json.loads(Path(f"{lib}.json").read_text())
    assert (meta["output_width"], meta["projector"]["type"]) == (48, "mlp2x_gelu")
    names = {p["name"]: p["shape"] for p in meta["params"]}
    assert names["projector.linear_1.weight"] == [48, TINY["hidden_size"]] and names["projector.linear_2.weight"] == [48, 48]


def test_projector_hidden_size_is_required(checkpoint, tmp_path, capsys):
    _, ckpt = checkpoint
    code = main(["compile", "-m", str(ckpt), "--projector", "linear", "-o", str(tmp_path / "x.so")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "projector_hidden_size" in err and err.count("\n") == 1
    assert not (tmp_path / "x.so").exists()


def test_default_output_path(checkpoint, tmp_path, monkeypatch, capsys):
    """Without -o, compile writes dist/<checkpoint dir name>-<target>.so in the working directory."""
    _, ckpt = checkpoint
    monkeypatch.chdir(tmp_path)
    out = cli(capsys, "compile", "-m", ckpt)
    expected = Path("dist") / f"{ckpt.name}-cpu.so"
    assert expected.is_file() and Path(f"{expected}.json").is_file() and str(expected) in out


def test_arch_and_host_reach_the_target(checkpoint, tmp_path, capsys):
    """--arch / --host are checked against the target (one line, nothing written)."""
    _, ckpt = checkpoint
    for flag, value in (("--arch", "sm_86"), ("--host", "ios")):
        code = main(["compile", "-m", str(ckpt), flag, value, "-o", str(tmp_path / "x.so")])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and flag in err and err.count("\n") == 1
    code = main(["compile", "-m", str(ckpt), "--target", "cuda", "--arch", "sm_12", "-o", str(tmp_path / "x.so")])
    assert code == 1 and "sm_12" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # nvcc compiles every kernel of the library: the slowest test of this file by far
@pytest.mark.skipif(not T._probe("cuda")[0], reason="no CUDA build here (nvcc or codegen missing)")
def test_arch_option_picks_the_fatbin_archs(checkpoint, tmp_path, capsys):
    _, ckpt = checkpoint
    lib = tmp_path / "cuda.so"
    cli(capsys, "compile", "-m", ckpt, "--target", "cuda", "--arch", "sm_86", "-o", lib)
    entries = fatbin_entries(lib.read_bytes())
    assert ("sass", "sm_86") in entries and not any(arch == "sm_80" for _, arch in entries)
    assert json.loads(Path(f"{lib}.json").read_text())["dtype"] == "float16"  # GPU default


@pytest.mark.skipif(not T._probe("metal")[0], reason="no Metal build here")
@pytest.mark.parametrize("host, cpu_type", [("ios", 0x0100000C)])  # macos: the default host
def test_host_option_builds_metal_objects(host, cpu_type, checkpoint, tmp_path, capsys):
    """--host picks the Mach-O platform of the arm64 objects in the .tar (both arm64)."""
    _, ckpt = checkpoint
    lib = tmp_path / "metal.tar"
    cli(capsys, "compile", "-m", ckpt, "--target", "metal", "--host", host, "-o", lib)
    with tarfile.open(lib) as tar:
        objects = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".o")]
    assert objects and all(o[:4] == b"\xcf\xfa\xed\xfe" for o in objects)  # 64-bit Mach-O
    assert {int.from_bytes(o[4:8], "little") for o in objects} == {cpu_type}  # CPU_TYPE_ARM64
    assert json.loads(Path(f"{lib}.json").read_text())["target"] == "metal"


# ---- targets and bench commands -------------------------------------------------------------------


def test_targets_command(capsys):
    lines = cli(capsys, "targets").splitlines()
    assert [line.split()[0] for line in lines] == list(T.TARGETS)
    rows = {line.split()[0]: line.split()[1] for line in lines}
    assert rows["cpu"] == "yes" and set(rows.values()) <= {"yes", "no"}
    assert all(len(line.split(maxsplit=3)) == 4 for line in lines)  # name, yes/no, suffix, reason


@pytest.fixture
def tiny_preset(monkeypatch, tmp_path):
    """A presets dir holding one tiny CLIP preset (bench takes presets only)."""
    import mlc_vision.config as config_module

    preset = json.loads((PRESET_DIR / "clip-vit-base-patch16.json").read_text())
    preset.update({k: TINY[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "image_size", "patch_size")})
    preset["preprocess"].update(size=32, crop_size=32)
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "tiny-clip.json").write_text(json.dumps(preset))
    monkeypatch.setattr(config_module, "PRESET_DIR", presets)
    return "tiny-clip"


def test_bench_command(tiny_preset, tmp_path, capsys):
    out_dir = tmp_path / "bench"
    cli(capsys, "bench", "-m", tiny_preset, "--batch", "1,2", "--runs", 2, "--no-torch-compile", "-o", out_dir)
    report = json.loads((out_dir / "bench.json").read_text())
    assert report["runs"] == 2 and [(r["model"], r["batch"]) for r in report["rows"]] == [(tiny_preset, 1), (tiny_preset, 2)]
    for row in report["rows"]:
        assert row["tvm_ms"] > 0 and row["torch_eager_ms"] > 0 and row["torch_compile_ms"] is None
        assert row["layers"] == TINY["num_hidden_layers"] and row["tokens"] == TOKENS + 1
        # the FMA probe read before and after the row's calls; the % column divides by the best reading
        measured = report["machine"]["measured_fp32_gflops"]
        probes = [row["probe_before_gflops"], row["probe_after_gflops"]]
        if measured is None:  # off x86, no FMA or no C compiler
            assert probes == [None, None]
        else:
            assert all(p > 0 for p in probes)
            best = max(measured, *probes)
            assert row["pct_peak"] == pytest.approx(100 * row["tvm_gflops_per_s"] / best, rel=0.02, abs=0.1)
    table = (out_dir / "bench.md").read_text()
    assert f"| {tiny_preset} | 1 |" in table and "FMA probe before / after" in table
