"""Qwen2.5-VL and Qwen2-VL vision towers: parity with transformers, native resolution.

Each reference is a whole tiny ``Qwen2_5_VLForConditionalGeneration`` /
``Qwen2VLForConditionalGeneration`` (language model included, so convert must
read only the ``model.visual.*`` keys) with every parameter randomized, saved
with ``save_pretrained`` and converted by our ``convert``. One library call
takes several images of different grids (square, non-square, one whose merge
grid does not fill whole windows); every hidden state (in the window order
transformers returns them) and the merged output are compared in fp32 and fp16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from mlc_vision.checkpoint.resolve import resolve_config
from mlc_vision.errors import MlcVisionError
from mlc_vision.models import qwen2_vl, route
from mlc_vision.runtime.native import NativeGeometry, attention_inputs
from parity import CompiledCPU, assert_all_close, assert_fp16_close, assert_fp32_close, convert_checkpoint, randomize_all

TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
            vocab_size=64, bos_token_id=0, eos_token_id=1)  # fmt: skip
VISION = {
    # window 56 px = 2 x 2 merge groups; block 1 attends over the whole image
    "qwen2.5": dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, window_size=56, out_hidden_size=24, fullatt_block_indexes=[1]),
    "qwen2": dict(depth=2, embed_dim=32, hidden_size=24, mlp_ratio=2, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2),
}  # fmt: skip
MODELS = {
    "qwen2.5": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen2": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
}
# (t, grid_h, grid_w): square, non-square with partial windows (merge grid 3 x 5), a small one
GRIDS = [(1, 8, 8), (1, 6, 10), (1, 4, 2)]
PATCH = 3 * 2 * 14 * 14


def make_reference(variant: str, path, seed: int = 0):
    config_cls, model_cls = MODELS[variant]
    torch.manual_seed(seed)
    model = model_cls(config_cls(text_config=TEXT, vision_config=VISION[variant])).eval()
    randomize_all(model, seed + 1)
    model.save_pretrained(path)
    return model.model.visual


def reference_outputs(visual, patches: np.ndarray, grids) -> dict:
    with torch.no_grad():
        out = visual(torch.from_numpy(patches), grid_thw=torch.tensor(grids), output_hidden_states=True)
    return {"hidden_states": [h.numpy() for h in out.hidden_states], "merged": out.pooler_output.numpy()}


@pytest.fixture(scope="module")
def patches():
    count = sum(t * h * w for t, h, w in GRIDS)
    return np.random.default_rng(0).standard_normal((count, PATCH)).astype("float32")


@pytest.fixture(scope="module", params=list(MODELS))
def tower(request, tmp_path_factory, patches):
    root = tmp_path_factory.mktemp(f"qwen-{request.param}")
    visual = make_reference(request.param, root / "ckpt")
    params = {
        "float32": convert_checkpoint(root / "ckpt", root / "f32"),
        "float16": convert_checkpoint(root / "ckpt", root / "f16", dtype="float16"),
    }
    return {"name": request.param, "ckpt": root / "ckpt", "params": params, "ref": reference_outputs(visual, patches, GRIDS)}


def compiled(tower, tmp_path, dtype="float32") -> CompiledCPU:
    """The tower's library in ``dtype``, built once per module (the tests only read it)."""
    libs = tower.setdefault("libs", {})
    if dtype not in libs:
        libs[dtype] = CompiledCPU(resolve_config(str(tower["ckpt"])), tower["params"][dtype], dtype, tmp_path)
    return libs[dtype]


def call_inputs(lib: CompiledCPU, patches: np.ndarray, grids) -> list:
    """The entry's inputs in the order the metadata lists them."""
    geometry = NativeGeometry.from_metadata(lib.metadata["native_resolution"])
    arrays = {"patches": patches.astype(lib.dtype), **attention_inputs(grids, geometry)}
    return [arrays[spec["name"]] for spec in lib.metadata["entries"]["encode"]["inputs"]]


def run(lib: CompiledCPU, entry: str, inputs: list):
    import tvm

    args = [tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu()) for a in inputs]
    out = lib.entry(entry)(*args, lib.params)
    if entry == "hidden_states":
        return [t.numpy().astype(np.float32) for t in out]
    return out.numpy().astype(np.float32)


