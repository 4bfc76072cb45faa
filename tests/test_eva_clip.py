"""EVA-CLIP parity: timm's Eva (the architecture of eva02_enormous_patch14_clip_224,
shrunk), random weights, saved as a checkpoint of InternVL's Hugging Face port
of EVA-CLIP (``internvl_chat_llava/llava/model/multimodal_encoder/eva_clip``),
converted by our loader, against our CPU library.

timm is the independent reference; the port is only the checkpoint format. The
format is written down here from the port's published configuration and
modeling code (field names, defaults, module names), and every fixture checks
its key list against that description, so a guessed name cannot slip in:

* ``EvaCLIPVisionConfig`` (``model_type`` "clip_vision_model"): CLIP's vision
  fields plus ``q_bias``, ``k_bias``, ``v_bias`` (all default True) and the
  block flag ``post_layernorm`` (default False); ``projection_dim`` defaults to
  512 and is saved even by ``EvaCLIPVisionModel``, which has no projection.
* ``EvaCLIPConfig`` (``model_type`` "clip"): ``text_config``, ``vision_config``,
  ``projection_dim`` (sizes ``visual_projection``), ``logit_scale_init_value``.
* Keys: ``vision_model.embeddings.{class_embedding, patch_embedding.{weight,bias},
  position_embedding.weight}``, per layer ``self_attn.{q,k,v}_proj.weight``
  (+ ``.bias`` per flag), ``self_attn.out_proj.*``, ``layer_norm{1,2}.*``,
  ``mlp.fc{1,2}.*``, then ``vision_model.post_layernorm.*``; ``EvaCLIPModel``
  adds ``visual_projection.{weight,bias}``, ``text_model.*``,
  ``text_projection.weight`` and ``logit_scale``.

The port always uses LayerNorm. The "8B" style below (RMSNorm, no q/k/v bias)
uses ``use_rms_norm``, a field this project reads for EVA-CLIP-8B-style towers
that the port itself does not have.
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
from parity import CompiledCPU, assert_all_close, assert_fp32_close, convert_checkpoint, randomize_all

# 30 px with 8 px patches: the conv drops trailing pixels; 3 layers give 4 hidden states.
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            image_size=30, patch_size=8, projection_dim=24)

# EvaCLIPVisionConfig's fields and defaults (the port's configuration_evaclip.py).
PORT_VISION_DEFAULTS = dict(
    model_type="clip_vision_model", hidden_size=768, intermediate_size=3072, projection_dim=512,
    num_hidden_layers=12, num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
    hidden_act="gelu", layer_norm_eps=1e-5, attention_dropout=0.0, initializer_range=0.02,
    initializer_factor=1.0, q_bias=True, k_bias=True, v_bias=True, post_layernorm=False,
)
# EvaCLIPTextConfig's, for the text tower the loader must ignore (shrunk).
PORT_TEXT_CONFIG = dict(
    model_type="clip_text_model", vocab_size=16, hidden_size=16, intermediate_size=32, projection_dim=512,
    num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8, hidden_act="gelu",
    layer_norm_eps=1e-5, q_bias=True, k_bias=True, v_bias=True, post_layernorm=False,
)

# The EVA-CLIP styles: timm Eva flags, and the port's vision-config fields.
STYLES = {
    # EVA02-CLIP-E/14: post-norm LayerNorm blocks, q/v bias (timm's eva02_enormous_patch14_clip_224)
    "E": (dict(use_post_norm=True, qkv_bias=True), dict(post_layernorm=True, q_bias=True, k_bias=False, v_bias=True)),
    # The same with the port's default k_bias=True: the checkpoint holds a (random) k_proj.bias,
    # which the softmax cancels, so timm's model without one stays the reference.
    "E-kbias": (dict(use_post_norm=True, qkv_bias=True), dict(post_layernorm=True, q_bias=True, k_bias=True, v_bias=True)),
    # EVA-CLIP-8B style: pre-norm RMSNorm blocks, no q/k/v bias (use_rms_norm: see the module docstring)
    "8B": (dict(use_post_norm=False, qkv_bias=False, norm_layer=RmsNorm),
           dict(post_layernorm=False, q_bias=False, k_bias=False, v_bias=False, use_rms_norm=True)),
}

# timm Eva key -> the port's key (the fused qkv is split in port_state_dict).
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


def port_vision_keys(fields: dict, layers: int, norm_bias: bool = True) -> set[str]:
    """The vision tower's keys as the port's modules name them (``vision_model.`` prefix)."""
    norm = ("weight", "bias") if norm_bias else ("weight",)
    keys = {"vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.patch_embedding.bias", "vision_model.embeddings.position_embedding.weight"}
    keys |= {f"vision_model.post_layernorm.{n}" for n in norm}
    for i in range(layers):
        layer = f"vision_model.encoder.layers.{i}."
        keys |= {f"{layer}self_attn.{p}_proj.weight" for p in "qkvo" if p != "o"}
        keys |= {f"{layer}self_attn.{p}_proj.bias" for p in "qkv" if fields[f"{p}_bias"]}
        keys |= {f"{layer}self_attn.out_proj.weight", f"{layer}self_attn.out_proj.bias"}
        keys |= {f"{layer}layer_norm{j}.{n}" for j in (1, 2) for n in norm}
        keys |= {f"{layer}mlp.fc{j}.{n}" for j in (1, 2) for n in ("weight", "bias")}
    return keys


# ---- the reference ---------------------------------------------------------------------------


def make_timm(style: str, dims: dict, seed: int) -> Eva:
    """A random timm Eva with the flags of one EVA-CLIP style; every parameter random."""
    torch.manual_seed(seed)
    flags, _ = STYLES[style]
    model = Eva(
        img_size=dims["image_size"], patch_size=dims["patch_size"], embed_dim=dims["hidden_size"],
        depth=dims["num_hidden_layers"], num_heads=dims["num_attention_heads"],
        mlp_ratio=dims["intermediate_size"] / dims["hidden_size"], num_classes=dims["projection_dim"],
        global_pool="token", **flags,
    )
    return randomize_all(model, seed + 1)


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


def port_state_dict(model: Eva, style: str = "E", seed: int = 0) -> dict[str, torch.Tensor]:
    """timm's state dict under the port's names: fused qkv split, token/pos-embed squeezed,
    and a random ``k_proj.bias`` where the style's config says the port has one."""
    fields = STYLES[style][1]
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        match = QKV.match(key)
        if match:
            prefix = f"vision_model.encoder.layers.{match.group(1)}.self_attn."
            for part, weight in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{prefix}{part}_proj.weight"] = weight.contiguous()
            if fields["k_bias"]:
                out[f"{prefix}k_proj.bias"] = 0.5 * torch.randn(value.shape[1], generator=gen)
        elif key in ("cls_token", "pos_embed"):
            out[port_name(key)] = value.reshape(-1, value.shape[-1]).squeeze(0).contiguous()
        else:
            out[port_name(key)] = value.contiguous()
    vision = {k for k in out if k.startswith("vision_model.")}
    norm_bias = not fields.get("use_rms_norm", False)
    assert vision == port_vision_keys(fields, model.blocks.__len__(), norm_bias), (
        "fixture keys differ from the port's: " + str(sorted(vision ^ port_vision_keys(fields, len(model.blocks), norm_bias))))
    return out


