"""Every preset builds for the CPU and describes its output in the metadata
(the numbers the README's table promises)."""

from __future__ import annotations

import dataclasses

import pytest

from mlc_vision.compiler.export import build_library
from mlc_vision.compiler.module import build_module
from mlc_vision.config import list_presets, load_preset

# preset -> (select_layer, feature, tokens per image, width)
EXPECTED = {
    "clip-vit-base-patch16": (-1, "cls_patch", 197, 768),
    "clip-vit-large-patch14": (-2, "patch", 256, 1024),
    "clip-vit-large-patch14-336": (-2, "patch", 576, 1024),
    "dinov2-large": (-1, "cls_patch", 257, 1024),
    "eva-clip": (-1, "patch", 256, 1792),
    "internvit-300m-448px": (-1, "patch", 1024, 1024),
    "internvit-6b-224px": (-1, "patch", 256, 3200),
    "internvit-6b-448px-v1-0": (-1, "patch", 1024, 3200),
    "internvit-6b-448px-v1-2": (-1, "patch", 1024, 3200),
    "internvit-6b-448px-v1-5": (-1, "patch", 1024, 3200),
    "internvl-14b-224px": (-1, "patch", 256, 3200),  # and 96 query outputs, 4096 wide
    "qwen2-vl-2b-vision": (-1, "patch", None, 1536),  # native resolution: tokens depend on the image
    "qwen2.5-vl-7b-vision": (-1, "patch", None, 3584),
    "siglip-base-patch16-224": (-1, "patch", 196, 768),
    "siglip-so400m-patch14-384": (-2, "patch", 729, 1152),
}


def test_every_preset_is_listed():
    assert sorted(EXPECTED) == list_presets()


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_builds_for_cpu(preset, tmp_path):
    config = load_preset(preset)
    select_layer, feature, tokens, width = EXPECTED[preset]
    assert (config.select_layer, config.feature) == (select_layer, feature)
    # Two layers are enough to build every kernel the full depth uses (layers share them).
    shallow = dataclasses.replace(config, num_hidden_layers=2, select_layer=-1)
    if config.qllama is not None:  # InternVL-14B: two QLLaMA layers, one with cross-attention
        shallow = dataclasses.replace(shallow, qllama=dataclasses.replace(config.qllama, num_hidden_layers=2))
    built = build_module(shallow, "float32", "cpu")
    assert (built.metadata["num_tokens"], built.metadata["output_width"]) == (tokens, width)
    lib = build_library(built.mod, "cpu", tmp_path / f"{preset}.so", metadata=built.metadata)
    assert lib.is_file() and (tmp_path / f"{preset}.so.json").is_file()
