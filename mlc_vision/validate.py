"""Schema checks at the boundary: a checkpoint's JSON files and the config built from them.

``config.json`` and ``preprocessor_config.json`` come from users and hubs;
a value of the wrong type or out of range (``hidden_size: "64"``,
``num_attention_heads: 0``, ``patch_size: 2**40``, ``image_mean: null``)
must stop the run before any work, in one line that names the file and the
field, instead of surfacing later as a traceback or, worse, a library that
builds. :func:`check_hf_vision_config` and :func:`check_preprocessor_config`
check the raw JSON (only the fields present: defaults are the families'
business); :func:`check_config_values` checks a finished
:class:`~mlc_vision.config.VisionConfig`, whatever it was made from (preset,
checkpoint, CLI options).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .errors import MlcVisionError

#: Activations the model builder knows (``models/layers.py``'s ``ACTIVATIONS``
#: and ``GATED_ACTIVATIONS``); kept here so that a config is checked without
#: importing TVM.
KNOWN_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_tanh", "swiglu")
#: Other names a ``config.json`` may use, which its family maps to one of ours:
#: Qwen2.5-VL's vision config says ``silu``, the gate of its gated MLP (our ``swiglu``).
HF_ACTIVATION_ALIASES = ("silu",)
MAX_WIDTH = 1 << 16
MAX_IMAGE = 1 << 14
RESAMPLE_CODES = (0, 1, 2, 3, 4, 5)


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int

    def check(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {value!r}"
        if not self.low <= value <= self.high:
            return f"must be in {self.low}..{self.high}, got {value}"
        return None


@dataclass(frozen=True)
class PositiveNumber:
    below: float = math.inf

    def check(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if not (math.isfinite(value) and 0 < value < self.below):
            return f"must be a finite number in (0, {self.below}), got {value!r}"
        return None


@dataclass(frozen=True)
class OneOf:
    values: tuple

    def check(self, value) -> str | None:
        if value not in self.values or isinstance(value, bool):
            return f"must be one of {', '.join(map(repr, self.values))}, got {value!r}"
        return None


@dataclass(frozen=True)
class Nullable:
    rule: object

    def check(self, value) -> str | None:
        return None if value is None else self.rule.check(value)


class Bool:
    @staticmethod
    def check(value) -> str | None:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


#: ``config.json`` (the vision part) field -> rule; fields not listed are the families' to read.
HF_VISION_FIELDS = {
    "hidden_size": IntRange(1, MAX_WIDTH),
    "intermediate_size": IntRange(1, 4 * MAX_WIDTH),
    "num_hidden_layers": IntRange(1, 1024),
    "num_attention_heads": IntRange(1, 1024),
    "image_size": IntRange(1, MAX_IMAGE),
    "patch_size": IntRange(1, MAX_IMAGE),
    "num_channels": IntRange(1, 16),
    "layer_norm_eps": PositiveNumber(below=1.0),
    "hidden_act": OneOf(KNOWN_ACTIVATIONS + HF_ACTIVATION_ALIASES),
    "projection_dim": Nullable(IntRange(1, MAX_WIDTH)),
}
#: The same fields of a :class:`~mlc_vision.config.VisionConfig`, where only our own activation names are valid.
CONFIG_FIELDS = {**HF_VISION_FIELDS, "hidden_act": OneOf(KNOWN_ACTIVATIONS)}

#: ``preprocessor_config.json`` field -> rule (``size``, ``crop_size``, mean and std: see below).
PREPROCESSOR_FIELDS = {
    "do_resize": Nullable(Bool),
    "do_center_crop": Nullable(Bool),
    "do_rescale": Nullable(Bool),
    "do_normalize": Nullable(Bool),
    "do_convert_rgb": Nullable(Bool),
    "resample": OneOf(RESAMPLE_CODES),
    "rescale_factor": PositiveNumber(),
}
SIZE_KEYS = ("shortest_edge", "longest_edge", "height", "width")


def _bad(path, field: str, why: str) -> MlcVisionError:
    return MlcVisionError(f"{path}: field {field!r} {why}")


def _check_fields(data: dict, rules: dict, path) -> None:
    for field, rule in rules.items():
        if field in data:
            why = rule.check(data[field])
            if why:
                raise _bad(path, field, why)


def check_hf_vision_config(vision: dict, path: str | Path) -> None:
    """Types and ranges of the vision fields of a ``config.json`` (``path`` names it in the error)."""
    if not isinstance(vision, dict):
        raise MlcVisionError(f"{path}: the vision config must be a JSON object, got {type(vision).__name__}")
    _check_fields(vision, HF_VISION_FIELDS, path)


def _check_size(value, field: str, path) -> None:
    if isinstance(value, dict):
        unknown = set(value) - set(SIZE_KEYS)
        if unknown:
            raise _bad(path, field, f"has unknown key(s) {sorted(unknown)}; known: {', '.join(SIZE_KEYS)}")
        for key, item in value.items():
            why = Nullable(IntRange(1, MAX_IMAGE)).check(item)
            if why:
                raise _bad(path, f"{field}.{key}", why)
        return
    why = IntRange(1, MAX_IMAGE).check(value)
    if why:
        raise _bad(path, field, why + " (or an object with height/width or shortest_edge)")


def _check_channels(value, field: str, path, nonzero: bool) -> None:
    values = value if isinstance(value, list) else [value]
    if len(values) != 3 and isinstance(value, list):
        raise _bad(path, field, f"must hold 3 numbers (one per channel), got {len(values)}")
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise _bad(path, field, f"must be a finite number or a list of 3, got {value!r}")
        if nonzero and item == 0:
            raise _bad(path, field, f"must not be 0 (pixels are divided by it), got {value!r}")


def check_preprocessor_config(data, path: str | Path) -> None:
    """Types and ranges of a ``preprocessor_config.json`` (``path`` names it in the error)."""
    if not isinstance(data, dict):
        raise MlcVisionError(f"{path}: must be a JSON object, got {type(data).__name__}")
    _check_fields(data, PREPROCESSOR_FIELDS, path)
    for field in ("size", "crop_size"):
        if field in data and not (field == "crop_size" and not data.get("do_center_crop")):
            _check_size(data[field], field, path)
    if data.get("do_normalize", True) is not False:
        for field in ("image_mean", "image_std"):
            if field in data:
                _check_channels(data[field], field, path, nonzero=field == "image_std")


def check_config_values(config) -> None:
    """Ranges of a :class:`~mlc_vision.config.VisionConfig` (from any source, options applied)."""
    where = f"config of {config.preset or config.family}"
    fields = {name: getattr(config, name) for name in CONFIG_FIELDS if hasattr(config, name)}
    _check_fields(fields, CONFIG_FIELDS, where)
    if config.projector_hidden_size is not None:
        why = IntRange(1, MAX_WIDTH).check(config.projector_hidden_size)
        if why:
            raise _bad(where, "projector_hidden_size", why)
    pre = config.preprocess
    for field in ("size", "crop_size"):
        why = Nullable(IntRange(1, MAX_IMAGE)).check(getattr(pre, field))
        if why:
            raise _bad(where, f"preprocess.{field}", why)
    _check_channels(list(pre.mean), "preprocess.mean", where, nonzero=False)
    _check_channels(list(pre.std), "preprocess.std", where, nonzero=True)
    why = PositiveNumber().check(pre.rescale_factor)
    if why:
        raise _bad(where, "preprocess.rescale_factor", why)


#: :class:`~mlc_vision.config.QueryTransformer` field -> rule.
QUERY_TRANSFORMER_FIELDS = {
    "num_query_tokens": IntRange(1, 4096),
    "hidden_size": IntRange(1, MAX_WIDTH),
    "intermediate_size": IntRange(1, 4 * MAX_WIDTH),
    "num_hidden_layers": IntRange(1, 1024),
    "num_attention_heads": IntRange(1, 1024),
    "cross_attention_frequency": IntRange(1, 1024),
    "rms_norm_eps": PositiveNumber(below=1.0),
    "rope_theta": PositiveNumber(),
    "vocab_size": IntRange(1, 1 << 24),
    "attn_pool_num_heads": IntRange(1, 1024),
    "pooled_head": OneOf(("internvl_c", "internvl_g")),
}


def check_query_transformer(qllama) -> None:
    """Ranges of InternVL-14B's QLLaMA settings (a preset's ``qllama`` or a checkpoint's ``qllama_config``)."""
    fields = {name: getattr(qllama, name) for name in QUERY_TRANSFORMER_FIELDS}
    _check_fields(fields, QUERY_TRANSFORMER_FIELDS, "qllama config")