def port_vision_config(style: str, dims: dict, eps: float) -> dict:
    """EvaCLIPVisionConfig.to_dict(): every field of the port, the defaults overridden by the style
    (``projection_dim`` keeps its default 512: EvaCLIPModel's outer value sizes the head)."""
    shape = {k: v for k, v in dims.items() if k != "projection_dim"}
    return {**PORT_VISION_DEFAULTS, **shape, "layer_norm_eps": eps, **STYLES[style][1]}


def port_config(style: str, dims: dict, eps: float) -> dict:
    """config.json as the port's EvaCLIPModel saves it."""
    return dict(model_type="clip", architectures=["EvaCLIPModel"], projection_dim=dims["projection_dim"],
                logit_scale_init_value=2.6592, vision_config=port_vision_config(style, dims, eps),
                text_config=PORT_TEXT_CONFIG)


def text_tower_tensors(dims: dict) -> dict[str, torch.Tensor]:
    """A one-layer text tower, its projection and the logit scale (keys the loader must ignore)."""
    t = PORT_TEXT_CONFIG
    width, layer = t["hidden_size"], "text_model.encoder.layers.0."
    tensors = {"text_model.embeddings.token_embedding.weight": torch.randn(t["vocab_size"], width),
               "text_model.embeddings.position_embedding.weight": torch.randn(t["max_position_embeddings"], width),
               "text_model.final_layer_norm.weight": torch.ones(width), "text_model.final_layer_norm.bias": torch.zeros(width),
               "text_projection.weight": torch.randn(dims["projection_dim"], width), "logit_scale": torch.tensor(2.6592)}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        tensors[f"{layer}self_attn.{proj}.weight"] = torch.randn(width, width)
        tensors[f"{layer}self_attn.{proj}.bias"] = torch.randn(width)
    return tensors


