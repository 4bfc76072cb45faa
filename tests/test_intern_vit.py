"""InternViT parity: transformers' InternVLVisionModel as the independent reference.

transformers stores InternViT under its own names (q/k/v split, ``lambda_1``,
``layernorm_before``, ...). The tests map its random weights back to the
ORIGINAL InternViT names (``attn.qkv`` fused with rows q|k|v, ``ls1``,
``norm1``, ...: the inverse of the rename table in transformers'
``convert_internvl_weights_to_hf.py``), save them as an original checkpoint
(``model_type: intern_vit_6b``) or as an InternVL-chat one (``vision_model.``
prefix, with language-model and ``mlp1`` tensors that must be ignored), and
convert them with our own loader. Every hidden state is compared, fp32 and
fp16, for a 300M-style (LayerNorm, qkv bias) and a 6B-style (RMSNorm,
qk-norm, no qkv bias) tower, plus one layer at the 6B's real width.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import InternVLVisionConfig, InternVLVisionModel

from mlc_vision.config import VisionConfig, load_preset
from mlc_vision.errors import MlcVisionError
from mlc_vision.models import intern_vit, route
from mlc_vision.checkpoint.resolve import resolve_config
from mlc_vision.compiler.module import build_module
from mlc_vision.weights.convert import convert
from mlc_vision.models.transforms import bicubic_matrix, interpolate_position_embedding, resize_bicubic
from parity import CompiledCPU, assert_all_close, assert_fp32_close, randomize_all

# Small towers with every feature of the real ones: 56 px / 14 = a 4x4 grid + class token.
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14)
STYLES = {
    # InternViT-300M: LayerNorm, qkv bias, no qk-norm
    "300m": dict(norm_type="layer_norm", qkv_bias=True, qk_normalization=False),
    # InternViT-6B: RMSNorm, no qkv bias, RMSNorm on q and k over all channels
    "6b": dict(norm_type="rms_norm", qkv_bias=False, qk_normalization=True),
}

# ---- transformers' names -> the original InternViT names ---------------------------------

HF_TO_ORIGINAL = (
    (r"^embeddings\.cls_token$", "embeddings.class_embedding"),
    (r"^embeddings\.position_embeddings$", "embeddings.position_embedding"),
    (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
    (r"^encoder\.layer\.(\d+)\.lambda_(\d)$", r"encoder.layers.\1.ls\2"),
    (r"^encoder\.layer\.(\d+)\.attention\.projection_layer\.", r"encoder.layers.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.([qk]_norm)\.", r"encoder.layers.\1.attn.\2."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"encoder.layers.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"encoder.layers.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
)
HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")


def to_original(state_dict: dict) -> dict:
    """transformers InternVLVisionModel state dict -> original InternViT state dict."""
    out, parts = {}, {}
    for key, value in state_dict.items():
        qkv = HF_QKV.match(key)
        if qkv:
            layer, which, kind = qkv.groups()
            parts.setdefault((layer, kind), {})[which] = value
            continue
        for pattern, replacement in HF_TO_ORIGINAL:
            if re.search(pattern, key):
                out[re.sub(pattern, replacement, key)] = value.contiguous()
                break
        else:
            raise AssertionError(f"no original name for {key}")
    for (layer, kind), p in parts.items():  # original InternViT: one qkv, rows q | k | v
        out[f"encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([p["q"], p["k"], p["v"]]).contiguous()
    return out


def original_config(style: dict, arch: dict) -> dict:
    """The tower's config.json as OpenGVLab writes it (InternVisionConfig)."""
    return {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
        "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "use_flash_attn": False,
        "dropout": 0.0, "drop_path_rate": 0.0, "attention_dropout": 0.0, "initializer_factor": 0.1,
        **arch, **style,
    }


def chat_config(vision: dict) -> dict:
    """An InternVL-chat config.json around the tower's (InternVL2.5 layout, a tiny fake LLM)."""
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v2", "template": "internvl2_5",
        "force_image_size": vision["image_size"],
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32},
        "vision_config": vision,
    }


