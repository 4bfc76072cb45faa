"""CLIP parity: transformers CLIPVisionModel, random weights, saved with
save_pretrained and converted by our loader, against our CPU library."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from mlc_vision.checkpoint.resolve import resolve_config
from mlc_vision.weights.convert import convert
from parity import CompiledCPU, assert_all_close, assert_fp16_close, assert_fp32_close, convert_checkpoint, randomize_all

# Small, but with every feature of the real geometry: 30 px with 8 px patches
# drops trailing pixels like SigLIP's 384/14, and 3 layers give 4 hidden states.
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    image_size=30, patch_size=8, projection_dim=24,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = randomize_all(CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY)), seed=0)
    ckpt = tmp_path_factory.mktemp("clip-ckpt")
    model.save_pretrained(ckpt)
    return model, ckpt


@pytest.fixture(scope="module")
def params(reference, tmp_path_factory):
    _, ckpt = reference
    out = tmp_path_factory.mktemp("params")
    return {
        "float32": convert_checkpoint(ckpt, out / "f32"),
        "float16": convert_checkpoint(ckpt, out / "f16", dtype="float16"),
    }


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).standard_normal((2, 3, 30, 30)).astype("float32")


@pytest.fixture(scope="module")
def expected(reference, pixels):
    model, _ = reference
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), output_hidden_states=True)
    return {
        "hidden_states": [h.numpy() for h in out.hidden_states],
        "image_embeds": out.image_embeds.numpy(),
    }


def compiled(reference, params, tmp_path, dtype="float32", **options):
    _, ckpt = reference
    config = resolve_config(str(ckpt), **options)
    return CompiledCPU(config, params[dtype], dtype, tmp_path)


def test_every_hidden_state_fp32(reference, params, pixels, expected, tmp_path):
    lib = compiled(reference, params, tmp_path, select_layer=-1, feature="cls_patch")
    assert len(expected["hidden_states"]) == TINY["num_hidden_layers"] + 1
    assert_all_close(lib.hidden_states(pixels), expected["hidden_states"], "hidden_states")
    assert_fp32_close(lib.encode(pixels), expected["hidden_states"][-1], "encode(-1, cls_patch)")


@pytest.mark.parametrize("select_layer", [-1, -2, 0, 1])
@pytest.mark.parametrize("feature", ["patch", "cls_patch"])
def test_encode_selects_layer_and_feature(reference, params, pixels, expected, tmp_path, select_layer, feature):
    lib = compiled(reference, params, tmp_path, select_layer=select_layer, feature=feature)
    ref = expected["hidden_states"][select_layer]
    if feature == "patch":
        ref = ref[:, 1:]
    assert_fp32_close(lib.encode(pixels), ref, f"encode(select_layer={select_layer}, {feature})")
    # layers after the selected one are not compiled in
    n_layers = TINY["num_hidden_layers"] + 1 + select_layer if select_layer < 0 else select_layer
    layer_params = {p["name"].split(".")[2] for p in lib.metadata["params"] if p["name"].startswith("encoder.layers.")}
    assert len(layer_params) == n_layers


def test_pooled_projection(reference, params, pixels, expected, tmp_path):
    lib = compiled(reference, params, tmp_path, feature="pooled")
    ours = lib.encode(pixels)
    assert ours.shape == (2, 1, TINY["projection_dim"])
    assert_fp32_close(ours[:, 0], expected["image_embeds"], "image_embeds")


def test_fp16_against_fp32_reference(reference, params, pixels, expected, tmp_path):
    lib = compiled(reference, params, tmp_path, dtype="float16", select_layer=-1, feature="cls_patch")
    assert_all_close(lib.hidden_states(pixels), expected["hidden_states"], "fp16 hidden_states", "float16")
    assert_fp16_close(lib.encode(pixels), expected["hidden_states"][-1], "fp16 encode")


@pytest.mark.parametrize("image_size", [38, 22])
def test_other_image_size_interpolates_position_embedding(reference, tmp_path, image_size):
    """``convert --image-size`` from a 3x3 checkpoint to a 4x4 (38 px) or 2x2 (22 px) grid.

    The reference is transformers' ``interpolate_pos_encoding=True``: bicubic,
    align_corners=False, the class-token row kept apart, no antialias when shrinking.
    """
    model, ckpt = reference
    params_dir = convert(ckpt, tmp_path / f"params{image_size}", image_size=image_size)
    config = resolve_config(str(ckpt), image_size=image_size, select_layer=-1, feature="cls_patch")
    assert (config.checkpoint_image_size, config.tokens.grid) == (TINY["image_size"], (image_size // 8,) * 2)
    x = np.random.default_rng(2).standard_normal((1, 3, image_size, image_size)).astype("float32")
    with torch.no_grad():
        ref = model(torch.from_numpy(x), output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
    lib = CompiledCPU(config, params_dir, "float32", tmp_path)
    assert_all_close(lib.hidden_states(x), [r.numpy() for r in ref], f"{image_size} px hidden_states")
    assert_fp32_close(lib.encode(x), ref[-1].numpy(), f"{image_size} px encode")


def test_clip_model_checkpoint_ignores_text_tower(tmp_path, pixels):
    """A whole CLIPModel: the text tower is ignored, the vision tower and projection are read."""
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision = {k: v for k, v in TINY.items() if k != "projection_dim"}
    model = randomize_all(CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)), seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    params_dir = convert_checkpoint(tmp_path / "ckpt", tmp_path / "params")
    config = resolve_config(str(tmp_path / "ckpt"), select_layer=-2, feature="patch")
    assert config.family == "clip"
    with torch.no_grad():
        ref = model.vision_model(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2][:, 1:]
    lib = CompiledCPU(config, params_dir, "float32", tmp_path, hidden_states=False)
    assert_fp32_close(lib.encode(pixels), ref.numpy(), "CLIPModel vision tower")


def test_vision_model_without_projection(tmp_path, pixels):
    """transformers v5 saves CLIPVisionModel without the vision_model. prefix; both load."""
    model = randomize_all(CLIPVisionModel(CLIPVisionConfig(**TINY)), seed=4)
    model.save_pretrained(tmp_path / "ckpt")
    params_dir = convert_checkpoint(tmp_path / "ckpt", tmp_path / "params")
    config = resolve_config(str(tmp_path / "ckpt"), feature="cls_patch")
    with torch.no_grad():
        ref = model(torch.from_numpy(pixels)).last_hidden_state.numpy()
    lib = CompiledCPU(config, params_dir, "float32", tmp_path, hidden_states=False)
    assert_fp32_close(lib.encode(pixels), ref, "CLIPVisionModel last_hidden_state")


def test_real_shape_layer_clip_l336(tmp_path):
    """One ViT-L/14-336 layer at its real width and token count (577)."""
    base = resolve_config("clip-vit-large-patch14-336")
    hf = CLIPVisionConfig(
        hidden_size=base.hidden_size, intermediate_size=base.intermediate_size, num_hidden_layers=1,
        num_attention_heads=base.num_attention_heads, image_size=base.image_size, patch_size=base.patch_size,
    )
    model = randomize_all(CLIPVisionModel(hf), seed=5)
    model.save_pretrained(tmp_path / "ckpt")
    params_dir = convert_checkpoint(tmp_path / "ckpt", tmp_path / "params")
    config = dataclasses.replace(resolve_config(str(tmp_path / "ckpt")), select_layer=-1, feature="cls_patch")
    x = np.random.default_rng(1).standard_normal((1, 3, 336, 336)).astype("float32")
    with torch.no_grad():
        ref = model(torch.from_numpy(x), output_hidden_states=True).hidden_states
    lib = CompiledCPU(config, params_dir, "float32", tmp_path)
    assert_all_close(lib.hidden_states(x), [r.numpy() for r in ref], "L/14-336 hidden_states")
    assert_fp32_close(lib.encode(x), ref[-1].numpy(), "L/14-336 encode")
