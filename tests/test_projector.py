"""Projector parity: LLaVA linear / mlp2x_gelu and InternVL mlp1 (+ pixel_shuffle)
against torch references, alone and compiled after a CLIP tower; a tiny
transformers Llava checkpoint through our loader; ``encode_rgb8`` == ``encode``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import tvm
from safetensors.torch import save_file as save_torch_file
from tvm import relax
from tvm.relax.frontend import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mlc_vision.checkpoint.config import checkpoint_config
from mlc_vision.checkpoint.projector import projector_from_hf
from mlc_vision.checkpoint.source import resolve_source
from mlc_vision.compiler.module import build_module
from mlc_vision.errors import MlcVisionError
from mlc_vision.models import clip
from mlc_vision.models.projector import (
    PROJECTOR_WEIGHTS,
    Projector,
    projector_params,
)
from mlc_vision.weights.convert import convert
from mlc_vision.weights.params import load_params
from parity import assert_fp16_close, assert_fp32_close, randomize_all

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=32, patch_size=8)  # a 4x4 grid: pixel_shuffle gives 2x2
LLM_WIDTH = 48
CPU = tvm.cpu()


def tiny_llm() -> LlamaConfig:
    return LlamaConfig(hidden_size=LLM_WIDTH, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=128)


def tiny_config(projector: str | None, **options):
    config = clip.config_from_hf(CLIPVisionConfig(**VISION).to_dict())
    return dataclasses.replace(
        config, projector=projector, projector_hidden_size=LLM_WIDTH if projector else None, **options
    ).validated()


def compile_vm(mod: tvm.IRModule) -> relax.VirtualMachine:
    return relax.VirtualMachine(tvm.compile(mod, tvm.target.Target.from_device("cpu")), CPU)


def tensor(array: np.ndarray, dtype: str = "float32"):
    return tvm.runtime.tensor(np.ascontiguousarray(array.astype(dtype)), CPU)


def mapped(state_dict: dict, prefix: str, kind: str) -> dict[str, np.ndarray]:
    """A torch state dict under ``prefix`` (as a checkpoint names it) through our weight map."""
    weights = PROJECTOR_WEIGHTS[kind]
    return {weights.rename(prefix + k): v.detach().numpy() for k, v in state_dict.items()}


# ---- the projector alone ----------------------------------------------------------------------


class ProjectorRunner:
    """``Projector(config)`` compiled on its own: ``[b, tokens, vision width] -> [b, tokens', llm]``."""

    def __init__(self, config, dtype: str = "float32"):
        module = Projector(config)
        module.to(dtype)
        spec = {"forward": {"features": nn.spec.Tensor(["batch", config.num_patches, config.hidden_size], dtype),
                            "$": {"param_mode": "packed", "effect_mode": "none"}}}
        mod, named = module.export_tvm(spec=spec)
        self.names = [f"projector.{name}" for name, _ in named]
        self.vm = compile_vm(mod)
        self.dtype = dtype

    def __call__(self, x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
        assert sorted(weights) == sorted(self.names), f"mapped {sorted(weights)} != module {sorted(self.names)}"
        params = [tensor(weights[name], self.dtype) for name in self.names]
        return self.vm["forward"](tensor(x, self.dtype), params).numpy().astype(np.float32)


def internvl_pixel_shuffle(x: torch.Tensor, scale: float) -> torch.Tensor:
    """InternVL's definition (ps_version 'v2'): view, swap, view, swap back."""
    n, d1, d2, c = x.shape
    x = x.view(n, d1, int(d2 * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(d2 * scale), int(d1 * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def internvl_mlp1(vision_width: int, llm_width: int, ratio: float) -> torch.nn.Sequential:
    """``mlp1`` as InternVL-chat builds it (keys 0, 1, 3)."""
    width = vision_width * int(1 / ratio) ** 2
    return torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, llm_width),
                               torch.nn.GELU(), torch.nn.Linear(llm_width, llm_width))


def internvl_project(patches: torch.Tensor, mlp1: torch.nn.Module, ratio: float) -> torch.Tensor:
    """InternVL's ``extract_feature`` after the tower: patch tokens -> grid -> shuffle -> mlp1."""
    side = int(patches.shape[1] ** 0.5)
    grid = patches.reshape(patches.shape[0], side, side, -1)
    shuffled = internvl_pixel_shuffle(grid, ratio)
    return mlp1(shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1]))


@pytest.fixture(scope="module")
def features():
    """Selected features of a 4x4 grid, all different (so a wrong token order shows)."""
    return np.random.default_rng(0).standard_normal((2, 16, VISION["hidden_size"])).astype(np.float32)


def test_mlp2x_gelu_matches_transformers_llava_projector(features):
    llava = LlavaConfig(vision_config=CLIPVisionConfig(**VISION),
                        text_config=tiny_llm(), vision_feature_layer=-2)
    ref = randomize_all(LlavaMultiModalProjector(llava), seed=0)
    weights = mapped(ref.state_dict(), "multi_modal_projector.", "mlp2x_gelu")
    ours = ProjectorRunner(tiny_config("mlp2x_gelu"))(features, weights)
    with torch.no_grad():
        assert_fp32_close(ours, ref(torch.from_numpy(features)).numpy(), "mlp2x_gelu")


def test_mlp2x_gelu_original_llava_keys(features):
    """LLaVA-1.5's ``model.mm_projector.{0,2}`` (a Sequential) maps onto the same params."""
    ref = randomize_all(torch.nn.Sequential(torch.nn.Linear(32, LLM_WIDTH), torch.nn.GELU(),
                                        torch.nn.Linear(LLM_WIDTH, LLM_WIDTH)), seed=1)
    weights = mapped(ref.state_dict(), "model.mm_projector.", "mlp2x_gelu")
    ours = ProjectorRunner(tiny_config("mlp2x_gelu"))(features, weights)
    with torch.no_grad():
        assert_fp32_close(ours, ref(torch.from_numpy(features)).numpy(), "mlp2x_gelu (LLaVA keys)")


def test_linear_matches_torch_linear(features):
    ref = randomize_all(torch.nn.Linear(VISION["hidden_size"], LLM_WIDTH), seed=2)
    weights = mapped(ref.state_dict(), "model.mm_projector.", "linear")
    ours = ProjectorRunner(tiny_config("linear"))(features, weights)
    with torch.no_grad():
        assert_fp32_close(ours, ref(torch.from_numpy(features)).numpy(), "linear")


@pytest.fixture(scope="module")
def mlp1_reference():
    return randomize_all(internvl_mlp1(VISION["hidden_size"], LLM_WIDTH, 0.5), seed=3)


def test_mlp1_pixel_shuffle_matches_internvl(features, mlp1_reference):
    weights = mapped(mlp1_reference.state_dict(), "mlp1.", "mlp1")
    runner = ProjectorRunner(tiny_config("mlp1"))
    ours = runner(features, weights)
    with torch.no_grad():
        ref = internvl_project(torch.from_numpy(features), mlp1_reference, 0.5).numpy()
    assert ours.shape == (2, 4, LLM_WIDTH)
    assert_fp32_close(ours, ref, "mlp1")
    half = ProjectorRunner(tiny_config("mlp1"), dtype="float16")(features, weights)
    assert_fp16_close(half, ref, "mlp1 fp16")


def test_params_named_as_the_module():
    """What convert expects (projector_params) is what the maps produce and the library takes."""
    for kind, prefix, torch_module in (
        ("linear", "model.mm_projector.", torch.nn.Linear(32, LLM_WIDTH)),
        ("mlp1", "mlp1.", internvl_mlp1(32, LLM_WIDTH, 0.5)),
    ):
        expected = projector_params(tiny_config(kind), "float32")
        got = {k: (tuple(v.shape), "float32") for k, v in mapped(torch_module.state_dict(), prefix, kind).items()}
        assert got == expected, kind


def test_unusable_projectors_are_refused():
    with pytest.raises(MlcVisionError, match="projector_hidden_size"):
        Projector(dataclasses.replace(tiny_config(None), projector="linear"))
    with pytest.raises(MlcVisionError, match="grid"):
        Projector(tiny_config("mlp1", image_size=24))  # 3x3 grid
    with pytest.raises(MlcVisionError, match="feature 'patch'"):
        Projector(tiny_config("mlp1", feature="cls_patch"))
    with pytest.raises(MlcVisionError, match="ps_version"):
        projector_from_hf({"llm_config": {"hidden_size": 8}, "downsample_ratio": 0.5, "ps_version": "v1"})


def test_projector_from_hf_configs():
    assert projector_from_hf({"model_type": "clip_vision_model", "hidden_size": 32}) is None
    llava = LlavaConfig(text_config=tiny_llm()).to_dict()
    assert projector_from_hf(llava).options() == {"projector": "mlp2x_gelu", "projector_hidden_size": LLM_WIDTH}
    original = {"model_type": "llava", "hidden_size": 4096, "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu"}
    assert projector_from_hf(original).options() == {"projector": "mlp2x_gelu", "projector_hidden_size": 4096}
    internvl = {"llm_config": {"hidden_size": 896}, "downsample_ratio": 0.5, "ps_version": "v2"}
    assert projector_from_hf(internvl).options() == {
        "projector": "mlp1", "projector_hidden_size": 896, "downsample_ratio": 0.5}


# ---- compiled after a CLIP tower --------------------------------------------------------------------


def clip_weights(ref: CLIPVisionModel) -> dict[str, np.ndarray]:
    return {clip.WEIGHTS.rename(k): v.numpy() for k, v in ref.state_dict().items() if not clip.WEIGHTS.is_ignored(k)}


def test_mlp1_after_tower_and_rgb8_entry(mlp1_reference):
    """The shuffle sees the tower's row-major grid; ``encode_rgb8`` equals ``encode`` after preprocess."""
    from mlc_vision.runtime.preprocess import normalize

    config = tiny_config("mlp1", select_layer=-2)
    tower = randomize_all(CLIPVisionModel(CLIPVisionConfig(**VISION)), seed=5)
    built = build_module(config, "float32", "cpu")
    assert built.metadata["num_tokens"] == 4 and built.metadata["output_width"] == LLM_WIDTH
    assert built.metadata["projector"]["type"] == "mlp1"
    weights = clip_weights(tower) | mapped(mlp1_reference.state_dict(), "mlp1.", "mlp1")
    params = [tensor(weights[p["name"]]) for p in built.metadata["params"]]
    vm = compile_vm(built.mod)

    rgb = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    pixel_values = np.stack([normalize(image, config.preprocess, "torchvision") for image in rgb])
    ours = vm["encode"](tensor(pixel_values), params).numpy()
    with torch.no_grad():
        hidden = tower(torch.from_numpy(pixel_values), output_hidden_states=True).hidden_states[-2]
        ref = internvl_project(hidden[:, 1:], mlp1_reference, 0.5).numpy()
    assert_fp32_close(ours, ref, "CLIP + mlp1")

    from_bytes = vm["encode_rgb8"](tensor(rgb, "uint8"), params).numpy()
    np.testing.assert_allclose(from_bytes, ours, rtol=1e-5, atol=1e-5 * np.abs(ours).max())


# ---- a whole transformers Llava checkpoint through our loader ----------------------------------------


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=tiny_llm(),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_token_index=127,
    )
    torch.manual_seed(0)
    model = randomize_all(LlavaForConditionalGeneration(config), seed=7)
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    return model, path


