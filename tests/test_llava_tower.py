"""The LLaVA tower's behaviour (InternVL's ``CLIPVisionTower``, tinychat's): pooled width from what the
checkpoint holds, EVA's projection without bias, towers named only in ``mm_vision_tower``, a
config-only ``VisionEncoder``, and unknown feature names refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

import mlc_vision.config as config_module
from mlc_vision.checkpoint.resolve import resolve_config
from mlc_vision.errors import MlcVisionError
from mlc_vision.runtime.encoder import VisionEncoder
from mlc_vision.weights.convert import convert
from parity import CompiledCPU, assert_fp32_close, randomize_all
from test_eva_clip import TINY as EVA_TINY
from test_eva_clip import make_timm, port_config, port_state_dict, reference_outputs
from test_intern_vit import STYLES as INTERN_STYLES
from test_intern_vit import original_config, reference_model, run_reference, to_original

CLIP_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 image_size=30, patch_size=8)
LLM_WIDTH = 32


def pixels_for(size: int, seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype("float32")


# ---- pooled width follows the checkpoint ---------------------------------------------------------


@pytest.fixture(scope="module")
def clip_no_projection(tmp_path_factory):
    """A CLIPVisionModel: config.json says projection_dim 512, the weights hold no projection."""
    model = randomize_all(CLIPVisionModel(CLIPVisionConfig(**CLIP_TINY, projection_dim=512)), seed=0)
    root = tmp_path_factory.mktemp("clip-noproj")
    model.save_pretrained(root / "ckpt")
    assert json.loads((root / "ckpt" / "config.json").read_text())["projection_dim"] == 512
    return model, root / "ckpt", convert(root / "ckpt", root / "params")


def test_pooled_without_projection_weights_is_the_normed_class_token(clip_no_projection, tmp_path):
    model, ckpt, params = clip_no_projection
    config = resolve_config(str(ckpt), feature="pooled")
    assert config.projection_dim is None
    lib = CompiledCPU(config, params, "float32", tmp_path, hidden_states=False)
    assert lib.metadata["output_width"] == CLIP_TINY["hidden_size"]
    pixels = pixels_for(30)
    with torch.no_grad():
        ref = model(torch.from_numpy(pixels)).pooler_output.numpy()
    assert_fp32_close(lib.encode(pixels)[:, 0], ref, "pooler_output")


def _eva_checkpoint(path, architecture: str, with_projection: bool, head_bias: bool):
    """An EVA-CLIP vision checkpoint in the port's format: EvaCLIPVisionModel[WithProjection]."""
    model = make_timm("E", EVA_TINY, seed=2)
    if not head_bias:
        with torch.no_grad():
            model.head.bias.zero_()
    tensors = port_state_dict(model)
    if not with_projection:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("visual_projection.")}
    elif not head_bias:
        tensors.pop("visual_projection.bias")
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    vision = port_config("E", EVA_TINY, model.norm.eps)["vision_config"]
    vision.update(architectures=[architecture], projection_dim=EVA_TINY["projection_dim"] if with_projection else 512)
    (path / "config.json").write_text(json.dumps(vision))
    return model


def test_eva_vision_model_with_projection_has_no_bias(tmp_path):
    model = _eva_checkpoint(tmp_path / "ckpt", "EvaCLIPVisionModelWithProjection", with_projection=True, head_bias=False)
    config = resolve_config(str(tmp_path / "ckpt"), feature="pooled")
    assert (config.family, config.projection_dim, config.projection_bias) == ("eva_clip", EVA_TINY["projection_dim"], False)
    params = convert(tmp_path / "ckpt", tmp_path / "params")
    pixels = pixels_for(30, seed=1)
    lib = CompiledCPU(config, params, "float32", tmp_path, hidden_states=False)
    assert "visual_projection.bias" not in {p["name"] for p in lib.metadata["params"]}
    assert_fp32_close(lib.encode(pixels)[:, 0], reference_outputs(model, pixels)["image_embeds"], "image_embeds")


def test_eva_vision_model_pooled_width_is_hidden(tmp_path):
    """EvaCLIPVisionModel says projection_dim 512 but has no projection: pooled is 64 wide."""
    model = _eva_checkpoint(tmp_path / "ckpt", "EvaCLIPVisionModel", with_projection=False, head_bias=True)
    config = resolve_config(str(tmp_path / "ckpt"), feature="pooled")
    assert config.projection_dim is None
    params = convert(tmp_path / "ckpt", tmp_path / "params")
    pixels = pixels_for(30, seed=2)
    lib = CompiledCPU(config, params, "float32", tmp_path, hidden_states=False)
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(pixels))
    assert_fp32_close(lib.encode(pixels)[:, 0], tokens[:, 0].numpy(), "post-normed class token")


# ---- a whole InternVL-LLaVA checkpoint that names its tower ---------------------------------------