def test_config_from_checkpoint(tower):
    config = resolve_config(str(tower["ckpt"]))
    assert route({"model_type": "qwen2_5_vl_vision"}) is route({"model_type": "qwen2_vl_vision"}) is qwen2_vl.FAMILY
    assert config.family == "qwen2_vl" and config.hidden_size == 32 and config.merger_hidden_size == 24
    expected = ("rms_norm", "swiglu", 56, (1,)) if tower["name"] == "qwen2.5" else ("layer_norm", "quick_gelu", 0, ())
    assert (config.norm_type, config.hidden_act, config.window_size, config.fullatt_block_indexes) == expected


def test_every_hidden_state_and_merged_fp32(tower, patches, tmp_path):
    lib = compiled(tower, tmp_path)
    inputs = call_inputs(lib, patches, GRIDS)
    ref = tower["ref"]
    ours = run(lib, "hidden_states", inputs)
    assert len(ours) == VISION[tower["name"]]["depth"] + 1
    assert_all_close(ours, ref["hidden_states"], f"{tower['name']} hidden_states")
    merged = run(lib, "encode", inputs)
    assert merged.shape == (len(patches) // 4, 24)
    assert_fp32_close(merged, ref["merged"], f"{tower['name']} merged")


def test_every_hidden_state_and_merged_fp16(tower, patches, tmp_path):
    lib = compiled(tower, tmp_path, dtype="float16")
    inputs = call_inputs(lib, patches, GRIDS)
    assert_all_close(run(lib, "hidden_states", inputs), tower["ref"]["hidden_states"], f"{tower['name']} fp16 hidden_states", "float16")
    assert_fp16_close(run(lib, "encode", inputs), tower["ref"]["merged"], f"{tower['name']} fp16 merged")


def test_each_image_attends_only_within_itself(tower, patches, tmp_path):
    """One call with three images equals three calls with one image each."""
    lib = compiled(tower, tmp_path)
    together = run(lib, "encode", call_inputs(lib, patches, GRIDS))
    start, alone = 0, []
    for grid in GRIDS:
        count = grid[1] * grid[2]
        alone.append(run(lib, "encode", call_inputs(lib, patches[start : start + count], [grid])))
        start += count
    np.testing.assert_allclose(together, np.concatenate(alone), rtol=1e-5, atol=1e-5)


def test_grid_not_a_multiple_of_the_merge_size_is_one_line():
    geometry = NativeGeometry(patch_size=14, temporal_patch_size=2, merge_size=2, window_size=56)
    with pytest.raises(MlcVisionError, match=r"patch grid 5x4 is not a multiple of the merge size 2"):
        attention_inputs([(1, 5, 4)], geometry)


# ---- preprocessing and the runtime ---------------------------------------------------------


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: a resize changes every pixel, as on a photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (height + width)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


# odd sizes, extreme aspect ratios, one over the token budget and one under it
IMAGE_SIZES = [(97, 203), (300, 41), (640, 480), (20, 33), (1200, 900)]
BUDGET = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)


def qwen_processor():
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(size={"shortest_edge": BUDGET["min_pixels"], "longest_edge": BUDGET["max_pixels"]})


def native_preprocess_config():
    import dataclasses

    config = qwen2_vl.config_from_hf({"model_type": "qwen2_5_vl_vision"})
    return dataclasses.replace(config.preprocess, **BUDGET)


def test_preprocessing_equals_qwen2vl_image_processor():
    from mlc_vision.runtime.native import preprocess_native

    images = [photo_like(h, w, seed) for seed, (h, w) in enumerate(IMAGE_SIZES)]
    ref = qwen_processor()(images=images, return_tensors="np")
    geometry = NativeGeometry(patch_size=14, temporal_patch_size=2, merge_size=2, window_size=112)
    patches, grids = preprocess_native(images, native_preprocess_config(), geometry)
    assert [list(g) for g in grids] == ref["image_grid_thw"].tolist()
    assert max(t * h * w for t, h, w in grids) <= BUDGET["max_pixels"] // 14**2  # 1200x900 was resized down
    np.testing.assert_allclose(np.concatenate(patches), ref["pixel_values"], atol=1e-5)