# ---- the reference ------------------------------------------------------------------------


def reference_model(style: dict, arch: dict, seed: int) -> InternVLVisionModel:
    """InternVLVisionModel with every parameter random (``randomize_all``).

    Init leaves norms at 1/0, layer scale constant, class token and position
    embedding at zero and weights at std 0.02: each would hide a mix-up (a
    swapped ls1/ls2, a dropped class row, near-uniform attention).
    """
    torch.manual_seed(seed)
    config = InternVLVisionConfig(
        **arch, norm_type=style["norm_type"], attention_bias=style["qkv_bias"], use_qk_norm=style["qk_normalization"],
        layer_norm_eps=1e-6, hidden_act="gelu", use_mean_pooling=True,  # no final LayerNorm: like InternViT
    )
    return randomize_all(InternVLVisionModel(config), seed + 1)


def save_checkpoint(model: InternVLVisionModel, style: dict, arch: dict, path: Path, chat: bool = False,
                    mlp1: torch.nn.Module | None = None) -> Path:
    """Save as an original InternViT checkpoint, or as a whole InternVL-chat one (with ``mlp1``'s
    weights when given, else a partial mlp1 that only a tower-only conversion accepts)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_original(model.state_dict())
    config = original_config(style, arch)
    if chat:
        tensors = {f"vision_model.{k}": v for k, v in tensors.items()}
        tensors.update({  # never read by the vision map
            "language_model.model.embed_tokens.weight": torch.randn(10, 32),
            "language_model.lm_head.weight": torch.randn(10, 32),
        })
        if mlp1 is None:
            tensors.update({"mlp1.0.weight": torch.randn(4 * arch["hidden_size"]),
                            "mlp1.1.weight": torch.randn(32, 4 * arch["hidden_size"])})
        else:
            tensors.update({f"mlp1.{k}": v.contiguous() for k, v in mlp1.state_dict().items()})
        config = chat_config(config)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def run_reference(model, pixels: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


def pixels_for(size: int, seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype("float32")


# ---- fixtures -----------------------------------------------------------------------------


class Tower:
    """A reference model, its original checkpoint, our params dirs, and the expected hidden states."""

    def __init__(self, name: str, root: Path):
        self.name = name
        self.model = reference_model(STYLES[name], SMALL, seed=len(name))
        self.ckpt = save_checkpoint(self.model, STYLES[name], SMALL, root / "ckpt")
        self.params = {
            "float32": convert(self.ckpt, root / "f32"),
            "float16": convert(self.ckpt, root / "f16", dtype="float16"),
        }
        self.pixels = pixels_for(SMALL["image_size"])
        self.expected = run_reference(self.model, self.pixels)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return {name: Tower(name, tmp_path_factory.mktemp(f"internvit-{name}")) for name in STYLES}


@pytest.fixture(scope="module")
def small_lib(towers, tmp_path_factory):
    """``small_lib(style, dtype)``: each small tower's library, compiled once (a compile is most of a test)."""
    cache = {}

    def get(style: str, dtype: str) -> CompiledCPU:
        if (style, dtype) not in cache:
            tower = towers[style]
            workdir = tmp_path_factory.mktemp(f"lib-{style}-{dtype}")
            cache[style, dtype] = CompiledCPU(resolve_config(str(tower.ckpt)), tower.params[dtype], dtype, workdir)
        return cache[style, dtype]

    return get


def with_params(lib: CompiledCPU, params_dir: Path) -> CompiledCPU:
    """The same library run with the params of another conversion (same architecture)."""
    other = copy.copy(lib)
    other.load(params_dir)
    return other


# ---- numpy bicubic == torch ---------------------------------------------------------------


