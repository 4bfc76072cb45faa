"""DINOv2 parity: transformers' Dinov2Model (GELU MLP or SwiGLU) and Dinov2WithRegistersModel.

Each reference is a tiny model with every parameter randomized after init
(layer scale, norms, class/register tokens, biases: none left at its init
value), saved with ``save_pretrained`` and converted by our ``convert``.
Checked: every hidden state in fp32 and fp16, the pooled output (the
layernormed class token), ``last_hidden_state`` and what ``patch`` drops.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from mlc_vision.checkpoint.resolve import resolve_config
from mlc_vision.compiler.module import build_module
from mlc_vision.errors import MlcVisionError
from mlc_vision.models import dinov2, route
from mlc_vision.weights.convert import convert
from parity import CompiledCPU, assert_all_close, assert_fp16_close, assert_fp32_close, convert_checkpoint, randomize_all

# 56 px / 14 = a 4x4 grid; 3 layers give 4 hidden states.
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14, mlp_ratio=2)
REGISTERS = 4
VARIANTS = {
    "plain": (Dinov2Config, Dinov2Model, {}),
    "swiglu": (Dinov2Config, Dinov2Model, {"use_swiglu_ffn": True}),
    "registers": (Dinov2WithRegistersConfig, Dinov2WithRegistersModel, {"num_register_tokens": REGISTERS}),
}


def make_reference(variant: str, path, seed: int = 0, **overrides):
    config_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **extra, **overrides})).eval()
    randomize_all(model, seed + 1)
    model.save_pretrained(path)
    return model


def reference_outputs(model, pixels: np.ndarray) -> dict:
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), output_hidden_states=True)
    return {
        "hidden_states": [h.numpy() for h in out.hidden_states],
        "last_hidden_state": out.last_hidden_state.numpy(),
        "pooler_output": out.pooler_output.numpy(),
    }


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).standard_normal((2, 3, 56, 56)).astype("float32")


def build_tower(variant: str, root, pixels) -> dict:
    """Checkpoint, fp32 and fp16 params and transformers' outputs of one variant."""
    model = make_reference(variant, root / "ckpt")
    params = {
        "float32": convert_checkpoint(root / "ckpt", root / "f32"),
        "float16": convert_checkpoint(root / "ckpt", root / "f16", dtype="float16"),
    }
    return {"name": variant, "ckpt": root / "ckpt", "params": params, "ref": reference_outputs(model, pixels)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def tower(request, tmp_path_factory, pixels):
    return build_tower(request.param, tmp_path_factory.mktemp(f"dinov2-{request.param}"), pixels)


@pytest.fixture(scope="module")
def registers(tmp_path_factory, pixels):
    """The variant where feature selection has most to drop (class + register tokens)."""
    return build_tower("registers", tmp_path_factory.mktemp("dinov2-registers-only"), pixels)


def compiled(tower, tmp_path, dtype="float32", **options) -> CompiledCPU:
    config = resolve_config(str(tower["ckpt"]), **options)
    return CompiledCPU(config, tower["params"][dtype], dtype, tmp_path)


def prefix_of(tower) -> int:
    return 1 + (REGISTERS if tower["name"] == "registers" else 0)


def test_config_from_checkpoint(tower):
    config = resolve_config(str(tower["ckpt"]))
    assert route({"model_type": "dinov2_with_registers"}) is route({"model_type": "dinov2"}) is dinov2.FAMILY
    assert config.family == "dinov2" and config.layer_scale and config.tokens.grid == (4, 4)
    assert config.tokens.prefix == prefix_of(tower)
    swiglu = tower["name"] == "swiglu"
    assert (config.hidden_act, config.intermediate_size) == (("swiglu", 48) if swiglu else ("gelu", 64))


def test_every_hidden_state_and_pooled_fp32(tower, pixels, tmp_path):
    lib = compiled(tower, tmp_path, feature="pooled")
    ref = tower["ref"]
    ours = lib.hidden_states(pixels)
    assert len(ours) == len(ref["hidden_states"]) == TINY["num_hidden_layers"] + 1
    assert ref["hidden_states"][0].shape == (2, prefix_of(tower) + 16, TINY["hidden_size"])
    assert_all_close(ours, ref["hidden_states"], f"{tower['name']} hidden_states")
    pooled = lib.encode(pixels)
    assert pooled.shape == (2, 1, TINY["hidden_size"])
    assert_fp32_close(pooled[:, 0], ref["pooler_output"], f"{tower['name']} pooler_output")


def test_every_hidden_state_and_pooled_fp16(tower, pixels, tmp_path):
    lib = compiled(tower, tmp_path, dtype="float16", feature="pooled")
    assert_all_close(lib.hidden_states(pixels), tower["ref"]["hidden_states"], f"{tower['name']} fp16 hidden_states",
                     "float16")
    assert_fp16_close(lib.encode(pixels)[:, 0], tower["ref"]["pooler_output"], f"{tower['name']} fp16 pooler_output")


def test_patch_drops_class_and_registers(registers, pixels, tmp_path):
    lib = compiled(registers, tmp_path, select_layer=1, feature="patch")
    assert lib.metadata["tokens"]["dropped_prefix"] == 1 + REGISTERS and lib.metadata["num_tokens"] == 16
    assert_fp32_close(lib.encode(pixels), registers["ref"]["hidden_states"][1][:, 1 + REGISTERS:], "encode(patch)")


def test_post_norm_tokens_is_last_hidden_state(registers, pixels, tmp_path):
    lib = compiled(registers, tmp_path, feature="cls_patch", post_norm_tokens=True)
    assert_fp32_close(lib.encode(pixels), registers["ref"]["last_hidden_state"], "last_hidden_state")
    with pytest.raises(MlcVisionError, match="last layer only"):
        build_module(resolve_config(str(registers["ckpt"]), select_layer=-2, post_norm_tokens=True), "float32", "cpu")


# plain: transformers' bicubic, upscaling; registers: the antialiased resize, downscaling
@pytest.mark.parametrize("variant, image_size", [("plain", 84), ("registers", 42)])
def test_other_image_size_interpolates_position_embeddings(variant, image_size, tmp_path):
    """Converted for another grid: what transformers interpolates at every forward pass (registers: antialiased)."""
    model = make_reference(variant, tmp_path / "ckpt", seed=5)
    params_dir = convert(tmp_path / "ckpt", tmp_path / "params", image_size=image_size)
    x = np.random.default_rng(3).standard_normal((1, 3, image_size, image_size)).astype("float32")
    config = resolve_config(str(tmp_path / "ckpt"), image_size=image_size, feature="cls_patch", post_norm_tokens=True)
    lib = CompiledCPU(config, params_dir, "float32", tmp_path, hidden_states=False)
    assert_fp32_close(lib.encode(x), reference_outputs(model, x)["last_hidden_state"], f"{variant} {image_size} px")


def test_preset_dinov2_large():
    config = resolve_config("dinov2-large")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1024, 24, 16)
    assert config.tokens.grid == (16, 16) and config.checkpoint_image_size == 518
    meta = build_module(config, "float16", "cpu").metadata
    assert (meta["num_tokens"], meta["output_width"]) == (257, 1024)
    assert meta["params"][0]["name"].startswith("embeddings.")
    assert config.preprocess.size == 256 and config.preprocess.crop_size == 224


@pytest.mark.slow
def test_dinov2_large_real_shape(tmp_path):
    """The dinov2-large architecture at full depth and width (random weights), 224 px from a 518 px table."""
    base = resolve_config("dinov2-large")
    model = Dinov2Model(Dinov2Config(
        hidden_size=base.hidden_size, num_hidden_layers=base.num_hidden_layers,
        num_attention_heads=base.num_attention_heads, image_size=518, patch_size=14,
    )).eval()
    randomize_all(model, 11)
    model.save_pretrained(tmp_path / "ckpt")
    params_dir = convert(tmp_path / "ckpt", tmp_path / "params", image_size=224)
    config = resolve_config(str(tmp_path / "ckpt"), image_size=224, feature="pooled")
    x = np.random.default_rng(4).standard_normal((1, 3, 224, 224)).astype("float32")
    ref = reference_outputs(model, x)
    lib = CompiledCPU(config, params_dir, "float32", tmp_path)
    assert_all_close(lib.hidden_states(x), ref["hidden_states"], "dinov2-large hidden_states")
    assert_fp32_close(lib.encode(x)[:, 0], ref["pooler_output"], "dinov2-large pooler_output")
