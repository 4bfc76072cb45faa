"""InternVL dynamic tiles: the grid rule, the tiles and their features against transformers.

The reference is transformers' InternVL image processor (``GotOcr2ImageProcessor``
with ``crop_to_patches=True``; ``GotOcr2ImageProcessorPil`` for the Pillow
backend) and ``InternVLVisionModel`` on the tiles it makes. Tiles are small
(28 px for the pixels, the tiny tower's 56 px for the features) so every
aspect ratio of 1..12 tiles stays cheap.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GotOcr2ImageProcessor, GotOcr2ImageProcessorPil
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

from mlc_vision.cli import main
from mlc_vision.compiler.export import build_library
from mlc_vision.compiler.module import build_module
from mlc_vision.config import Preprocess, Tiling, load_preset
from mlc_vision.errors import MlcVisionError
from mlc_vision.models import intern_vit
from mlc_vision.checkpoint.resolve import resolve_config
from mlc_vision.runtime.encoder import VisionEncoder
from mlc_vision.runtime.preprocess import normalize
from mlc_vision.runtime.tiling import Grid, candidate_grids, choose_grid, internvl_tiles
from mlc_vision.weights.convert import convert
from parity import assert_fp32_close
from test_intern_vit import SMALL, STYLES, reference_model, save_checkpoint

TILE = 28
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
PROCESSORS = {"torchvision": GotOcr2ImageProcessor, "pil": GotOcr2ImageProcessorPil}

# (height, width) -> the grid the rule gives at 28 px tiles, 1..12 tiles
SHAPES = {
    "1x1": (30, 30),  # area below half of 2x2 tiles: the tie with 2x2 (same ratio) keeps 1x1
    "2x2 tie": (50, 50),  # same ratio, area above half of 2x2's: the tie goes to 2x2
    "1x12": (20, 300),
    "12x1": (300, 20),
    "2x3": (40, 60),
    "near tie 3x4|2x3": (36, 51),  # 51/36 lies between 4/3 and 3/2, a hair from the midpoint
    "near tie 4x3|3x2": (51, 36),
}


def processor(backend: str, min_tiles: int = 1, max_tiles: int = 12, size: int = TILE):
    return PROCESSORS[backend](
        size={"height": size, "width": size}, crop_to_patches=True, min_patches=min_tiles, max_patches=max_tiles,
        image_mean=IMAGENET["mean"], image_std=IMAGENET["std"],
    )


def preprocess_config(backend: str, size: int = TILE) -> Preprocess:
    return Preprocess(resize="exact", size=size, crop_size=None, resample="bicubic", backend=backend, **IMAGENET)


def image(shape, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: real-looking content that still exercises every filter tap."""
    height, width = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 64 * 4], axis=-1)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


# ---- the grid rule ----------------------------------------------------------------------------


@pytest.mark.parametrize("min_tiles, max_tiles", [(1, 12), (1, 6), (2, 2), (3, 9), (1, 1)])
def test_grid_choice_equals_transformers(min_tiles, max_tiles):
    """Every image size up to 64 x 64 px at 16 px tiles (ties of every kind occur) and some big ones."""
    sizes = [(h, w) for h in range(1, 65) for w in range(1, 65)]
    sizes += [(448, 448), (700, 700), (800, 1000), (1000, 800), (448, 5376), (5376, 448), (1080, 1920)]
    for height, width in sizes:
        tile = 16 if max(height, width) <= 64 else 448
        cols, rows = get_optimal_tiled_canvas((height, width), (tile, tile), min_tiles, max_tiles)
        assert choose_grid(height, width, tile, min_tiles, max_tiles) == Grid(rows, cols), (height, width)


def test_ties_go_to_more_tiles_only_for_big_images():
    # the same ratio (1:1) for 1x1, 2x2, 3x3: a 448 px image stays 1x1, 700 px gets 2x2 (not 3x3)
    assert choose_grid(448, 448, 448, 1, 12) == Grid(1, 1)
    assert choose_grid(700, 700, 448, 1, 12) == Grid(2, 2)
    # exactly between 1x2 and 2x1 (5:4 is 0.75 from both): the first visited (2 rows) unless the image is big
    assert choose_grid(4, 5, 448, 2, 2) == Grid(2, 1)
    assert choose_grid(800, 1000, 448, 2, 2) == Grid(1, 2)


