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


def _torch_qwen2_vl(c: VisionConfig):
    """The ``visual`` tower alone (``Qwen2_5_VisionTransformerPretrainedModel`` / ``Qwen2VisionTransformerPretrainedModel``);
    it takes ``(patches [n, C*t*p*p], grid_thw)``, not pixel values."""
    common = dict(depth=c.num_hidden_layers, num_heads=c.num_attention_heads, patch_size=c.patch_size,
                  spatial_merge_size=c.spatial_merge_size, temporal_patch_size=c.temporal_patch_size)  # fmt: skip
    if c.norm_type == "rms_norm":
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

        hf = qwen.Qwen2_5_VLVisionConfig(
            **common, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            out_hidden_size=c.merger_hidden_size, window_size=c.window_size,
            fullatt_block_indexes=list(c.fullatt_block_indexes),
        )
        return qwen.Qwen2_5_VisionTransformerPretrainedModel(hf)
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen

    hf = qwen.Qwen2VLVisionConfig(**common, embed_dim=c.hidden_size, hidden_size=c.merger_hidden_size,
                                  mlp_ratio=c.intermediate_size // c.hidden_size)  # fmt: skip
    return qwen.Qwen2VisionTransformerPretrainedModel(hf)


TORCH_BUILDERS = {
    "qwen2_vl": _torch_qwen2_vl,
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
