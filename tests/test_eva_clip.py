"""EVA-CLIP parity: timm's Eva (the architecture of eva02_enormous_patch14_clip_224,
shrunk), random weights, saved under the key names of InternVL's EvaCLIP port
with a config.json in that port's format, converted by our loader, against our
CPU library.

timm is the independent reference; the port is only the checkpoint format.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.layers import RmsNorm
from timm.models.eva import Eva

from mlc_vision.config import load_preset
from mlc_vision.models import route
from mlc_vision.checkpoint.resolve import resolve_config
from mlc_vision.weights.convert import convert
from parity import CompiledCPU, assert_fp16_close, assert_fp32_close, convert_checkpoint

# 30 px with 8 px patches: the conv drops trailing pixels; 3 layers give 4 hidden states.
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            image_size=30, patch_size=8, projection_dim=24)

# The two EVA-CLIP styles, as timm Eva flags and as the port's vision-config fields.
STYLES = {
    # EVA02-CLIP-E/14: post-norm LayerNorm blocks, q/v bias (timm's eva02_enormous_patch14_clip_224)
    "E": (dict(use_post_norm=True, qkv_bias=True), dict(post_layernorm=True, q_bias=True, k_bias=False, v_bias=True)),
    # EVA-CLIP-8B style: pre-norm RMSNorm blocks, no q/k/v bias
    "8B": (dict(use_post_norm=False, qkv_bias=False, norm_layer=RmsNorm),
           dict(post_layernorm=False, q_bias=False, k_bias=False, v_bias=False, use_rms_norm=True)),
}

# timm Eva key -> InternVL EvaCLIP port key (the fused qkv is split in _port_state_dict).
TIMM_TO_PORT = (
    (r"^cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^pos_embed$", "vision_model.embeddings.position_embedding.weight"),
    (r"^patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.attn\.q_bias$", r"vision_model.encoder.layers.\1.self_attn.q_proj.bias"),
    (r"^blocks\.(\d+)\.attn\.v_bias$", r"vision_model.encoder.layers.\1.self_attn.v_proj.bias"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.out_proj."),
    (r"^blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.mlp\.fc(\d)\.", r"vision_model.encoder.layers.\1.mlp.fc\2."),
    (r"^norm\.", "vision_model.post_layernorm."),
    (r"^head\.", "visual_projection."),
)
QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.weight$")


# ---- the reference ---------------------------------------------------------------------------


def make_timm(style: str, dims: dict, seed: int) -> Eva:
    """A random timm Eva with the flags of one EVA-CLIP style; no parameter left at its 0/1 init."""
    torch.manual_seed(seed)
    flags, _ = STYLES[style]
    model = Eva(
        img_size=dims["image_size"], patch_size=dims["patch_size"], embed_dim=dims["hidden_size"],
        depth=dims["num_hidden_layers"], num_heads=dims["num_attention_heads"],
        mlp_ratio=dims["intermediate_size"] / dims["hidden_size"], num_classes=dims["projection_dim"],
        global_pool="token", **flags,
    ).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if re.search(r"norm\d?\.weight$", name):
                p.copy_(1 + 0.2 * noise)
            elif name == "head.weight":  # timm scales the head's init by 1e-3
                p.copy_(noise / dims["hidden_size"] ** 0.5)
            elif name.endswith("bias") or name in ("cls_token", "pos_embed"):
                p.copy_(0.2 * noise)  # timm zero-inits q_bias/v_bias and norm biases
    return model


def reference_outputs(model: Eva, pixels: np.ndarray) -> dict:
    """Every hidden state (embeddings, then each block) and the projected class token."""
    with torch.no_grad():
        x = model.patch_embed(torch.from_numpy(pixels))
        x, rope = model._pos_embed(x)
        assert rope is None
        x = model.norm_pre(x)
        states = [x]
        for block in model.blocks:
            x = block(x)
            states.append(x)
        embeds = model(torch.from_numpy(pixels))
    return {"hidden_states": [s.numpy() for s in states], "image_embeds": embeds.numpy()}


def port_name(key: str) -> str:
    for pattern, replacement in TIMM_TO_PORT:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key)
    raise KeyError(f"no port name for timm key {key!r}")


def port_state_dict(model: Eva) -> dict[str, torch.Tensor]:
    """timm's state dict under the port's names: fused qkv split, token/pos-embed squeezed."""
    out = {}
    for key, value in model.state_dict().items():
        match = QKV.match(key)
        if match:
            prefix = f"vision_model.encoder.layers.{match.group(1)}.self_attn."
            for part, weight in zip("qkv", value.chunk(3, dim=0)):
                out[f"{prefix}{part}_proj.weight"] = weight.contiguous()
        elif key in ("cls_token", "pos_embed"):
            out[port_name(key)] = value.reshape(-1, value.shape[-1]).squeeze(0).contiguous()
        else:
            out[port_name(key)] = value.contiguous()
    return out


def port_config(style: str, dims: dict, eps: float) -> dict:
    """config.json as the port's EvaCLIPModel saves it (CLIP's model types, EVA fields)."""
    _, fields = STYLES[style]
    vision = dict(
        model_type="clip_vision_model", hidden_size=dims["hidden_size"],
        intermediate_size=dims["intermediate_size"], num_hidden_layers=dims["num_hidden_layers"],
        num_attention_heads=dims["num_attention_heads"], image_size=dims["image_size"],
        patch_size=dims["patch_size"], num_channels=3, hidden_act="gelu", layer_norm_eps=eps,
        projection_dim=512, **fields,  # the port's stale default: EvaCLIPModel's outer value sizes the head
    )
    text = dict(model_type="clip_text_model", hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    return dict(model_type="clip", architectures=["EvaCLIPModel"], projection_dim=dims["projection_dim"],
                vision_config=vision, text_config=text)


def save_port_checkpoint(model: Eva, style: str, dims: dict, path) -> None:
    """model.safetensors + config.json, with a text tower's keys the loader must ignore."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = port_state_dict(model)
    tensors["text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 16)
    tensors["text_projection.weight"] = torch.zeros(dims["projection_dim"], 16)
    tensors["logit_scale"] = torch.tensor(4.6)
    save_file(tensors, str(path / "model.safetensors"))
    eps = model.norm.eps
    (path / "config.json").write_text(json.dumps(port_config(style, dims, eps), indent=2))


# ---- fixtures ------------------------------------------------------------------------------------


def build_reference(style: str, workdir) -> dict:
    """Checkpoint, fp32 and fp16 params dirs, inputs and timm's outputs for one style."""
    model = make_timm(style, TINY, seed=0)
    save_port_checkpoint(model, style, TINY, workdir / "ckpt")
    pixels = np.random.default_rng(0).standard_normal((2, 3, 30, 30)).astype("float32")
    params = {"float32": convert_checkpoint(workdir / "ckpt", workdir / "f32"),
              "float16": convert_checkpoint(workdir / "ckpt", workdir / "f16", dtype="float16")}
    return dict(style=style, ckpt=workdir / "ckpt", pixels=pixels, params=params,
                expected=reference_outputs(model, pixels))


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """``references(style)``: built once per style and module."""
    cache = {}

    def get(style: str) -> dict:
        if style not in cache:
            cache[style] = build_reference(style, tmp_path_factory.mktemp(f"eva-{style}"))
        return cache[style]

    return get


def compiled(ref, tmp_path, dtype="float32", **options):
    config = resolve_config(str(ref["ckpt"]), **options)
    assert config.family == "eva_clip"
    return CompiledCPU(config, ref["params"][dtype], dtype, tmp_path)


# ---- parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_hidden_state_and_pooled_fp32(references, tmp_path, style):
    reference = references(style)
    lib = compiled(reference, tmp_path, select_layer=-1, feature="pooled")
    ours = lib.hidden_states(reference["pixels"])
    expected = reference["expected"]["hidden_states"]
    assert len(ours) == len(expected) == TINY["num_hidden_layers"] + 1
    for i, (a, ref) in enumerate(zip(ours, expected)):
        assert_fp32_close(a, ref, f"{reference['style']} hidden_states[{i}]")
    embeds = lib.encode(reference["pixels"])
    assert embeds.shape == (2, 1, TINY["projection_dim"])
    assert_fp32_close(embeds[:, 0], reference["expected"]["image_embeds"], f"{reference['style']} image_embeds")


@pytest.mark.parametrize("select_layer,feature", [(1, "cls_patch")])  # (-2, "patch"): the test below
def test_encode_selects_layer_and_feature(references, tmp_path, select_layer, feature):
    reference = references("E")
    lib = compiled(reference, tmp_path, select_layer=select_layer, feature=feature)
    ref = reference["expected"]["hidden_states"][select_layer]
    ref = ref[:, 1:] if feature == "patch" else ref
    assert_fp32_close(lib.encode(reference["pixels"]), ref, f"encode({select_layer}, {feature})")
    names = [p["name"] for p in lib.metadata["params"]]
    assert not any(n.startswith(("post_layernorm", "visual_projection")) for n in names)
    n_layers = TINY["num_hidden_layers"] + 1 + select_layer if select_layer < 0 else select_layer
    assert len({n.split(".")[2] for n in names if n.startswith("encoder.layers.")}) == n_layers


@pytest.mark.parametrize("style", sorted(STYLES))
def test_fp16_against_fp32_reference(references, tmp_path, style):
    reference = references(style)
    lib = compiled(reference, tmp_path, dtype="float16", select_layer=-1, feature="pooled")
    for i, (a, ref) in enumerate(zip(lib.hidden_states(reference["pixels"]), reference["expected"]["hidden_states"])):
        assert_fp16_close(a, ref, f"fp16 hidden_states[{i}]")
    assert_fp16_close(lib.encode(reference["pixels"])[:, 0], reference["expected"]["image_embeds"], "fp16 embeds")


def test_vision_model_checkpoint_without_projection(tmp_path):
    """EvaCLIPVisionModel (LLaVA's tower): flat vision config, no visual_projection keys."""
    model = make_timm("E", TINY, seed=7)
    tensors = {k: v for k, v in port_state_dict(model).items() if not k.startswith("visual_projection.")}
    (tmp_path / "ckpt").mkdir()
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    vision = dict(port_config("E", TINY, model.norm.eps)["vision_config"], architectures=["EvaCLIPVisionModel"])
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(vision))
    params_dir = convert_checkpoint(tmp_path / "ckpt", tmp_path / "params")
    config = resolve_config(str(tmp_path / "ckpt"), select_layer=-2, feature="patch")
    assert config.family == "eva_clip"
    pixels = np.random.default_rng(2).standard_normal((1, 3, 30, 30)).astype("float32")
    ref = reference_outputs(model, pixels)["hidden_states"][-2][:, 1:]
    lib = CompiledCPU(config, params_dir, "float32", tmp_path, hidden_states=False)
    assert_fp32_close(lib.encode(pixels), ref, "EvaCLIPVisionModel patch features")