def test_window_geometry_equals_transformers():
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    grids = [(1, 8, 8), (1, 6, 10), (1, 14, 6)]
    geometry = NativeGeometry(patch_size=14, temporal_patch_size=2, merge_size=2, window_size=112)
    ours = attention_inputs(grids, geometry)
    grid_thw = torch.tensor(grids)
    window_index, cu_window = get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=112, patch_size=14)
    np.testing.assert_array_equal(ours["window_index"], window_index.numpy())
    np.testing.assert_array_equal(ours["position_ids"], get_vision_position_ids(grid_thw, 2).numpy())
    in_window_order = ours["window_ids"].reshape(-1, 4)[ours["window_index"]].ravel()
    boundaries = np.flatnonzero(np.diff(in_window_order)) + 1
    np.testing.assert_array_equal(np.concatenate([[0], boundaries, [in_window_order.size]]), cu_window.numpy())


def test_vision_encoder_images_of_different_sizes_in_one_call(tmp_path_factory, tmp_path):
    """``VisionEncoder(images)`` on a Qwen2.5 library equals transformers' processor + visual tower.

    The processor's config is saved in the checkpoint: its pixel budget reaches the library's metadata.
    """
    from mlc_vision.runtime.encoder import VisionEncoder

    root = tmp_path_factory.mktemp("qwen-encoder")
    visual = make_reference("qwen2.5", root / "ckpt")
    qwen_processor().save_pretrained(root / "ckpt")
    config = resolve_config(str(root / "ckpt"))
    assert (config.preprocess.resize, config.preprocess.min_pixels, config.preprocess.max_pixels) == (
        "smart", BUDGET["min_pixels"], BUDGET["max_pixels"])
    lib = CompiledCPU(config, convert_checkpoint(root / "ckpt", root / "f32"), "float32", tmp_path, hidden_states=False)
    images = [photo_like(h, w, seed) for seed, (h, w) in enumerate(IMAGE_SIZES[:3])]
    ref = qwen_processor()(images=images, return_tensors="pt")
    with torch.no_grad():
        expected = visual(ref["pixel_values"], grid_thw=ref["image_grid_thw"]).pooler_output.numpy()
    encoder = VisionEncoder(lib.lib_path, root / "f32")
    out = encoder(images)
    assert [list(g) for g in out.grid_thw] == ref["image_grid_thw"].tolist()
    assert sum(out.tokens_per_image) == len(expected) and len(out.per_image()) == 3
    assert_fp32_close(out.features, expected, "VisionEncoder qwen2.5 merged")
    with pytest.raises(MlcVisionError, match=r"patch grid 3x4 is not a multiple of the merge size 2"):
        encoder.encode_patches(np.zeros((12, PATCH), np.float32), [(1, 3, 4)])
    with pytest.raises(MlcVisionError, match=r"num_patches|tokens: library .* encodes images at their own size"):
        encoder.num_patches
    check_cli_run(lib.lib_path, root / "f32", images[:2], out.features[: sum(out.tokens_per_image[:2])], tmp_path)