def test_candidates_are_every_grid_in_range_by_count():
    grids = candidate_grids(1, 4)
    assert [g.count for g in grids] == sorted(g.count for g in grids)
    assert {(g.rows, g.cols) for g in grids} == {(r, c) for r in range(1, 5) for c in range(1, 5) if r * c <= 4}


# ---- the tiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", sorted(PROCESSORS))
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_tiles_equal_transformers_processor(backend, name):
    rgb = image(SHAPES[name], seed=len(name))
    ref = processor(backend)(images=Image.fromarray(rgb), return_tensors="np")
    pre = preprocess_config(backend)
    tiled = internvl_tiles(rgb, TILE, pre)
    ours = np.stack([normalize(tile, pre, backend) for tile in tiled.tiles])
    assert [len(ours)] == list(ref["num_patches"])
    assert ours.shape == ref["pixel_values"].shape
    # torchvision: bit-exact integer resize; Pillow: the same bytes, float rounding in the normalization
    np.testing.assert_allclose(ours, ref["pixel_values"], rtol=0, atol=0 if backend == "torchvision" else 1e-6)
    expected_grid = {"1x1": (1, 1), "2x2 tie": (2, 2), "1x12": (1, 12), "12x1": (12, 1), "2x3": (2, 3)}.get(name)
    if expected_grid:
        assert (tiled.grid.rows, tiled.grid.cols) == expected_grid
    assert tiled.thumbnail == (tiled.grid.count > 1)


@pytest.mark.parametrize("min_tiles, max_tiles", [(2, 2), (4, 6)])
def test_tiles_with_another_range_and_no_thumbnail(min_tiles, max_tiles):
    rgb = image((45, 56), seed=3)
    pre = preprocess_config("torchvision")
    ref = processor("torchvision", min_tiles, max_tiles)(images=Image.fromarray(rgb), return_tensors="np")
    tiled = internvl_tiles(rgb, TILE, pre, min_tiles=min_tiles, max_tiles=max_tiles)
    ours = np.stack([normalize(tile, pre, "torchvision") for tile in tiled.tiles])
    np.testing.assert_array_equal(ours, ref["pixel_values"])
    bare = internvl_tiles(rgb, TILE, pre, min_tiles=min_tiles, max_tiles=max_tiles, thumbnail=False)
    assert len(bare.tiles) == tiled.grid.count and not bare.thumbnail
    np.testing.assert_array_equal(bare.tiles, tiled.tiles[:-1])


@pytest.mark.parametrize("min_tiles, max_tiles", [(0, 12), (5, 4), (-1, 3)])
def test_tile_counts_out_of_range_are_one_line(min_tiles, max_tiles):
    with pytest.raises(MlcVisionError, match="tile counts out of range"):
        internvl_tiles(image((30, 40)), TILE, preprocess_config("pil"), min_tiles=min_tiles, max_tiles=max_tiles)


def test_a_grid_outside_the_range_is_refused():
    with pytest.raises(MlcVisionError, match=r"grid 3x5 \(15 tiles\) does not match the library: it takes 1..12"):
        internvl_tiles(image((30, 40)), TILE, preprocess_config("pil"), grid=Grid(3, 5))


# ---- where the tiling contract comes from ------------------------------------------------------


def test_chat_config_records_its_tiling():
    vision = dict(SMALL, model_type="intern_vit_6b", **STYLES["300m"])
    chat = {"model_type": "internvl_chat", "vision_config": vision, "llm_config": {"hidden_size": 32},
            "max_dynamic_patch": 6, "min_dynamic_patch": 2, "use_thumbnail": False, "dynamic_image_size": True}
    assert intern_vit.config_from_hf(chat).tiling == Tiling("internvl", 2, 6, False)
    assert intern_vit.config_from_hf(dict(chat, dynamic_image_size=False)).tiling is None
    assert intern_vit.config_from_hf(vision).tiling == Tiling("internvl", 1, 12, True)  # InternVL's defaults
    assert load_preset("internvit-300m-448px").tiling == Tiling("internvl", 1, 12, True)
    with pytest.raises(MlcVisionError, match="tile counts out of range"):
        intern_vit.config_from_hf(dict(chat, max_dynamic_patch=0))