def test_llava_checkpoint_end_to_end(tiny_llava, tmp_path):
    model, path = tiny_llava
    params_dir = convert(path, tmp_path / "params")
    config = checkpoint_config(resolve_source(path)).config
    assert (config.projector, config.projector_hidden_size, config.select_layer, config.feature) == (
        "mlp2x_gelu", LLM_WIDTH, -2, "patch")
    built = build_module(config, "float32", "cpu")
    assert built.metadata["num_tokens"] == 16 and built.metadata["output_width"] == LLM_WIDTH
    vm = compile_vm(built.mod)
    params = load_params(params_dir, built.metadata["params"], CPU)

    rgb = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    pre = config.preprocess
    pixel_values = ((rgb / np.float32(255) - np.float32(pre.mean)) / np.float32(pre.std)).astype(np.float32)
    pixel_values = np.ascontiguousarray(pixel_values.transpose(0, 3, 1, 2))
    ours = vm["encode"](tensor(pixel_values), params).numpy()
    with torch.no_grad():
        ref = torch.stack(list(model.get_image_features(torch.from_numpy(pixel_values)).pooler_output)).numpy()
    assert_fp32_close(ours, ref, "Llava get_image_features")
    from_bytes = vm["encode_rgb8"](tensor(rgb, "uint8"), params).numpy()
    np.testing.assert_allclose(from_bytes, ours, rtol=1e-5, atol=1e-5 * np.abs(ours).max())