def save_port_checkpoint(model: Eva, style: str, dims: dict, path) -> None:
    """model.safetensors + config.json of an EvaCLIPModel."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = port_state_dict(model, style)
    assert {k for k in tensors if k.startswith("visual_projection.")} == {"visual_projection.weight", "visual_projection.bias"}
    tensors.update(text_tower_tensors(dims))
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(port_config(style, dims, model.norm.eps), indent=2))


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
    expected = reference["expected"]["hidden_states"]
    assert len(expected) == TINY["num_hidden_layers"] + 1
    assert_all_close(lib.hidden_states(reference["pixels"]), expected, f"{style} hidden_states")
    embeds = lib.encode(reference["pixels"])
    assert embeds.shape == (2, 1, TINY["projection_dim"])
    assert_fp32_close(embeds[:, 0], reference["expected"]["image_embeds"], f"{style} image_embeds")


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


@pytest.mark.parametrize("style", ["8B", "E"])
def test_fp16_against_fp32_reference(references, tmp_path, style):
    reference = references(style)
    lib = compiled(reference, tmp_path, dtype="float16", select_layer=-1, feature="pooled")
    assert_all_close(lib.hidden_states(reference["pixels"]), reference["expected"]["hidden_states"],
                     f"{style} fp16 hidden_states", "float16")
    assert_all_close([lib.encode(reference["pixels"])[:, 0]], [reference["expected"]["image_embeds"]],
                     f"{style} fp16 embeds", "float16")


def vision_model_checkpoint(model: Eva, path) -> None:
    """An EvaCLIPVisionModel (LLaVA's tower): flat vision config with the port's default
    projection_dim (512, no projection behind it), ``vision_model.*`` keys only."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for k, v in port_state_dict(model, "E").items() if not k.startswith("visual_projection.")}
    save_file(tensors, str(path / "model.safetensors"))
    vision = dict(port_vision_config("E", TINY, model.norm.eps), architectures=["EvaCLIPVisionModel"])
    assert vision["projection_dim"] == 512
    (path / "config.json").write_text(json.dumps(vision))


def test_vision_model_checkpoint_without_projection(tmp_path):
    model = make_timm("E", TINY, seed=7)
    vision_model_checkpoint(model, tmp_path / "ckpt")
    params_dir = convert_checkpoint(tmp_path / "ckpt", tmp_path / "params")
    pixels = np.random.default_rng(2).standard_normal((1, 3, 30, 30)).astype("float32")
    expected = reference_outputs(model, pixels)["hidden_states"]

    config = resolve_config(str(tmp_path / "ckpt"), select_layer=-2, feature="patch")
    assert config.family == "eva_clip"
    lib = CompiledCPU(config, params_dir, "float32", tmp_path)
    assert lib.metadata["output_width"] == TINY["hidden_size"]
    assert_all_close(lib.hidden_states(pixels), expected[:-1], "EvaCLIPVisionModel hidden_states")
    assert_fp32_close(lib.encode(pixels), expected[-2][:, 1:], "EvaCLIPVisionModel patch features")


def test_vision_model_pooled_is_the_normed_class_token(tmp_path):
    """EvaCLIPVisionModel's pooler_output: post_layernorm of the class token, no projection
    (the default projection_dim of its config has no weights behind it)."""
    model = make_timm("E", TINY, seed=8)
    vision_model_checkpoint(model, tmp_path / "ckpt")
    params_dir = convert_checkpoint(tmp_path / "ckpt", tmp_path / "params")
    pixels = np.random.default_rng(3).standard_normal((1, 3, 30, 30)).astype("float32")
    last = reference_outputs(model, pixels)["hidden_states"][-1]
    with torch.no_grad():
        pooled = model.norm(torch.from_numpy(last[:, 0])).numpy()
    config = resolve_config(str(tmp_path / "ckpt"), feature="pooled")
    lib = CompiledCPU(config, params_dir, "float32", tmp_path, hidden_states=False)
    assert (lib.metadata["num_tokens"], lib.metadata["output_width"]) == (1, TINY["hidden_size"])
    assert_fp32_close(lib.encode(pixels)[:, 0], pooled, "EvaCLIPVisionModel pooler_output")


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
    assert_all_close(lib.hidden_states(x), expected["hidden_states"], f"{image_size} px hidden_states")
    assert_fp32_close(lib.encode(x)[:, 0], expected["image_embeds"], f"{image_size} px image_embeds")


# ---- routing and config --------------------------------------------------------------------------


def test_routing_tells_eva_from_clip_without_paths():
    """The port says model_type "clip": its EVA-only fields, architectures or keys decide."""
    eva = port_config("E", TINY, 1e-6)
    assert route(eva["vision_config"]).name == "eva_clip"
    assert route(eva).name == "eva_clip"
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
    assert_all_close(lib.hidden_states(x), expected["hidden_states"], "E/14 width hidden_states")
    assert_fp32_close(lib.encode(x)[:, 0], expected["image_embeds"], "E/14 width image_embeds")
