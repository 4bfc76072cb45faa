"""From a VisionConfig to an IRModule with ``encode`` and ``_metadata``.

Nothing here needs weights, a GPU or the network: parameters are arguments
(one packed tuple), described in the metadata by name, shape and dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.relax.frontend import nn

from .. import __version__
from ..config import VisionConfig
from ..errors import MlcVisionError
from ..models import get_family

DTYPES = ("float32", "float16", "bfloat16")
BATCH = "batch"


@dataclass(frozen=True)
class BuiltModule:
    mod: tvm.IRModule
    metadata: dict


def build_vision_model(config: VisionConfig, dtype: str, full: bool = False) -> nn.Module:
    """The family's Relax module with parameters in ``dtype``."""
    if dtype not in DTYPES:
        raise MlcVisionError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    model = get_family(config.family).VisionModel(config, full=full)
    model.to(dtype)
    return model


def output_tokens(config: VisionConfig) -> int:
    if config.feature == "pooled":
        return 1
    if config.feature == "patch" and config.class_token:
        return config.num_patches
    return config.num_positions


def output_width(config: VisionConfig) -> int:
    if config.feature == "pooled" and config.projection_dim:
        return config.projection_dim
    return config.hidden_size


class _Exported(nn.Module):
    """Wraps a family model so that its entry points have the names of the calling convention."""

    def __init__(self, model: nn.Module):
        self.model = model

    def encode(self, pixel_values: nn.Tensor) -> nn.Tensor:
        return self.model(pixel_values)

    def hidden_states(self, pixel_values: nn.Tensor):
        return tuple(self.model.hidden_states(pixel_values))


def build_module(
    config: VisionConfig,
    dtype: str,
    target: str,
    expose_hidden_states: bool = False,
) -> BuiltModule:
    """Export the encoder as an IRModule and describe it in the metadata."""
    model = build_vision_model(config, dtype)
    size = config.image_size
    pixel_spec = nn.spec.Tensor([BATCH, config.num_channels, size, size], dtype)
    method = {"pixel_values": pixel_spec, "$": {"param_mode": "packed", "effect_mode": "none"}}
    spec = {"encode": method}
    if expose_hidden_states:
        spec["hidden_states"] = dict(method)
    # The wrapper's parameters are the model's, prefixed with "model.": strip it.
    mod, named_params = _Exported(model).export_tvm(spec=spec)
    params = [
        {"name": name.removeprefix("model."), "shape": [int(s) for s in p.shape], "dtype": str(p.dtype)}
        for name, p in named_params
    ]
    metadata = make_metadata(config, dtype, target, params, expose_hidden_states)
    mod = add_metadata_function(mod, metadata)
    return BuiltModule(mod=mod, metadata=metadata)


def make_metadata(config: VisionConfig, dtype: str, target: str, params: list[dict], hidden_states: bool) -> dict:
    """The JSON a chat runtime reads instead of hard-coding numbers."""
    tokens = output_tokens(config)
    entries = {
        "encode": {
            "inputs": [{"name": "pixel_values", "shape": [BATCH, config.num_channels, config.image_size, config.image_size],
                        "dtype": dtype, "layout": "NCHW, normalized"}],
            "output": {"shape": [BATCH, tokens, output_width(config)], "dtype": dtype},
        }
    }
    if hidden_states:
        entries["hidden_states"] = {"inputs": entries["encode"]["inputs"], "output": "tuple of [batch, tokens, hidden]"}
    return {
        "mlc_vision_version": __version__,
        "family": config.family,
        "preset": config.preset,
        "config": config.to_dict(),
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_patches": config.num_patches,
        "num_tokens": tokens,
        "output_width": output_width(config),
        "hidden_size": config.hidden_size,
        "dtype": dtype,
        "target": target,
        "select_layer": config.select_layer,
        "feature": config.feature,
        "projector": config.projector,
        "preprocess": config.preprocess.to_dict(),
        "entries": entries,
        "params": params,
    }


def add_metadata_function(mod: tvm.IRModule, metadata: dict) -> tvm.IRModule:
    """Add ``_metadata() -> str`` returning the JSON (readable without the params)."""
    builder = relax.BlockBuilder(mod)
    with builder.function("_metadata", params=[]):
        builder.emit_func_output(tvm.ir.StringImm(json.dumps(metadata, sort_keys=True)))
    return builder.finalize()
