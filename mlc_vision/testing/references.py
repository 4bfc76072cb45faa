"""Torch models of each family built from a :class:`VisionConfig` (random weights).

The same architecture in transformers (timm for EVA-CLIP), up to the
compiled layer: what ``bench`` and ``scripts/gpu_check.py`` time our
libraries against. Parity with real checkpoints is proven by the tests, not
here.
"""

from __future__ import annotations

from ..config import VisionConfig
from ..errors import MlcVisionError
from . import require


def _torch_clip(c: VisionConfig):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf = CLIPVisionConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers_compiled,
        num_attention_heads=c.num_attention_heads, image_size=c.image_size, patch_size=c.patch_size,
        hidden_act=c.hidden_act,
    )
    return CLIPVisionModel(hf)


def _torch_siglip(c: VisionConfig):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    hf = SiglipVisionConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers_compiled,
        num_attention_heads=c.num_attention_heads, image_size=c.image_size, patch_size=c.patch_size,
        vision_use_head=False,
    )
    return SiglipVisionModel(hf)


def _torch_intern_vit(c: VisionConfig):
    from transformers import InternVLVisionConfig, InternVLVisionModel

    hf = InternVLVisionConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers_compiled,
        num_attention_heads=c.num_attention_heads, image_size=[c.image_size] * 2, patch_size=[c.patch_size] * 2,
        use_qk_norm=c.qk_norm, norm_type="rms_norm" if c.norm_type == "rms_norm" else "layer_norm",
        attention_bias=c.qkv_bias, use_mean_pooling=True,
    )
    return InternVLVisionModel(hf)


def _torch_eva_clip(c: VisionConfig):
    require("timm")
    import timm

    return timm.models.eva.Eva(
        img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.hidden_size, depth=c.num_layers_compiled,
        num_heads=c.num_attention_heads, mlp_ratio=c.intermediate_size / c.hidden_size, num_classes=0,
        qkv_bias=c.qkv_bias, use_post_norm=c.post_norm_blocks,
    )


TORCH_BUILDERS = {
    "clip": _torch_clip,
    "siglip": _torch_siglip,
    "intern_vit": _torch_intern_vit,
    "eva_clip": _torch_eva_clip,
}


def torch_model(config: VisionConfig):
    """The torch reference of ``config``'s family, or a one-line error for a family without one."""
    try:
        builder = TORCH_BUILDERS[config.family]
    except KeyError:
        raise MlcVisionError(
            f"no torch reference for family {config.family!r}; references exist for {', '.join(sorted(TORCH_BUILDERS))}"
        ) from None
    return builder(config)