# ---- features ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiled_tower(tmp_path_factory):
    """A tiny InternViT (56 px tiles), its torchvision-backend library and params, and the reference."""
    root = tmp_path_factory.mktemp("tiled-internvit")
    model = reference_model(STYLES["300m"], SMALL, seed=11)
    ckpt = save_checkpoint(model, STYLES["300m"], SMALL, root / "ckpt", chat=True)
    chat = json.loads((ckpt / "config.json").read_text())
    chat["max_dynamic_patch"] = 6
    (ckpt / "config.json").write_text(json.dumps(chat))
    params = convert(ckpt, root / "params", projector=False)
    config = resolve_config(str(ckpt), projector="none")
    built = build_module(config, "float32", "cpu")
    lib = build_library(built.mod, "cpu", root / "internvit.so", metadata=built.metadata)
    return model, lib, params


def test_features_of_each_tile_equal_the_tower_on_that_tile(tiled_tower):
    model, lib, params = tiled_tower
    encoder = VisionEncoder(lib, params)
    assert encoder.tiling["max_tiles"] == 6 and encoder.tiling["tokens_per_tile"] == 16
    size = SMALL["image_size"]
    images = [image((40, 170), seed=1), image((90, 60), seed=2), image((50, 50), seed=3)]
    results = encoder.encode_tiles([Image.fromarray(rgb) for rgb in images])
    for rgb, result in zip(images, results):
        ref = processor("torchvision", 1, 6, size=size)(images=Image.fromarray(rgb), return_tensors="np")
        assert result.features.shape == (ref["num_patches"][0], 16, SMALL["hidden_size"])
        cols, rows = get_optimal_tiled_canvas(rgb.shape[:2], (size, size), 1, 6)
        assert result.grid == Grid(rows, cols)
        with torch.no_grad():
            expected = model(torch.from_numpy(ref["pixel_values"])).last_hidden_state[:, 1:].numpy()
        for i, (ours, tower) in enumerate(zip(result.features, expected)):
            assert_fp32_close(ours, tower, f"{rgb.shape[:2]} tile {i}")
    one = encoder.encode_tiles(Image.fromarray(images[0]), max_tiles=2, thumbnail=False)
    assert one.grid == Grid(1, 2) and one.features.shape[0] == 2 and not one.thumbnail


def test_encoder_refuses_bad_tile_requests(tiled_tower):
    _, lib, params = tiled_tower
    encoder = VisionEncoder(lib, params)
    with pytest.raises(MlcVisionError, match="tile counts out of range"):
        encoder.encode_tiles(image((30, 30)), max_tiles=0)
    with pytest.raises(MlcVisionError, match="does not match the library"):
        encoder.encode_tiles(image((30, 30)), grid=(2, 4))  # 8 tiles, the library takes 1..6
    encoder.metadata = dict(encoder.metadata, tiling=None)
    with pytest.raises(MlcVisionError, match="has no tiling contract"):
        encoder.encode_tiles(image((30, 30)))


def test_cli_run_tiles_and_prints_the_grid(tiled_tower, tmp_path, capsys):
    _, lib, params = tiled_tower
    Image.fromarray(image((40, 170), seed=1)).save(tmp_path / "wide.png")
    Image.fromarray(image((50, 50), seed=3)).save(tmp_path / "square.png")
    args = ["run", "--lib", str(lib), "--params", str(params), "--image", str(tmp_path / "wide.png"),
            "--image", str(tmp_path / "square.png"), "--max-tiles", "4", "--no-thumbnail", "-o", str(tmp_path / "f.npy")]
    code = main(args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "wide.png: grid 1x4 -> 4 tiles" in out and "square.png: grid 1x1 -> 1 tiles" in out
    assert np.load(tmp_path / "f.npy").shape == (5, 16, SMALL["hidden_size"])
    code = main(args[:-2] + ["--min-tiles", "5", "-o", str(tmp_path / "g.npy")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "tile counts out of range" in err
    assert not (tmp_path / "g.npy").exists()


def test_inspect_shows_the_tiling_contract(tiled_tower, capsys):
    _, lib, _ = tiled_tower
    assert main(["inspect", str(lib)]) == 0
    tiling = json.loads(capsys.readouterr().out)["tiling"]
    assert (tiling["mode"], tiling["min_tiles"], tiling["max_tiles"], tiling["thumbnail"]) == ("internvl", 1, 6, True)
    assert (tiling["tile_size"], tiling["tokens_per_tile"]) == (SMALL["image_size"], 16)
    assert "thumbnail" in tiling["order"] and tiling["grid"].startswith("rows x cols")