@pytest.mark.parametrize("size, out_h, out_w", [(32, 16, 16), (32, 23, 41), (4, 7, 3), (24, 48, 48), (5, 5, 5), (1, 3, 2)])
def test_bicubic_matches_torch(size, out_h, out_w):
    grid = np.random.default_rng(size).standard_normal((size, size, 8)).astype("float32")
    ours = resize_bicubic(grid, out_h, out_w)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=(out_h, out_w), mode="bicubic", align_corners=False
    )[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_bicubic_rows_sum_to_one_and_same_size_is_identity():
    assert np.allclose(bicubic_matrix(32, 23).sum(axis=1), 1)
    assert np.array_equal(bicubic_matrix(7, 7), np.eye(7))


def _Geometry(image_size, patch_size=14, class_token=True, checkpoint_image_size=None) -> VisionConfig:
    """The smallest config with the fields the position-embedding transform reads."""
    return VisionConfig(
        family="intern_vit", hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        image_size=image_size, patch_size=patch_size, class_token=class_token,
        checkpoint_image_size=checkpoint_image_size,
    )


def test_interpolate_position_embedding_keeps_class_row():
    table = np.random.default_rng(0).standard_normal((1, 1 + 32 * 32, 16)).astype("float32")
    out = interpolate_position_embedding(table, _Geometry(336, checkpoint_image_size=448))
    assert out.shape == (1, 1 + 24 * 24, 16) and out.dtype == table.dtype
    assert np.array_equal(out[:, 0], table[:, 0])
    patches = torch.from_numpy(table[0, 1:].reshape(32, 32, 16)).permute(2, 0, 1)[None]
    ref = torch.nn.functional.interpolate(patches, size=(24, 24), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(out[0, 1:], ref[0].permute(1, 2, 0).reshape(-1, 16).numpy(), atol=1e-5)


def test_interpolate_position_embedding_2d_no_class_token_and_noop():
    table = np.random.default_rng(1).standard_normal((16, 8)).astype("float16")  # SigLIP-like [N, d]
    out = interpolate_position_embedding(table, _Geometry(84, class_token=False))
    assert out.shape == (36, 8) and out.dtype == np.float16
    same = np.ones((1, 17, 8), "float32")
    assert interpolate_position_embedding(same, _Geometry(56)) is same
    bf16 = np.random.default_rng(2).standard_normal((1, 17, 8)).astype(ml_dtypes.bfloat16)  # checkpoints are bf16
    out = interpolate_position_embedding(bf16, _Geometry(84))
    assert out.dtype == bf16.dtype and out.shape == (1, 37, 8) and np.array_equal(out[:, 0], bf16[:, 0])


def test_interpolate_position_embedding_refuses_wrong_checkpoint_size():
    with pytest.raises(MlcVisionError, match="checkpoint_image_size 448"):
        interpolate_position_embedding(np.zeros((1, 17, 8), "float32"), _Geometry(84, checkpoint_image_size=448))


# ---- routing, config, presets -------------------------------------------------------------


def test_routing_by_config_not_path(tmp_path):
    """InternViT-300M routes to intern_vit from config.json, even in a directory named like CLIP."""
    model = reference_model(STYLES["300m"], SMALL, seed=7)
    ckpt = save_checkpoint(model, STYLES["300m"], SMALL, tmp_path / "clip-vit-large-patch14-InternViT-300M-448px")
    assert resolve_config(str(ckpt)).family == "intern_vit"
    assert route({"model_type": "intern_vit_6b"}) is intern_vit.FAMILY
    assert route({"architectures": ["InternVisionModel"]}) is intern_vit.FAMILY
    keys = ["encoder.layers.0.attn.qkv.weight", "encoder.layers.0.ls1", "embeddings.class_embedding"]
    assert route({}, keys) is intern_vit.FAMILY


def test_config_from_hf_defaults_and_chat():
    six_b = intern_vit.config_from_hf({"model_type": "intern_vit_6b", "num_hidden_layers": 45, "image_size": 448})
    assert (six_b.hidden_size, six_b.num_attention_heads, six_b.head_dim, six_b.intermediate_size) == (3200, 25, 128, 12800)
    assert six_b.norm_type == "rms_norm" and six_b.qk_norm and not six_b.qkv_bias and six_b.layer_scale
    chat = intern_vit.config_from_hf(chat_config(original_config(STYLES["300m"], {**SMALL, "image_size": 448})) | {
        "force_image_size": 224, "select_layer": -2})
    assert chat.image_size == 224 and chat.checkpoint_image_size == 448 and chat.select_layer == -2


@pytest.mark.parametrize(
    "preset, width, layers, heads, norm, qkv_bias, qk_norm",
    [
        ("internvit-300m-448px", 1024, 24, 16, "layer_norm", True, False),
        ("internvit-6b-448px-v1-5", 3200, 45, 25, "rms_norm", False, True),
    ],
)
def test_presets(preset, width, layers, heads, norm, qkv_bias, qk_norm):
    config = load_preset(preset)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (width, layers, heads)
    assert (config.norm_type, config.qkv_bias, config.qk_norm, config.layer_scale) == (norm, qkv_bias, qk_norm, True)
    assert config.intermediate_size == 4 * width and config.layer_norm_eps == 1e-6 and config.hidden_act == "gelu"
    assert (config.image_size, config.patch_size, config.num_positions) == (448, 14, 1025)
    assert (config.select_layer, config.feature, config.preprocess.resize) == (-1, "patch", "exact")
    assert config.preprocess.mean == intern_vit.IMAGENET_MEAN and config.preprocess.std == intern_vit.IMAGENET_STD


# ---- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_hidden_state_fp32(towers, small_lib, style):
    tower, lib = towers[style], small_lib(style, "float32")
    assert len(tower.expected) == SMALL["num_hidden_layers"] + 1
    assert_all_close(lib.hidden_states(tower.pixels), tower.expected, f"{style} hidden_states")
    # InternVL-chat's features: the last hidden state without the class token
    assert_fp32_close(lib.encode(tower.pixels), tower.expected[-1][:, 1:], f"{style} encode")


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_hidden_state_fp16(towers, small_lib, style):
    tower, lib = towers[style], small_lib(style, "float16")
    assert_all_close(lib.hidden_states(tower.pixels), tower.expected, f"{style} fp16 hidden_states", "float16")
    assert_all_close([lib.encode(tower.pixels)], [tower.expected[-1][:, 1:]], f"{style} fp16 encode", "float16")


def test_select_layer_builds_fewer_layers(towers):
    """Layers after the selected hidden state are not in the library (nor its params)."""
    config = resolve_config(str(towers["6b"].ckpt), select_layer=-2)
    params = [p["name"] for p in build_module(config, "float32", "cpu").metadata["params"]]
    assert {name.split(".")[2] for name in params if name.startswith("encoder.layers.")} == {"0", "1"}
    assert "encoder.layers.1.attn.q_norm.weight" in params and "embeddings.position_embedding" in params


def test_internvl_chat_checkpoint(small_lib, tmp_path):
    """The tower of a whole InternVL-chat checkpoint; language_model.* and mlp1.* are not read."""
    style = STYLES["300m"]
    model = reference_model(style, SMALL, seed=11)
    ckpt = save_checkpoint(model, style, SMALL, tmp_path / "chat", chat=True)
    params_dir = convert(ckpt, tmp_path / "params", projector=False)
    config = resolve_config(str(ckpt), projector="none")
    assert (config.family, config.select_layer, config.feature) == ("intern_vit", -1, "patch")
    pixels = pixels_for(SMALL["image_size"], seed=3)
    expected = run_reference(model, pixels)
    # same architecture as the 300M-style tower: its library, with the chat checkpoint's params
    lib = with_params(small_lib("300m", "float32"), params_dir)
    assert_all_close(lib.hidden_states(pixels), expected, "chat hidden_states")
    assert_fp32_close(lib.encode(pixels), expected[-1][:, 1:], "chat encode")


def test_internvl_chat_mlp1_through_convert(tmp_path):
    """A whole InternVL-chat checkpoint converted with its projector: tower, pixel shuffle and
    mlp1 against InternVL's extract_feature (last hidden state, class token dropped)."""
    from test_projector import internvl_mlp1, internvl_project

    style = STYLES["300m"]
    model = reference_model(style, SMALL, seed=17)
    mlp1 = randomize_all(internvl_mlp1(SMALL["hidden_size"], 32, 0.5), seed=18)
    ckpt = save_checkpoint(model, style, SMALL, tmp_path / "chat", chat=True, mlp1=mlp1)
    params_dir = convert(ckpt, tmp_path / "params")
    config = resolve_config(str(ckpt))
    assert (config.projector, config.projector_hidden_size, config.downsample_ratio) == ("mlp1", 32, 0.5)
    lib = CompiledCPU(config, params_dir, "float32", tmp_path, hidden_states=False)
    assert (lib.metadata["num_tokens"], lib.metadata["output_width"]) == (4, 32)  # 4x4 grid shuffled to 2x2
    pixels = pixels_for(SMALL["image_size"], seed=4)
    with torch.no_grad():
        ref = internvl_project(torch.from_numpy(run_reference(model, pixels)[-1][:, 1:]), mlp1, 0.5).numpy()
    assert_fp32_close(lib.encode(pixels), ref, "InternVL-chat tower + mlp1")


def test_position_embedding_interpolated_at_convert(towers, tmp_path, style="6b", image_size=84):
    """Compiled at another size than the checkpoint's: equal to transformers' interpolate_pos_encoding.

    InternVLVisionModel resamples its position embedding to the input's grid
    with bicubic, align_corners=False (as InternViT's ``_get_pos_embed``), so
    running the reference at the new size is the independent check.
    """
    tower = towers[style]
    params_dir = convert(tower.ckpt, tmp_path / "params", image_size=image_size)
    config = resolve_config(str(tower.ckpt), image_size=image_size)
    assert config.checkpoint_image_size == SMALL["image_size"] and config.tokens.grid == (image_size // 14,) * 2
    pixels = pixels_for(image_size, seed=5)
    expected = run_reference(tower.model, pixels)
    lib = CompiledCPU(config, params_dir, "float32", tmp_path)
    assert_all_close(lib.hidden_states(pixels), expected, f"{style} at {image_size}px hidden_states")
    assert_fp32_close(lib.encode(pixels), expected[-1][:, 1:], f"{style} at {image_size}px encode")


def test_real_width_qk_norm_6b_layer(tmp_path):
    """One InternViT-6B layer at its real width: q/k RMSNorm over 3200 channels, 25 heads of 128.

    The MLP is narrowed (12800 -> 1024): its width tests nothing the small
    towers do not, and costs most of the time (fp16 GEMMs get no fast schedule).
    """
    six_b = load_preset("internvit-6b-448px-v1-5")
    arch = dict(
        hidden_size=six_b.hidden_size, intermediate_size=1024, num_hidden_layers=1,
        num_attention_heads=six_b.num_attention_heads, image_size=28, patch_size=six_b.patch_size,
    )
    model = reference_model(STYLES["6b"], arch, seed=13)
    ckpt = save_checkpoint(model, STYLES["6b"], arch, tmp_path / "ckpt")
    pixels = pixels_for(28, seed=9, batch=1)
    expected = run_reference(model, pixels)
    for dtype in ("float32", "float16"):
        params_dir = convert(ckpt, tmp_path / f"params-{dtype}", dtype=dtype)
        lib = CompiledCPU(resolve_config(str(ckpt)), params_dir, dtype, tmp_path)
        assert_all_close(lib.hidden_states(pixels), expected, f"6B width {dtype} hidden_states", dtype)
        assert_all_close([lib.encode(pixels)], [expected[-1][:, 1:]], f"6B width {dtype} encode", dtype)