def _llava_config(tower: str, **extra) -> dict:
    """InternVL's LLaVA fork: a LLaMA config with mm_* fields naming the tower."""
    return {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_size": LLM_WIDTH,
        "mm_vision_tower": tower, "mm_hidden_size": 64, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "num_hidden_layers": 1, "vocab_size": 16, **extra,
    }


def _save_llava(path, tower_tensors: dict, tower: str, projector: torch.nn.Module, **extra):
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.vision_tower.vision_tower.{k}": v for k, v in tower_tensors.items()}
    tensors |= {f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}
    tensors |= {"model.embed_tokens.weight": torch.randn(16, LLM_WIDTH), "lm_head.weight": torch.randn(16, LLM_WIDTH),
                "model.layers.0.mlp.up_proj.weight": torch.randn(8, LLM_WIDTH), "model.norm.weight": torch.ones(LLM_WIDTH)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(_llava_config(tower, **extra)))


def _projector(width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(width, LLM_WIDTH), torch.nn.GELU(), torch.nn.Linear(LLM_WIDTH, LLM_WIDTH))


def test_eva_tower_named_by_a_path_beside_the_checkpoint(tmp_path):
    """mm_vision_tower './pretrained/EVA...' holding the tower's config.json: family from that config."""
    model = make_timm("E", EVA_TINY, seed=3)
    tower = {k: v for k, v in port_state_dict(model).items() if not k.startswith("visual_projection.")}
    projector = _projector(EVA_TINY["hidden_size"], seed=4)
    ckpt = tmp_path / "llava"
    _save_llava(ckpt, tower, "./pretrained/eva_clip_psz14", projector)
    (ckpt / "pretrained" / "eva_clip_psz14").mkdir(parents=True)
    vision = port_config("E", EVA_TINY, model.norm.eps)["vision_config"]
    (ckpt / "pretrained" / "eva_clip_psz14" / "config.json").write_text(json.dumps(vision))

    config = resolve_config(str(ckpt))
    assert (config.family, config.select_layer, config.feature, config.projector) == ("eva_clip", -2, "patch", "mlp2x_gelu")
    assert config.preprocess.pad_to_square
    params = convert(ckpt, tmp_path / "params")
    pixels = pixels_for(30, seed=5)
    with torch.no_grad():
        ref = projector(torch.from_numpy(reference_outputs(model, pixels)["hidden_states"][-2][:, 1:])).numpy()
    lib = CompiledCPU(config, params, "float32", tmp_path, hidden_states=False)
    assert_fp32_close(lib.encode(pixels), ref, "EVA tower + mm_projector")


INTERN_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   image_size=56, patch_size=14)


@pytest.fixture
def tiny_intern_presets(tmp_path, monkeypatch):
    """The presets dir with tiny stand-ins for InternViT-6B-224px and -448px-V1-2 (other depth)."""
    presets = tmp_path / "presets"
    presets.mkdir()
    base = config_module.preset_info("internvit-6b-224px")
    for name, layers in (("internvit-6b-224px", 3), ("internvit-6b-448px-v1-2", 2)):
        data = dict(base, **{**INTERN_TINY, "num_hidden_layers": layers})
        data["preprocess"] = dict(base["preprocess"], size=INTERN_TINY["image_size"])
        data["hf_repo"] = f"OpenGVLab/{name}"
        (presets / f"{name}.json").write_text(json.dumps(data))
    monkeypatch.setattr(config_module, "PRESET_DIR", presets)


@pytest.mark.parametrize("tower_name", ["./pretrained/InternViT-6B-224px", "./pretrained/eva_clip_misnamed"])
def test_internvit_tower_decided_by_keys_runs_at_336(tiny_intern_presets, tmp_path, tower_name):
    """No config.json for the tower: the preset whose shapes the keys fit, whatever the name says.

    InternVL's LLaVA tower runs InternViT at 336 px (CLIP processor, ImageNet
    mean/std), its position embedding interpolated; transformers'
    InternVLVisionModel at 336 px is the reference.
    """
    model = reference_model(INTERN_STYLES["6b"], INTERN_TINY, seed=6)
    projector = _projector(INTERN_TINY["hidden_size"], seed=7)
    ckpt = tmp_path / "llava"
    _save_llava(ckpt, to_original(model.state_dict()), tower_name, projector, mm_vision_select_layer=-1)
    config = resolve_config(str(ckpt))
    assert (config.family, config.preset, config.num_hidden_layers) == ("intern_vit", "internvit-6b-224px", 3)
    assert (config.image_size, config.checkpoint_image_size) == (336, INTERN_TINY["image_size"])
    assert (config.preprocess.resize, config.preprocess.crop_size, config.preprocess.mean) == (
        "shortest_edge", 336, (0.485, 0.456, 0.406))
    params = convert(ckpt, tmp_path / "params")
    pixels = pixels_for(336, seed=8, batch=1)
    with torch.no_grad():
        ref = projector(torch.from_numpy(run_reference(model, pixels)[-1][:, 1:])).numpy()
    lib = CompiledCPU(config, params, "float32", tmp_path, hidden_states=False)
    assert_fp32_close(lib.encode(pixels), ref, "InternViT tower at 336 px + mm_projector")


