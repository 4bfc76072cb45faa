"""LLaVA-NeXT / OneVision anyres: pinpoint choice, tiles, packing and the packed sequence against transformers.

The reference is transformers' ``LlavaNextImageProcessor`` (tiles) and
``LlavaNextModel.get_image_features`` (tower, projector, ``pack_image_features``)
on a tiny random ``LlavaNextForConditionalGeneration`` saved by
``save_pretrained`` and converted by our loader. 32 px tiles of 8 px patches:
4x4 tokens per tile, pinpoints of 1x2 .. 3x1 tiles like the real 336 px ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
)
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution

from mlc_vision.compiler.export import build_library
from mlc_vision.compiler.module import build_module
from mlc_vision.checkpoint.tiling import anyres_tiling
from mlc_vision.config import IMAGE_NEWLINE_PARAM, Tiling
from mlc_vision.errors import MlcVisionError
from mlc_vision.checkpoint.resolve import resolve_config
from mlc_vision.runtime.encoder import VisionEncoder
from mlc_vision.runtime.preprocess import normalize
from mlc_vision.runtime.tiling import Grid, anyres_tiles, anyres_token_count, pack_anyres, select_best_resolution
from mlc_vision.weights.convert import convert
from parity import assert_fp32_close, randomize_all
from test_tiling import image

TILE = 32
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              image_size=TILE, patch_size=8)
LLM = dict(model_type="qwen2", hidden_size=48, intermediate_size=64, num_hidden_layers=1,
           num_attention_heads=4, num_key_value_heads=2, vocab_size=200)
# (height, width): wide, tall, square, extreme, and sizes whose unpad crops rows or columns
SIZES = [(40, 90), (90, 40), (50, 50), (20, 200), (70, 45), (33, 31), (64, 64)]


def processor() -> LlavaNextImageProcessor:
    return LlavaNextImageProcessor(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )


# ---- the pinpoint rule, the tiles and the packing (no tower) ------------------------------------


def test_best_resolution_equals_transformers():
    pinpoints = [tuple(p) for p in PINPOINTS] + [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    for height in range(1, 120, 3):
        for width in range(1, 120, 5):
            assert select_best_resolution(height, width, pinpoints) == hf_select_best_resolution(
                (height, width), pinpoints
            ), (height, width)


@pytest.mark.parametrize("size", SIZES)
def test_tiles_equal_transformers_processor(size):
    rgb = image(size, seed=sum(size))
    ref = processor()(images=Image.fromarray(rgb), return_tensors="np")
    pre = resolve_config("clip-vit-large-patch14-336").preprocess
    tiled = anyres_tiles(rgb, TILE, pre, [tuple(p) for p in PINPOINTS])
    ours = np.stack([normalize(tile, pre, "torchvision") for tile in tiled.tiles])
    np.testing.assert_array_equal(ours, ref["pixel_values"][0])
    assert tiled.base and tuple(ref["image_sizes"][0]) == size


@pytest.fixture(scope="module")
def reference_model():
    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**VISION), text_config=LLM, image_grid_pinpoints=PINPOINTS,
        image_token_index=150, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    return randomize_all(LlavaNextForConditionalGeneration(config), seed=1)


@pytest.mark.parametrize("size", SIZES)
def test_packing_equals_pack_image_features(reference_model, size):
    """Random tile features through both packers: the unpad crop and the newline rows agree exactly."""
    grid_h, grid_w = hf_select_best_resolution(size, PINPOINTS)
    grid = Grid(grid_h // TILE, grid_w // TILE)
    features = torch.randn(grid.count + 1, 16, LLM["hidden_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, lens = reference_model.model.pack_image_features(
            [features], torch.tensor([size]), "default", image_newline=reference_model.model.image_newline
        )
    newline = reference_model.model.image_newline.detach().numpy()
    ours = pack_anyres(features.numpy(), grid, size, newline)
    np.testing.assert_array_equal(ours, ref[0].numpy())
    assert anyres_token_count(grid, 16, size, newline=True) == len(ours) == int(lens[0])


# ---- the packed sequence from the compiled library ------------------------------------------------


@pytest.fixture(scope="module")
def anyres_library(reference_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-next")
    reference_model.save_pretrained(root / "ckpt")
    processor().save_pretrained(root / "ckpt")
    params = convert(root / "ckpt", root / "params")
    config = resolve_config(str(root / "ckpt"))
    assert config.tiling == Tiling(mode="anyres", grid_pinpoints=tuple(tuple(p) for p in PINPOINTS))
    assert (config.projector, config.select_layer, config.feature) == ("mlp2x_gelu", -2, "patch")
    built = build_module(config, "float32", "cpu")
    lib = build_library(built.mod, "cpu", root / "llava-next.so", metadata=built.metadata)
    return lib, params


def test_packed_features_equal_get_image_features(reference_model, anyres_library):
    lib, params = anyres_library
    encoder = VisionEncoder(lib, params)
    tiling = encoder.tiling
    assert tiling["image_newline"] == {"param": IMAGE_NEWLINE_PARAM, "shape": [LLM["hidden_size"]]}
    assert (tiling["tile_size"], tiling["tokens_per_tile"]) == (TILE, 16)
    images = [Image.fromarray(image(size, seed=i)) for i, size in enumerate(SIZES)]
    results = encoder.encode_tiles(images)
    inputs = processor()(images=images, return_tensors="pt")
    with torch.no_grad():
        expected = reference_model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output
    for size, result, ref in zip(SIZES, results, expected):
        assert result.base and result.features.shape[1:] == (16, LLM["hidden_size"])
        assert_fp32_close(result.packed, ref.numpy(), f"packed features of a {size} image")


def test_anyres_bad_requests_are_one_line(anyres_library):
    lib, params = anyres_library
    encoder = VisionEncoder(lib, params)
    with pytest.raises(MlcVisionError, match=r"grid 2x3 does not match the library: its anyres grids are 1x2, 2x1"):
        encoder.encode_tiles(image((40, 60)), grid=(2, 3))
    with pytest.raises(MlcVisionError, match="InternVL options"):
        encoder.encode_tiles(image((40, 60)), max_tiles=4)
    forced = encoder.encode_tiles(image((40, 60)), grid=(3, 1))
    assert forced.grid == Grid(3, 1) and forced.features.shape[0] == 4


def test_pinpoints_must_be_whole_tiles():
    pre = resolve_config("clip-vit-large-patch14-336").preprocess
    with pytest.raises(MlcVisionError, match=r"grid pinpoint \[336, 500\] is not a \[height, width\] multiple"):
        anyres_tiles(image((40, 60)), 336, pre, anyres_tiling({"image_grid_pinpoints": [[336, 500]]}).grid_pinpoints)
    with pytest.raises(MlcVisionError, match="image_grid_pinpoints must be a list"):
        anyres_tiling({"image_grid_pinpoints": "anyres"})


# ---- LLaVA-OneVision: anyres_max shrinks large token maps ---------------------------------------------

ONEVISION_PINPOINTS = [[TILE * r, TILE * c] for r in range(1, 4) for c in range(1, 4)]
SIGLIP = dict(VISION, model_type="siglip_vision_model", vision_use_head=False)


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    """A tiny LLaVA-OneVision (SigLIP tower, all 16 tokens per tile) with anyres_max_2, compiled and converted."""
    torch.manual_seed(1)
    config = LlavaOnevisionConfig(
        vision_config=SIGLIP, text_config=LLM, image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_aspect_ratio="anyres_max_2", image_token_index=150, video_token_index=151,
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    randomize_all(model, seed=1)
    root = tmp_path_factory.mktemp("onevision")
    model.save_pretrained(root / "ckpt")
    onevision_processor().save_pretrained(root / "ckpt")
    params = convert(root / "ckpt", root / "params")
    resolved = resolve_config(str(root / "ckpt"))
    assert resolved.tiling.anyres_max == 2 and resolved.projector == "mlp2x_gelu"
    built = build_module(resolved, "float32", "cpu")
    return model, build_library(built.mod, "cpu", root / "onevision.so", metadata=built.metadata), params


def onevision_processor() -> LlavaOnevisionImageProcessor:
    return LlavaOnevisionImageProcessor(size={"height": TILE, "width": TILE}, image_grid_pinpoints=ONEVISION_PINPOINTS)


@pytest.mark.parametrize("size", [(40, 90), (96, 96), (90, 33), (30, 30)])
def test_onevision_packed_features_equal_get_image_features(onevision, size):
    """Token maps of 6x12, 12x12 and 12x4 exceed 2 tiles' worth and are shrunk; a 1x1 grid's 4x4 is kept."""
    model, lib, params = onevision
    encoder = VisionEncoder(lib, params)
    rgb = Image.fromarray(image(size, seed=size[0]))
    ours = encoder.encode_tiles(rgb)
    inputs = onevision_processor()(images=rgb, return_tensors="pt")
    with torch.no_grad():
        ref = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output[0]
    assert_fp32_close(ours.packed, ref.numpy(), f"OneVision packed features of a {size} image")
    assert anyres_token_count(ours.grid, 16, size, newline=True, anyres_max=2) == len(ours.packed)
