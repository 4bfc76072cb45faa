"""SigLIP parity: transformers SiglipVisionModel (and the tower inside SiglipModel
and LLaVA-OneVision / LLaVA-NeXT checkpoints), random weights, saved with
save_pretrained and converted by our loader, against our CPU library."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import tvm
from safetensors.numpy import load_file, save_file
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mlc_vision.compiler.module import build_module
from mlc_vision.errors import MlcVisionError
from mlc_vision.models import route, siglip
from mlc_vision.checkpoint.resolve import resolve_config
from mlc_vision.weights.convert import convert
from mlc_vision.weights.params import load_params
from parity import CompiledCPU, assert_all_close, assert_fp16_close, assert_fp32_close, convert_checkpoint, randomize_all

# Small, but with the real geometry's quirk: 30 px with 8 px patches drops the
# last 6 pixel rows/columns like SigLIP's 384/14; 3 layers give 4 hidden states.
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    image_size=30, patch_size=8,
)
TOKENS = (30 // 8) ** 2  # no class token: every token is a patch
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=128)
TINY_LLM = dict(
    model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=200,
)


def _reference_outputs(tower: torch.nn.Module, pixels: np.ndarray, **kwargs) -> dict:
    with torch.no_grad():
        out = tower(torch.from_numpy(pixels), output_hidden_states=True, **kwargs)
    pooled = out.pooler_output
    return {
        "hidden_states": [h.numpy() for h in out.hidden_states],
        "last_hidden_state": out.last_hidden_state.numpy(),
        "pooler_output": None if pooled is None else pooled.numpy(),
    }


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).standard_normal((2, 3, 30, 30)).astype("float32")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = randomize_all(SiglipVisionModel(SiglipVisionConfig(**TINY)), seed=0)
    ckpt = tmp_path_factory.mktemp("siglip-ckpt")
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
def expected(reference, pixels):
    return _reference_outputs(reference[0], pixels)


def compiled(reference, params, tmp_path, dtype="float32", hidden_states=True, **options):
    _, ckpt = reference
    config = resolve_config(str(ckpt), **options)
    return CompiledCPU(config, params[dtype], dtype, tmp_path, hidden_states=hidden_states)


def _compiled_layers(lib) -> int:
    return len({p["name"].split(".")[2] for p in lib.metadata["params"] if p["name"].startswith("encoder.layers.")})


# ---- the standalone vision model -------------------------------------------------------


def test_config_from_checkpoint(reference):
    config = resolve_config(str(reference[1]))
    assert config.family == "siglip"
    assert (config.class_token, config.patch_bias, config.use_head) == (False, True, True)
    assert (config.hidden_act, config.layer_norm_eps) == ("gelu_pytorch_tanh", 1e-6)
    assert config.tokens.grid == (3, 3) and config.num_positions == TOKENS


def test_every_hidden_state_fp32(reference, params, pixels, expected, tmp_path):
    lib = compiled(reference, params, tmp_path, select_layer=-1, feature="patch")
    assert len(expected["hidden_states"]) == TINY["num_hidden_layers"] + 1
    assert_all_close(lib.hidden_states(pixels), expected["hidden_states"], "hidden_states")
    # patch keeps every token (no class token) and is hidden_states[-1]: no post_layernorm
    enc = lib.encode(pixels)
    assert enc.shape == (2, TOKENS, TINY["hidden_size"]) and lib.metadata["num_tokens"] == TOKENS
    assert_fp32_close(enc, expected["hidden_states"][-1], "encode(patch)")


# -2 is covered by the LLaVA-NeXT test below
@pytest.mark.parametrize("select_layer, feature", [(0, "patch"), (1, "cls_patch")])
def test_encode_selects_layer(reference, params, pixels, expected, tmp_path, select_layer, feature):
    lib = compiled(reference, params, tmp_path, hidden_states=False, select_layer=select_layer, feature=feature)
    ref = expected["hidden_states"][select_layer]
    assert_fp32_close(lib.encode(pixels), ref, f"encode(select_layer={select_layer}, {feature})")
    assert _compiled_layers(lib) == (TINY["num_hidden_layers"] + 1 + select_layer) % (TINY["num_hidden_layers"] + 1)
    assert not any(p["name"].startswith(("post_layernorm.", "head.")) for p in lib.metadata["params"])


def test_post_norm_tokens_is_last_hidden_state(reference, params, pixels, expected, tmp_path):
    lib = compiled(reference, params, tmp_path, hidden_states=False, post_norm_tokens=True)
    assert_fp32_close(lib.encode(pixels), expected["last_hidden_state"], "last_hidden_state")


def test_post_norm_tokens_needs_last_layer(reference):
    config = resolve_config(str(reference[1]), select_layer=-2, post_norm_tokens=True)
    with pytest.raises(MlcVisionError, match="post_norm_tokens"):
        build_module(config, "float32", "cpu")


def test_pooled_head(reference, params, pixels, expected, tmp_path):
    lib = compiled(reference, params, tmp_path, hidden_states=False, feature="pooled")
    ours = lib.encode(pixels)
    assert ours.shape == (2, 1, TINY["hidden_size"])
    assert (lib.metadata["num_tokens"], lib.metadata["output_width"]) == (1, TINY["hidden_size"])
    assert_fp32_close(ours[:, 0], expected["pooler_output"], "pooler_output")


def test_fp16_against_fp32_reference(reference, params, pixels, expected, tmp_path):
    lib = compiled(reference, params, tmp_path, dtype="float16", feature="pooled")
    assert_all_close(lib.hidden_states(pixels), expected["hidden_states"], "fp16 hidden_states", "float16")
    # the head reads post_layernorm(hidden_states[-1]): the fp16 post-norm is checked through it
    assert_fp16_close(lib.encode(pixels)[:, 0], expected["pooler_output"], "fp16 pooler_output")


def test_other_image_size_interpolates_position_embedding(reference, pixels, tmp_path):
    """Compiled at 38 px (4x4 grid) from a 3x3 checkpoint: transformers' interpolate_pos_encoding."""
    model, ckpt = reference
    params_dir = convert(ckpt, tmp_path / "params38", image_size=38)
    x = np.random.default_rng(2).standard_normal((1, 3, 38, 38)).astype("float32")
    ref = _reference_outputs(model, x, interpolate_pos_encoding=True)
    config = resolve_config(str(ckpt), image_size=38, post_norm_tokens=True)
    lib = CompiledCPU(config, params_dir, "float32", tmp_path, hidden_states=False)
    assert_fp32_close(lib.encode(x), ref["last_hidden_state"], "38 px last_hidden_state")


