"""The token layout: computed once from the config, written into the metadata, read by the runtime."""

from __future__ import annotations

import dataclasses

import pytest

from mlc_vision.config import TokenLayout, VisionConfig, load_preset, merge_factor
from mlc_vision.errors import MlcVisionError


def tiny(**fields) -> VisionConfig:
    base = dict(family="clip", hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                image_size=56, patch_size=14)
    return VisionConfig(**{**base, **fields}).validated()


@pytest.mark.parametrize(
    "fields, prefix, selected, output",
    [
        (dict(), 1, 16, 16),  # CLIP patch: the class token is dropped
        (dict(feature="cls_patch"), 1, 17, 17),
        (dict(class_token=False, feature="cls_patch"), 0, 16, 16),  # SigLIP: nothing to drop
        (dict(register_tokens=4), 5, 16, 16),  # DINOv2 with registers: class + 4 registers dropped
        (dict(register_tokens=4, feature="cls_patch"), 5, 21, 21),
        (dict(feature="pooled"), 1, 1, 1),
        (dict(projector="mlp1", projector_hidden_size=8, downsample_ratio=0.5), 1, 16, 4),  # 2x2 merge
    ],
)
def test_layout_counts(fields, prefix, selected, output):
    layout = tiny(**fields).tokens
    assert layout.grid == (4, 4) and layout.prefix == prefix
    assert (layout.selected, layout.output) == (selected, output)
    assert layout.sequence == prefix + 16


def test_layout_dict_and_positions():
    config = tiny(register_tokens=2, projector="mlp1", projector_hidden_size=8)
    assert config.tokens.to_dict() == {
        "prefix": 3, "class": 1, "registers": 2, "grid": [4, 4], "sequence": 19, "selected": 16,
        "dropped_prefix": 3, "merge": 2, "output_grid": [2, 2], "queries": 0, "output": 4,
    }
    assert config.num_positions == 17  # registers have no position embedding


def test_grid_drops_trailing_pixels():
    assert load_preset("siglip-so400m-patch14-384").tokens.grid == (27, 27)


def test_merge_factor_refuses_non_integer_ratio():
    assert merge_factor(0.25) == 4
    with pytest.raises(MlcVisionError, match="not 1/n"):
        merge_factor(0.3)


def test_register_tokens_must_not_be_negative():
    with pytest.raises(MlcVisionError, match="register_tokens"):
        tiny(register_tokens=-1)


def test_layout_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny().tokens.merge = 3
    assert isinstance(tiny().tokens, TokenLayout)
