"""A checkpoint's ``preprocessor_config.json`` -> :class:`~mlc_vision.config.Preprocess`.

Read once, when a config is made from a checkpoint (compile and convert both
record it), so that the runtime's preprocessing and the library agree.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import HF_RESAMPLE, Preprocess
from ..errors import MlcVisionError
from ..validate import check_preprocessor_config

PROCESSOR_CONFIG = "preprocessor_config.json"
# Processors whose ``size`` is a pixel budget ({shortest_edge: min_pixels, longest_edge: max_pixels}), not a side
SMART_RESIZE_PROCESSORS = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")


def read_preprocess(path: Path, full_config: dict) -> Preprocess | None:
    """The checkpoint's preprocessing, or None when it has no ``preprocessor_config.json``.

    LLaVA keeps ``pad_to_square`` in the model config (``image_aspect_ratio: pad``).
    """
    pre_path = Path(path) / PROCESSOR_CONFIG
    if not pre_path.is_file():
        return None
    try:
        data = json.loads(pre_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MlcVisionError(f"cannot read {pre_path}: {err}") from None
    if isinstance(data, dict) and data.get("image_processor_type") in SMART_RESIZE_PROCESSORS:
        return smart_resize_config_from_hf(data, pre_path)
    check_preprocessor_config(data, pre_path)
    return preprocess_config_from_hf(data, pad_to_square=full_config.get("image_aspect_ratio") == "pad")


def preprocess_config_from_hf(preprocessor_config: dict, *, pad_to_square: bool = False) -> Preprocess:
    """A checkpoint's ``preprocessor_config.json`` (CLIP, SigLIP, ...) -> :class:`Preprocess`.

    ``size`` ``{"shortest_edge": n}`` with a center crop is CLIP's resize-then-crop;
    ``{"height": n, "width": n}`` is an exact resize (SigLIP). An old-style integer
    ``size`` means the shortest edge when the processor crops, an exact size otherwise.
    ``pad_to_square`` is not in those files (LLaVA keeps it in the model config as
    ``image_aspect_ratio: pad``), so it is passed in.
    """
    cfg = preprocessor_config
    if cfg.get("do_resize", True) is False:
        raise MlcVisionError("preprocessor config has do_resize false; a compiled library needs a fixed image size")
    do_crop = bool(cfg.get("do_center_crop", False))
    resize, size = _hf_size(cfg.get("size"), do_crop)
    crop = _square(cfg.get("crop_size"), "crop_size") if do_crop else None
    code = cfg.get("resample", 3)
    if code not in HF_RESAMPLE:
        raise MlcVisionError(f"preprocessor config has unknown resample code {code!r}; known: {sorted(HF_RESAMPLE)}")
    normalize_on = cfg.get("do_normalize", True)
    return Preprocess(
        resize=resize,
        size=size,
        crop_size=crop,
        resample=HF_RESAMPLE[code],
        rescale_factor=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
        mean=_triple(cfg.get("image_mean", (0.5, 0.5, 0.5)), "image_mean") if normalize_on else (0.0, 0.0, 0.0),
        std=_triple(cfg.get("image_std", (0.5, 0.5, 0.5)), "image_std") if normalize_on else (1.0, 1.0, 1.0),
        pad_to_square=pad_to_square,
    )


def smart_resize_config_from_hf(data: dict, path: Path) -> Preprocess:
    """``Qwen2VLImageProcessor``: ``min_pixels`` / ``max_pixels`` (or ``size`` {shortest_edge, longest_edge})."""
    size = data.get("size") if isinstance(data.get("size"), dict) else {}
    budget = {
        "min_pixels": data.get("min_pixels", size.get("shortest_edge")),
        "max_pixels": data.get("max_pixels", size.get("longest_edge")),
    }
    for name, value in budget.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MlcVisionError(f"{path}: {name} must be a positive integer, got {value!r}")
    if budget["min_pixels"] > budget["max_pixels"]:
        raise MlcVisionError(f"{path}: min_pixels {budget['min_pixels']} exceeds max_pixels {budget['max_pixels']}")
    check_preprocessor_config({k: v for k, v in data.items() if k != "size"}, path)
    fixed = preprocess_config_from_hf({**data, "size": 224, "do_center_crop": False})
    factor = int(data.get("patch_size", 14)) * int(data.get("merge_size", 2))
    return Preprocess(
        resize="smart", size=factor, crop_size=None, resample=fixed.resample, rescale_factor=fixed.rescale_factor,
        mean=fixed.mean, std=fixed.std, **budget,
    )


def _hf_size(size, do_crop: bool) -> tuple[str, int]:
    if isinstance(size, int):
        return ("shortest_edge" if do_crop else "exact"), size
    if isinstance(size, dict) and "shortest_edge" in size:
        if size.get("longest_edge"):
            raise MlcVisionError(f"preprocessor config size {size} caps the longest edge; that is not supported")
        return "shortest_edge", int(size["shortest_edge"])
    return "exact", _square(size, "size")


def _square(value, name: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and value.get("height") is not None and value.get("height") == value.get("width"):
        return int(value["height"])
    raise MlcVisionError(f"preprocessor config {name} must be an int or a square {{height, width}}, got {value!r}")


def _triple(value, name: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise MlcVisionError(f"preprocessor config {name} must have 3 values, got {value!r}")
    return tuple(float(v) for v in values)
