"""What a composite checkpoint's ``config.json`` says about its projector.

The kind (LLaVA ``linear`` / ``mlp2x_gelu``, InternVL ``mlp1``), the language
model's width it maps to, and InternVL's ``downsample_ratio``. Variants we do
not compile are refused here, before anything is built or converted.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MlcVisionError


@dataclass(frozen=True)
class ProjectorSpec:
    """What a composite checkpoint's config says about its projector."""

    kind: str
    hidden_size: int  # the LLM width the projector maps to
    downsample_ratio: float | None = None  # mlp1 only

    def options(self) -> dict:
        """VisionConfig fields (for ``dataclasses.replace`` / ``with_options``)."""
        options = {"projector": self.kind, "projector_hidden_size": self.hidden_size}
        if self.downsample_ratio is not None:
            options["downsample_ratio"] = self.downsample_ratio
        return options


def projector_from_hf(full_config: dict) -> ProjectorSpec | None:
    """The projector of a LLaVA / InternVL-chat ``config.json``; None for a plain vision checkpoint.

    Variants we do not compile (InternVL ``ps_version`` 'v1', a Llava
    projector without bias or with another activation, several feature
    layers concatenated) are refused here rather than converted wrongly.
    """
    if "llm_config" in full_config and "downsample_ratio" in full_config:
        return _internvl_chat(full_config)
    if full_config.get("model_type") in ("llava", "llava_next", "llava_onevision") and "text_config" in full_config:
        return _transformers_llava(full_config)
    if "mm_hidden_size" in full_config or "mm_projector_type" in full_config:
        return _original_llava(full_config)
    return None


def _internvl_chat(full: dict) -> ProjectorSpec:
    if full.get("ps_version", "v1") != "v2":
        raise MlcVisionError(
            f"InternVL ps_version {full.get('ps_version', 'v1')!r} (transposed pixel_shuffle) is not supported; only 'v2'"
        )
    return ProjectorSpec("mlp1", int(full["llm_config"]["hidden_size"]), float(full["downsample_ratio"]))


def _transformers_llava(full: dict) -> ProjectorSpec:
    act = full.get("projector_hidden_act", "gelu")
    if act != "gelu" or not full.get("multimodal_projector_bias", True):
        raise MlcVisionError(
            f"Llava projector with projector_hidden_act={act!r}, "
            f"multimodal_projector_bias={full.get('multimodal_projector_bias')!r} is not supported (only gelu, bias)"
        )
    if not isinstance(full.get("vision_feature_layer", -2), int):
        raise MlcVisionError(
            f"vision_feature_layer {full['vision_feature_layer']!r} concatenates several layers; not supported"
        )
    return ProjectorSpec("mlp2x_gelu", int(full["text_config"]["hidden_size"]))


def _original_llava(full: dict) -> ProjectorSpec:
    kind = full.get("mm_projector_type", "linear")  # LLaVA's builder defaults to linear
    if kind not in ("linear", "mlp2x_gelu", "two_mlp"):  # two_mlp: InternVL's LLaVA with InternVL-14B
        raise MlcVisionError(f"LLaVA mm_projector_type {kind!r} is not supported; known: linear, mlp2x_gelu, two_mlp")
    return ProjectorSpec(kind, int(full["hidden_size"]))