def test_other_image_size_interpolates_position_embedding(references, tmp_path, image_size=38):
    """``convert --image-size``: the port has no interpolation of its own, so CLIP's rule is ours.

    The reference is timm's Eva built for 38 px with its position table set to
    torch's bicubic resize (align_corners=False) of the 3x3 patch rows, the class
    row kept: the rule transformers' CLIP ``interpolate_pos_encoding`` applies.
    """
    reference = references("E")
    small = make_timm("E", TINY, seed=0)
    grid = image_size // TINY["patch_size"]
    model = make_timm("E", dict(TINY, image_size=image_size), seed=0)
    state = small.state_dict()
    pos = state["pos_embed"]
    side = TINY["image_size"] // TINY["patch_size"]
    patches = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    state["pos_embed"] = torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)
    model.load_state_dict(state)
    params_dir = convert(reference["ckpt"], tmp_path / "params", image_size=image_size)
    config = resolve_config(str(reference["ckpt"]), image_size=image_size, feature="pooled")
    x = np.random.default_rng(3).standard_normal((1, 3, image_size, image_size)).astype("float32")
    expected = reference_outputs(model, x)
    lib = CompiledCPU(config, params_dir, "float32", tmp_path)
    for i, (a, r) in enumerate(zip(lib.hidden_states(x), expected["hidden_states"])):
        assert_fp32_close(a, r, f"{image_size} px hidden_states[{i}]")
    assert_fp32_close(lib.encode(x)[:, 0], expected["image_embeds"], f"{image_size} px image_embeds")