def check_cli_run(lib_path, params, images, expected, tmp_path) -> None:
    """``mlc-vision run --image a --image b`` prints each grid and saves both images' tokens."""
    from click.testing import CliRunner
    from PIL import Image

    from mlc_vision.cli import cli

    paths = []
    for i, image in enumerate(images):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        Image.fromarray(image).save(paths[-1])
    out = tmp_path / "features.npy"
    result = CliRunner().invoke(cli, ["run", "--lib", str(lib_path), "--params", str(params), *paths, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "0.png: grid_thw (1, " in result.output and "tokens" in result.output
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-6, atol=1e-6)


# one block at the released towers' widths (Qwen2.5-VL-7B, Qwen2-VL-2B), merger included
REAL_WIDTH = {
    "qwen2.5": dict(depth=1, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    window_size=112, fullatt_block_indexes=[]),
    "qwen2": dict(depth=1, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(REAL_WIDTH))
def test_real_width_layer(variant, tmp_path):
    config_cls, model_cls = MODELS[variant]
    torch.manual_seed(0)
    text = dict(TEXT, hidden_size=REAL_WIDTH[variant].get("out_hidden_size", 1536))
    model = model_cls(config_cls(text_config=text, vision_config=REAL_WIDTH[variant])).eval()
    randomize_all(model, 1)
    model.save_pretrained(tmp_path / "ckpt")
    grids = [(1, 16, 12), (1, 10, 6)]  # 16 x 12: whole 8 x 8 windows do not fit; two images in one call
    patches = np.random.default_rng(1).standard_normal((16 * 12 + 10 * 6, PATCH)).astype("float32")
    ref = reference_outputs(model.model.visual, patches, grids)
    tower = {"ckpt": tmp_path / "ckpt", "params": {"float32": convert_checkpoint(tmp_path / "ckpt", tmp_path / "f32")}}
    lib = compiled(tower, tmp_path)
    inputs = call_inputs(lib, patches, grids)
    assert_all_close(run(lib, "hidden_states", inputs), ref["hidden_states"], f"{variant} real width hidden_states")
    assert_fp32_close(run(lib, "encode", inputs), ref["merged"], f"{variant} real width merged")


def hf_vision_config(config) -> tuple[str, dict]:
    """The transformers vision config of one of our Qwen configs: (variant, fields)."""
    common = dict(depth=config.num_hidden_layers, num_heads=config.num_attention_heads, patch_size=config.patch_size,
                  spatial_merge_size=config.spatial_merge_size, temporal_patch_size=config.temporal_patch_size)  # fmt: skip
    if config.norm_type == "rms_norm":
        return "qwen2.5", dict(common, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                               out_hidden_size=config.merger_hidden_size, window_size=config.window_size,
                               fullatt_block_indexes=list(config.fullatt_block_indexes))  # fmt: skip
    return "qwen2", dict(common, embed_dim=config.hidden_size, hidden_size=config.merger_hidden_size,
                         mlp_ratio=config.intermediate_size // config.hidden_size)  # fmt: skip


def write_preset_reference(config, path, seed: int = 6):
    """A whole random VLM whose tower has ``config``'s architecture, saved at ``path``; returns its ``visual``."""
    variant, vision = hf_vision_config(config)
    config_cls, model_cls = MODELS[variant]
    torch.manual_seed(seed)
    model = model_cls(config_cls(text_config=TEXT, vision_config=vision)).eval()
    randomize_all(model, seed + 1)
    model.save_pretrained(path)
    return model.model.visual


def test_bench_native_rows(monkeypatch, tmp_path):
    """``bench`` on a (tiny) Qwen2.5 preset: rows per image size, ours and transformers on the same weights."""
    import json

    import mlc_vision.bench as bench
    import mlc_vision.config as config_module

    preset = json.loads((config_module.PRESET_DIR / "qwen2.5-vl-7b-vision.json").read_text())
    preset.update(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  merger_hidden_size=24, fullatt_block_indexes=[1])  # fmt: skip
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "tiny-qwen.json").write_text(json.dumps(preset))
    monkeypatch.setattr(config_module, "PRESET_DIR", presets)
    monkeypatch.setattr(bench, "NATIVE_IMAGE_SIZES", ((112, 112), (168, 84)))
    rows = bench.run_benchmark(["tiny-qwen"], "cpu", [1], 2, tmp_path / "out", torch_compile=False, peers=False, bf16=False)
    assert rows == []  # no fixed-size rows
    report = json.loads((tmp_path / "out" / "bench-native.json").read_text())
    assert [(r["image"], r["tokens"]) for r in report["rows"]] == [("112x112", 16), ("168x84", 18)]
    assert all(r["tvm_ms"] > 0 and r["torch_eager_ms"] > 0 and r["cosine_vs_torch"] > 0.99999 for r in report["rows"])
    assert "| tiny-qwen | 168x84 |" in (tmp_path / "out" / "bench-native.md").read_text()