def test_internvit_tower_config_beside_the_checkpoint(tmp_path):
    """The tower's own config.json (model_type intern_vit_6b) decides, no preset needed."""
    model = reference_model(INTERN_STYLES["6b"], INTERN_TINY, seed=9)
    ckpt = tmp_path / "llava"
    _save_llava(ckpt, to_original(model.state_dict()), "towers/InternViT-6B-448px-V1-5", _projector(64, seed=1))
    (ckpt / "towers" / "InternViT-6B-448px-V1-5").mkdir(parents=True)
    (ckpt / "towers" / "InternViT-6B-448px-V1-5" / "config.json").write_text(
        json.dumps(original_config(INTERN_STYLES["6b"], INTERN_TINY)))
    config = resolve_config(str(ckpt))
    assert (config.family, config.num_hidden_layers, config.image_size) == ("intern_vit", 3, 336)
    convert(ckpt, tmp_path / "params")


def test_unknown_select_feature_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_llava_config("openai/clip-vit-large-patch14-336",
                                                                   mm_vision_select_feature="cls")))
    with pytest.raises(MlcVisionError, match="mm_vision_select_feature 'cls'"):
        resolve_config(str(tmp_path))


# ---- VisionEncoder: config-only, lists of (C, H, W) arrays, dtype ---------------------------------


@pytest.fixture(scope="module")
def clip_library(clip_no_projection, tmp_path_factory):
    from mlc_vision.compiler.export import build_library
    from mlc_vision.compiler.module import build_module

    _, ckpt, params = clip_no_projection
    built = build_module(resolve_config(str(ckpt), feature="patch"), "float32", "cpu")
    lib = build_library(built.mod, "cpu", tmp_path_factory.mktemp("lib") / "clip.so", metadata=built.metadata)
    return lib, params


def test_config_only_encoder_loads_params_on_first_use(clip_library):
    lib, params = clip_library
    bare = VisionEncoder(lib)
    assert not bare.is_loaded
    assert (bare.hidden_size, bare.num_patches) == (64, 9)
    assert bare.dummy_feature.shape == (1, 64) and bare.dummy_feature.dtype == np.float32
    with pytest.raises(MlcVisionError, match="no params dir"):
        bare(pixels_for(30))
    lazy = VisionEncoder(lib, params, load_params=False)
    assert not lazy.is_loaded
    out = lazy(pixels_for(30))
    assert lazy.is_loaded and out.shape == (2, 9, 64)
    bare.load_params(params)
    np.testing.assert_array_equal(bare(pixels_for(30)), out)


def test_list_of_chw_arrays_and_input_dtype(clip_library):
    lib, params = clip_library
    encoder = VisionEncoder(lib, params)
    batch = pixels_for(30, seed=3)
    whole = encoder(batch)
    stacked = encoder([batch[0], batch[1]])
    np.testing.assert_array_equal(stacked, whole)
    mixed = encoder([batch[0].astype(np.float16), batch[1]], match_input_dtype=True)
    assert isinstance(mixed, list) and [m.shape for m in mixed] == [(1, 9, 64)] * 2
    assert (mixed[0].dtype, mixed[1].dtype) == (np.float16, np.float32)
    assert encoder(batch.astype(np.float16), match_input_dtype=True).dtype == np.float16
    with pytest.raises(MlcVisionError, match="pixel_values has shape"):
        encoder([batch[0], batch[1][:, :24, :24]])


@pytest.mark.parametrize("hint,chosen", [
    ("./pretrained/InternViT-6B-448px-V1-2", "internvit-6b-448px-v1-2"),
    ("OpenGVLab/InternViT-6B-448px-V1-5", "internvit-6b-448px-v1-5"),
    ("./pretrained/eva_vit_g", "internvit-6b-448px-v1-2"),  # no hint: the first of the equal architectures
])
def test_real_presets_matched_by_shapes_alone(hint, chosen):
    """Shapes of a real InternViT-6B-448px (45 layers) tower, no weights: V1-2 and V1-5 fit, V1-0 (48) does not."""
    from mlc_vision.checkpoint.tower import preset_for_tower
    from mlc_vision.checkpoint.weight_plan import expected_params
    from mlc_vision.config import load_preset
    from mlc_vision.models import get_family

    preset = load_preset("internvit-6b-448px-v1-5")
    shapes = {f"model.vision_tower.vision_tower.{name}": shape
              for name, (shape, _) in expected_params(get_family("intern_vit"), preset, "float32").items()}
    shapes["model.layers.0.mlp.up_proj.weight"] = (8, 8)  # the LLM: ignored
    fam, config = preset_for_tower(hint, _llava_config(hint), shapes, None)
    assert (fam.name, config.preset, config.num_hidden_layers) == ("intern_vit", chosen, 45)