# ---- the original LLaVA-1.5 repository layout ------------------------------------------------------

LLAVA15_TOWER = "openai/clip-vit-large-patch14-336"


@pytest.fixture
def tiny_tower_preset(tmp_path, monkeypatch):
    """The presets dir with one preset: LLaVA-1.5's tower preset shrunk to VISION (same hf_repo).

    An original LLaVA config names its tower (``mm_vision_tower``) instead of
    holding its config; the preset with that ``hf_repo`` supplies it.
    """
    import mlc_vision.config as config_module

    preset = config_module.preset_info("clip-vit-large-patch14-336")
    assert preset["hf_repo"] == LLAVA15_TOWER
    preset.update({k: VISION[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "image_size", "patch_size")})
    preset["preprocess"].update(size=VISION["image_size"], crop_size=VISION["image_size"])
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "tiny-llava15-tower.json").write_text(json.dumps(preset))
    monkeypatch.setattr(config_module, "PRESET_DIR", presets)
    return preset


def original_llava15_checkpoint(path, tower: CLIPVisionModel, mm_projector: torch.nn.Module):
    """liuhaotian/llava-v1.5-* layout: a LLaMA config with mm_* fields naming the tower, the tower
    under ``model.vision_tower.vision_tower.``, the projector under ``model.mm_projector.``, the LLM
    at the root (``model.layers.*``, ``model.embed_tokens``, ``lm_head``)."""
    path.mkdir()
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_size": LLM_WIDTH,
        "mm_vision_tower": LLAVA15_TOWER, "mm_hidden_size": VISION["hidden_size"], "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False, "num_hidden_layers": 1, "vocab_size": 16,
    }
    (path / "config.json").write_text(json.dumps(config))
    tower_keys = {k.removeprefix("vision_model."): v for k, v in tower.state_dict().items() if not k.endswith("position_ids")}
    tensors = {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower_keys.items()}
    tensors |= {f"model.mm_projector.{k}": v for k, v in mm_projector.state_dict().items()}
    tensors |= {"model.embed_tokens.weight": torch.randn(16, LLM_WIDTH), "lm_head.weight": torch.randn(16, LLM_WIDTH),
                "model.layers.0.mlp.up_proj.weight": torch.randn(8, LLM_WIDTH), "model.norm.weight": torch.ones(LLM_WIDTH)}
    save_torch_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def test_original_llava15_layout_through_convert(tiny_tower_preset, tmp_path):
    """mm_vision_tower + model.mm_projector.{0,2}: tower and projector converted, compiled and
    compared with LLaVA's forward (hidden_states[-2] without the class token, then the MLP)."""
    from mlc_vision.checkpoint.resolve import resolve_config

    tower = randomize_all(CLIPVisionModel(CLIPVisionConfig(**VISION, hidden_act="quick_gelu")), seed=11)
    mm_projector = randomize_all(torch.nn.Sequential(torch.nn.Linear(VISION["hidden_size"], LLM_WIDTH), torch.nn.GELU(),
                                                     torch.nn.Linear(LLM_WIDTH, LLM_WIDTH)), seed=12)
    ckpt = original_llava15_checkpoint(tmp_path / "llava-v1.5", tower, mm_projector)
    params_dir = convert(ckpt, tmp_path / "params")
    config = resolve_config(str(ckpt))
    assert (config.family, config.preset, config.select_layer, config.feature) == ("clip", "tiny-llava15-tower", -2, "patch")
    assert (config.projector, config.projector_hidden_size, config.hidden_act) == ("mlp2x_gelu", LLM_WIDTH, "quick_gelu")
    built = build_module(config, "float32", "cpu")
    params = load_params(params_dir, built.metadata["params"], CPU)
    pixels = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ours = compile_vm(built.mod)["encode"](tensor(pixels), params).numpy()
    with torch.no_grad():
        hidden = tower(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2][:, 1:]
        ref = mm_projector(hidden).numpy()
    assert_fp32_close(ours, ref, "LLaVA-1.5 original layout: tower + mm_projector")


def test_original_llava15_pads_to_square(tiny_tower_preset, tmp_path):
    from mlc_vision.checkpoint.resolve import resolve_config

    tower = CLIPVisionModel(CLIPVisionConfig(**VISION))
    mm_projector = torch.nn.Sequential(torch.nn.Linear(VISION["hidden_size"], LLM_WIDTH), torch.nn.GELU(),
                                       torch.nn.Linear(LLM_WIDTH, LLM_WIDTH))
    ckpt = original_llava15_checkpoint(tmp_path / "llava-v1.5", tower, mm_projector)
    assert resolve_config(str(ckpt)).preprocess.pad_to_square
