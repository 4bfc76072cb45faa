"""Every shipped preset at full depth, fp32, batch 1, against its torch reference (slow).

For each preset: the family's reference model with the preset's exact
architecture and every parameter random (``randomize_all``), saved in the
checkpoint format the family reads, converted by ``convert``, checked to
resolve to the preset's architecture, then the PRESET itself (as shipped:
its select_layer and feature) compiled for the CPU and compared with the
reference's features. The figures are printed (``make test-slow`` passes
``--parity-report``). A preset whose reference and params do not fit in this
machine's free memory is skipped with the amount it needs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from mlc_vision.checkpoint.resolve import resolve_config
from mlc_vision.config import VisionConfig, list_presets, load_preset
from mlc_vision.weights.convert import convert
from parity import CompiledCPU, failures, measure, randomize_all

# Architecture fields the converted checkpoint must resolve to, as the preset states them.
ARCHITECTURE = ("family", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "image_size", "patch_size", "hidden_act", "norm_type", "qkv_bias", "qk_norm", "post_norm_blocks",
                "class_token", "layer_norm_eps")


def _clip(config: VisionConfig, path: Path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf = CLIPVisionConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        image_size=config.image_size, patch_size=config.patch_size, hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
    )
    model = randomize_all(CLIPVisionModel(hf), seed=1)
    model.save_pretrained(path)
    return _hidden_states_of(model)


def _siglip(config: VisionConfig, path: Path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    hf = SiglipVisionConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        image_size=config.image_size, patch_size=config.patch_size, hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps, vision_use_head=config.use_head,
    )
    model = randomize_all(SiglipVisionModel(hf), seed=2)
    model.save_pretrained(path)
    return _hidden_states_of(model)


def _hidden_states_of(model):
    def run(pixels: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return [h.numpy() for h in model(torch.from_numpy(pixels), output_hidden_states=True).hidden_states]

    return run


def _dinov2(config: VisionConfig, path: Path):
    """Saved at the checkpoint's resolution; the reference interpolates its positions itself.
    hidden_states[-1] stands for last_hidden_state after the final LayerNorm (post_norm_tokens)."""
    from test_dinov2 import make_reference, reference_outputs

    assert config.register_tokens == 0, "dinov2 presets without registers"
    model = make_reference(
        "plain", path, seed=5, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, mlp_ratio=config.intermediate_size // config.hidden_size,
        image_size=config.checkpoint_image_size or config.image_size, patch_size=config.patch_size,
    )

    def run(pixels: np.ndarray) -> list[np.ndarray]:
        out = reference_outputs(model, pixels)
        return [*out["hidden_states"][:-1], out["last_hidden_state"]] if config.post_norm_tokens else out["hidden_states"]

    return run


def _intern_vit(config: VisionConfig, path: Path):
    from test_intern_vit import reference_model, run_reference, save_checkpoint

    style = dict(norm_type=config.norm_type, qkv_bias=config.qkv_bias, qk_normalization=config.qk_norm)
    arch = dict(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                image_size=config.image_size, patch_size=config.patch_size)
    model = reference_model(style, arch, seed=3)
    save_checkpoint(model, style, arch, path)
    return lambda pixels: run_reference(model, pixels)


def _eva_clip(config: VisionConfig, path: Path):
    from test_eva_clip import make_timm, reference_outputs, save_port_checkpoint

    assert config.post_norm_blocks and config.qkv_bias, "the eva-clip preset is the E/14 style"
    dims = dict(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                image_size=config.image_size, patch_size=config.patch_size, projection_dim=config.projection_dim)
    model = make_timm("E", dims, seed=4)
    save_port_checkpoint(model, "E", dims, path)
    return lambda pixels: reference_outputs(model, pixels)["hidden_states"]


def _qwen2_vl(config: VisionConfig, path: Path):
    """Native resolution: the reference takes flattened patches and their grids (two images of 16 x 12 and 10 x 6 patches)."""
    from test_qwen2_vl import write_preset_reference

    visual = write_preset_reference(config, path)
    grids = [(1, 16, 12), (1, 10, 6)]

    def run(patches: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return visual(torch.from_numpy(patches), grid_thw=torch.tensor(grids)).pooler_output.numpy()

    run.grids = grids
    return run


def _internvl_14b(config: VisionConfig, path: Path):
    """InternViT-6B + QLLaMA in the hub layout; the tower's hidden states (the features; the query outputs are
    compared at tiny and one-layer real width in test_internvl14b.py)."""
    from test_internvl14b import hub_config, reference, reference_outputs, save_hub_checkpoint

    q = config.qllama
    arch = dict(
        tower=dict(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                   image_size=config.image_size, patch_size=config.patch_size, layer_norm_eps=config.layer_norm_eps),
        qllama=dict(hidden_size=q.hidden_size, intermediate_size=q.intermediate_size,
                    num_hidden_layers=q.num_hidden_layers, num_attention_heads=q.num_attention_heads,
                    rms_norm_eps=q.rms_norm_eps, vocab_size=q.vocab_size),
        num_queries=q.num_query_tokens, cross_every=q.cross_attention_frequency,
    )  # fmt: skip
    model = reference(seed=6, **arch)
    save_hub_checkpoint(model, path, hub_config(**arch))
    return lambda pixels: reference_outputs(model, pixels)[0]


# family -> writes a random checkpoint of the preset's architecture, returns pixels -> hidden states
CHECKPOINT_WRITERS = {"clip": _clip, "siglip": _siglip, "intern_vit": _intern_vit, "eva_clip": _eva_clip, "dinov2": _dinov2,
                      "qwen2_vl": _qwen2_vl, "internvl_14b": _internvl_14b}


def parameter_count(config: VisionConfig) -> int:
    """Weights of the full tower (the MLP and attention matrices dominate)."""
    d, m = config.hidden_size, config.intermediate_size
    tower = config.num_hidden_layers * (4 * d * d + 2 * d * m) + config.num_positions * d
    return tower + _qllama_parameter_count(config)


def _qllama_parameter_count(config: VisionConfig) -> int:
    """InternVL-14B's QLLaMA as its checkpoint holds it: layers, cross-attention layers, embedding and LM head."""
    q = config.qllama
    if q is None:
        return 0
    d, m, v = q.hidden_size, q.intermediate_size, config.hidden_size
    cross = -(-q.num_hidden_layers // q.cross_attention_frequency)
    return q.num_hidden_layers * (4 * d * d + 3 * d * m) + cross * (2 * d * d + 2 * v * d) + 2 * q.vocab_size * d


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def test_every_preset_has_a_writer():
    assert {load_preset(name).family for name in list_presets()} <= set(CHECKPOINT_WRITERS)


@pytest.mark.slow
@pytest.mark.parametrize("preset", list_presets())
def test_preset_full_depth_fp32(preset, tmp_path):
    config = load_preset(preset)
    need = 3 * 4 * parameter_count(config)  # torch model, our params, conversion and activations
    if available_memory() < need:
        pytest.skip(f"{preset}: needs about {need / 2**30:.0f} GiB free, {available_memory() / 2**30:.0f} GiB here")
    reference = CHECKPOINT_WRITERS[config.family](config, tmp_path / "ckpt")
    # a preset compiled at another size than its checkpoint's (dinov2-large: 518 -> 224) converts at its size
    resized = config.image_size if config.checkpoint_image_size else None
    resolved = resolve_config(str(tmp_path / "ckpt"), image_size=resized)
    for field in ARCHITECTURE:
        assert getattr(resolved, field) == getattr(config, field), f"{preset}: checkpoint {field} differs from the preset"
    params_dir = convert(tmp_path / "ckpt", tmp_path / "params", image_size=resized)

    lib = CompiledCPU(config, params_dir, "float32", tmp_path, hidden_states=False)
    if lib.metadata.get("native_resolution"):
        return check_native_preset(preset, config, lib, reference)
    pixels = np.random.default_rng(0).standard_normal((1, 3, config.image_size, config.image_size)).astype(np.float32)
    expected = reference(pixels)[config.select_layer]
    if config.feature == "patch" and config.class_token:
        expected = expected[:, 1:]
    ours = lib.encode(pixels)
    figures = measure(ours, expected, f"{preset} at full depth ({config.num_layers_compiled} layers)", "float32")
    print(f"\n{preset}: {lib.metadata['num_tokens']} tokens -> {figures.line()}")
    broken = failures(figures)
    assert not broken, f"{preset} at full depth: " + "; ".join(broken)


def check_native_preset(preset: str, config: VisionConfig, lib, reference) -> None:
    """A native-resolution preset: two images in one call, the merged output."""
    from test_qwen2_vl import call_inputs, run

    count = sum(t * h * w for t, h, w in reference.grids)
    width = lib.metadata["native_resolution"]["inputs"][0]["shape"][1]
    patches = np.random.default_rng(0).standard_normal((count, width)).astype(np.float32)
    ours = run(lib, "encode", call_inputs(lib, patches, reference.grids))
    expected = reference(patches)
    figures = measure(ours, expected, f"{preset} at full depth ({config.num_hidden_layers} layers)", "float32")
    print(f"\n{preset}: {len(ours)} tokens -> {figures.line()}")
    broken = failures(figures)
    assert not broken, f"{preset} at full depth: " + "; ".join(broken)


def test_parameter_count_is_close_to_the_reference():
    """The memory estimate counts the tower's weights within a few percent (checked on a small tower)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = dataclasses.replace(load_preset("clip-vit-base-patch16"), num_hidden_layers=2, image_size=64)
    hf = CLIPVisionConfig(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                          num_hidden_layers=2, num_attention_heads=config.num_attention_heads, image_size=64, patch_size=16)
    actual = sum(p.numel() for p in CLIPVisionModel(hf).parameters())
    assert abs(parameter_count(config) - actual) / actual < 0.05