# ---- the tower inside other checkpoints ---------------------------------------------------


def test_siglip_model_checkpoint_ignores_text_tower(tmp_path, pixels):
    """A whole SiglipModel (model_type siglip, as SigLIP2 fixed-resolution checkpoints are too)."""
    model = randomize_all(SiglipModel(SiglipConfig(vision_config=TINY, text_config=TINY_TEXT)), seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    params_dir = convert_checkpoint(tmp_path / "ckpt", tmp_path / "params")
    config = resolve_config(str(tmp_path / "ckpt"), feature="pooled")
    assert config.family == "siglip"
    ref = _reference_outputs(model.vision_model, pixels)
    lib = CompiledCPU(config, params_dir, "float32", tmp_path)
    assert_all_close(lib.hidden_states(pixels), ref["hidden_states"], "SiglipModel hidden_states")
    assert_fp32_close(lib.encode(pixels)[:, 0], ref["pooler_output"], "SiglipModel pooler_output")


def _llava_tower_checkpoint(tmp_path, model_cls, config_cls, seed, **outer):
    vision = dict(TINY, model_type="siglip_vision_model", vision_use_head=False)
    model = model_cls(config_cls(vision_config=vision, text_config=TINY_LLM, image_token_index=150, **outer))
    randomize_all(model, seed)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    return model.model.vision_tower, ckpt


def _as_v4_layout(ckpt) -> None:
    """Rename keys to the layout transformers v4.52+ wrote (``model.vision_tower.vision_model.*``)."""
    renames = (("vision_tower.", "model.vision_tower.vision_model."), ("language_model.model.", "model.language_model."),
               ("language_model.lm_head.", "lm_head."), ("multi_modal_projector.", "model.multi_modal_projector."),
               ("image_newline", "model.image_newline"))
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    renamed = {}
    for key, value in tensors.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    assert any(k.startswith("model.vision_tower.vision_model.") for k in renamed)
    save_file(renamed, path, metadata={"format": "pt"})


def test_llava_onevision_checkpoint(tmp_path, pixels):
    """LLaVA-OneVision: hidden_states[-1] of its (truncated) tower, all tokens, no post-norm."""
    tower, ckpt = _llava_tower_checkpoint(tmp_path, LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig, 5,
                                          video_token_index=151)
    params_dir = convert_checkpoint(ckpt, tmp_path / "params")
    config = resolve_config(str(ckpt), projector="none")
    assert (config.family, config.select_layer, config.use_head) == ("siglip", -1, False)
    ref = _reference_outputs(tower, pixels)
    lib = CompiledCPU(config, params_dir, "float32", tmp_path)
    assert_all_close(lib.hidden_states(pixels), ref["hidden_states"], "LLaVA-OneVision tower hidden_states")
    assert_fp32_close(lib.encode(pixels), ref["hidden_states"][-1], "LLaVA-OneVision image features")

    # the same checkpoint as transformers v4.52+ laid it out converts to the same params
    _as_v4_layout(ckpt)
    v4_dir = convert_checkpoint(ckpt, tmp_path / "params_v4")
    names = [p["name"] for p in lib.metadata["params"]]
    for name, a, b in zip(names, load_params(params_dir, names, tvm.cpu()), load_params(v4_dir, names, tvm.cpu()),
                          strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_llava_next_siglip_checkpoint(tmp_path, pixels):
    """LLaVA-NeXT with a SigLIP tower: its config's select layer (-2) is kept, all tokens.

    ("full" strategy: transformers' "default" drops token 0, a real patch for
    SigLIP, and LlavaNext warns that this does not fit a tower without CLS.)
    """
    tower, ckpt = _llava_tower_checkpoint(tmp_path, LlavaNextForConditionalGeneration, LlavaNextConfig, 6,
                                          vision_feature_select_strategy="full")
    params_dir = convert_checkpoint(ckpt, tmp_path / "params")
    config = resolve_config(str(ckpt), projector="none")
    assert (config.family, config.select_layer, config.feature) == ("siglip", -2, "cls_patch")
    ref = _reference_outputs(tower, pixels)
    lib = CompiledCPU(config, params_dir, "float32", tmp_path, hidden_states=False)
    assert_fp32_close(lib.encode(pixels), ref["hidden_states"][-2], "LLaVA-NeXT SigLIP image features")


def test_pooled_without_head_is_refused(tmp_path):
    config = dataclasses.replace(siglip.config_from_hf(dict(TINY, vision_use_head=False)), feature="pooled")
    with pytest.raises(MlcVisionError, match="vision_use_head"):
        build_module(config, "float32", "cpu")


def test_siglip2_naflex_is_refused(tmp_path):
    """SigLIP2 NaFlex (model_type siglip2) is another model: one clear line, not a wrong library."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "siglip2", "architectures": ["Siglip2Model"],
        "vision_config": dict(TINY, model_type="siglip2_vision_model", num_patches=256),
        "text_config": TINY_TEXT,
    }))
    with pytest.raises(MlcVisionError, match="NaFlex"):
        resolve_config(str(tmp_path))
    with pytest.raises(MlcVisionError, match="NaFlex"):
        route({"model_type": "siglip2_vision_model"}).config_from_hf({"model_type": "siglip2_vision_model"})


# ---- presets and real width -------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, tokens, width, compiled_layers",
    [("siglip-so400m-patch14-384", 729, 1152, 26), ("siglip-base-patch16-224", 196, 768, 12)],
)
def test_presets(preset, tokens, width, compiled_layers):
    config = resolve_config(preset)
    meta = build_module(config, "float16", "cpu").metadata
    assert (meta["num_tokens"], meta["output_width"], meta["num_patches"]) == (tokens, width, tokens)
    assert len({p["name"].split(".")[2] for p in meta["params"] if p["name"].startswith("encoder.layers.")}) == compiled_layers
    assert config.preprocess.resize == "exact" and config.preprocess.mean == (0.5, 0.5, 0.5)


def test_real_width_layer_so400m(tmp_path):
    """One so400m layer at its real shape: 1152 wide, 16 heads of 72, MLP 4304, 384/14 -> 729 tokens."""
    base = resolve_config("siglip-so400m-patch14-384")
    assert (base.hidden_size, base.num_attention_heads, base.head_dim, base.intermediate_size) == (1152, 16, 72, 4304)
    hf = SiglipVisionConfig(
        hidden_size=base.hidden_size, intermediate_size=base.intermediate_size, num_hidden_layers=1,
        num_attention_heads=base.num_attention_heads, image_size=base.image_size, patch_size=base.patch_size,
    )
    model = randomize_all(SiglipVisionModel(hf), seed=7)
    model.save_pretrained(tmp_path / "ckpt")
    params_dir = convert_checkpoint(tmp_path / "ckpt", tmp_path / "params")
    config = resolve_config(str(tmp_path / "ckpt"), feature="pooled")
    x = np.random.default_rng(1).standard_normal((1, 3, 384, 384)).astype("float32")
    ref = _reference_outputs(model, x)
    lib = CompiledCPU(config, params_dir, "float32", tmp_path)
    assert ref["hidden_states"][0].shape == (1, 729, 1152)
    assert_all_close(lib.hidden_states(x), ref["hidden_states"], "so400m hidden_states")
    assert_fp32_close(lib.encode(x)[:, 0], ref["pooler_output"], "so400m pooler_output")