# ---- routing and config --------------------------------------------------------------------------


def test_routing_tells_eva_from_clip_without_paths():
    """The port says model_type "clip": its EVA-only fields, architectures or keys decide."""
    eva = port_config("E", TINY, 1e-6)
    assert route(eva["vision_config"]).name == "eva_clip"
    assert route({"model_type": "clip", "architectures": ["EvaCLIPModel"]}).name == "eva_clip"
    keys = ["encoder.layers.0.self_attn.q_proj.bias", "encoder.layers.0.self_attn.q_proj.weight"]
    assert route({"model_type": "clip_vision_model"}, keys).name == "eva_clip"
    assert route({"model_type": "clip_vision_model", "hidden_size": 64}).name == "clip"
    assert route({"model_type": "clip", "architectures": ["CLIPModel"]}).name == "clip"


def test_preset_is_eva02_clip_e14():
    config = load_preset("eva-clip")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1792, 64, 16)
    assert (config.intermediate_size, config.patch_size, config.image_size, config.head_dim) == (15360, 14, 224, 112)
    assert config.post_norm_blocks and config.qkv_bias and config.patch_bias and config.norm_type == "layer_norm"
    assert (config.projection_dim, config.feature, config.num_positions) == (1024, "patch", 257)


# ---- the real width ------------------------------------------------------------------------------


def test_real_width_one_layer(tmp_path):
    """One E/14 layer at its real width (1792, 16 heads of 112, MLP 15360) on a 28 px image."""
    base = load_preset("eva-clip")
    dims = dict(hidden_size=base.hidden_size, intermediate_size=base.intermediate_size, num_hidden_layers=1,
                num_attention_heads=base.num_attention_heads, image_size=28, patch_size=base.patch_size,
                projection_dim=base.projection_dim)
    model = make_timm("E", dims, seed=5)
    save_port_checkpoint(model, "E", dims, tmp_path / "ckpt")
    params_dir = convert_checkpoint(tmp_path / "ckpt", tmp_path / "params")
    config = resolve_config(str(tmp_path / "ckpt"), feature="pooled")
    assert config.head_dim == 112
    x = np.random.default_rng(1).standard_normal((1, 3, 28, 28)).astype("float32")
    expected = reference_outputs(model, x)
    lib = CompiledCPU(config, params_dir, "float32", tmp_path)
    for i, (a, r) in enumerate(zip(lib.hidden_states(x), expected["hidden_states"])):
        assert_fp32_close(a, r, f"E/14 width hidden_states[{i}]")
    assert_fp32_close(lib.encode(x)[:, 0], expected["image_embeds"], "E/14 width image_embeds")
