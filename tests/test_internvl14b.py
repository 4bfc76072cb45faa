"""InternVL-14B parity: InternViT-6B + QLLaMA against a plain-torch reference written here.

No installable package implements InternVL-14B (its code ships with the hub
checkpoint), so the reference below is written from the published architecture
(OpenGVLab's ``modeling_intern_vit.py``, ``modeling_qllama.py``,
``modeling_internvl.py``) in plain torch ops, with the checkpoint's own module
names: its ``state_dict()`` is the real checkpoint layout (``vision_model.*``,
``qllama.model.*``, ``qllama.lm_head``, ``query_tokens``, the InternVL-C/G
heads), saved as safetensors beside a ``config.json`` shaped like the hub's
(``model_type: internvl``, nested ``vision_config`` and ``qllama_config``), and
converted by our own loader. It shares no code with ``mlc_vision.models``.

Compared: every hidden state (the tower's, then QLLaMA's) and both outputs of
``encode``, fp32 and fp16; the two outputs through ``VisionEncoder``, ``mlc-vision
run`` and a LLaVA checkpoint that names the tower (run at 336 px); plus one
QLLaMA cross-attention layer at real width (``--run-slow``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from mlc_vision.checkpoint.resolve import resolve_config
from mlc_vision.errors import MlcVisionError
from mlc_vision.weights.convert import convert
from parity import assert_all_close, assert_close, randomize_all

# ---- the reference: plain torch, checkpoint names ----------------------------------------------

TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=56,
             patch_size=14, layer_norm_eps=1e-6)  # fmt: skip
QLLAMA = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, rms_norm_eps=1e-6,
              vocab_size=50)  # fmt: skip
NUM_QUERIES = 6
CROSS_EVERY = 2
CLIP_EMBED = 16


def rms_norm(x, weight, eps):
    """RMSNorm with the mean of squares in float32, cast back before the weight (InternRMSNorm / LlamaRMSNorm)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def softmax_attention(q, k, v):
    """``[b, h, n, hd]`` queries over ``[b, h, m, hd]`` keys, scale ``hd ** -0.5``, no mask."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return scores.float().softmax(-1).to(q.dtype) @ v


def heads(x, num_heads):
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def merge(x):
    b, h, n, hd = x.shape
    return x.transpose(1, 2).reshape(b, n, h * hd)


class RefEmbeddings(nn.Module):
    def __init__(self, d, patch, image):
        super().__init__()
        self.grid = image // patch
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.grid**2, d))

    def forward(self, pixels):
        patches = self.patch_embedding(pixels)
        b, d, rows, cols = patches.shape
        tokens = torch.cat([self.class_embedding.expand(b, 1, d), patches.flatten(2).transpose(1, 2)], dim=1)
        grid = self.position_embedding[:, 1:].float().reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        if (rows, cols) != (self.grid, self.grid):  # InternViT resizes its position grid at every call
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        grid = grid.reshape(1, d, rows * cols).permute(0, 2, 1)
        return tokens + torch.cat([self.position_embedding[:, :1], grid], dim=1)


class RefInternAttention(nn.Module):
    def __init__(self, d, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_norm, self.k_norm = RMSNorm(d, eps), RMSNorm(d, eps)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)  # over all d channels, before the heads split
        return self.proj(merge(softmax_attention(*(heads(t, self.num_heads) for t in (q, k, v)))))


class RefInternMlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RefInternLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["hidden_size"]
        self.attn = RefInternAttention(d, c["num_attention_heads"], c["layer_norm_eps"])
        self.mlp = RefInternMlp(d, c["intermediate_size"])
        self.norm1, self.norm2 = RMSNorm(d, c["layer_norm_eps"]), RMSNorm(d, c["layer_norm_eps"])
        self.ls1, self.ls2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class RefEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList([RefInternLayer(c) for _ in range(c["num_hidden_layers"])])


class RefInternViT(nn.Module):
    """``vision_model``: InternViT-6B (RMSNorm, qk-norm, layer scale, no final norm)."""

    def __init__(self, c):
        super().__init__()
        self.embeddings = RefEmbeddings(c["hidden_size"], c["patch_size"], c["image_size"])
        self.encoder = RefEncoder(c)

    def forward(self, pixels):
        states = [self.embeddings(pixels)]
        for layer in self.encoder.layers:
            states.append(layer(states[-1]))
        return states


def rotary(x, theta=10000.0):
    """LLaMA's rotate-half rotary embedding over ``[b, h, n, hd]``, positions 0..n-1."""
    n, hd = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
    angles = torch.outer(torch.arange(n).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RefSelfAttention(nn.Module):
    def __init__(self, d, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        q, k, v = (heads(p(x), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(merge(softmax_attention(rotary(q), rotary(k), v)))  # all-ones mask: bidirectional


class RefCrossAttention(nn.Module):
    def __init__(self, d, num_heads, vision_width, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.k_proj, self.v_proj = nn.Linear(vision_width, d, bias=False), nn.Linear(vision_width, d, bias=False)
        self.norm1, self.norm2 = RMSNorm(d, eps), RMSNorm(vision_width, eps)

    def forward(self, x, vision):
        q = heads(self.q_proj(self.norm1(x)), self.num_heads)
        kv = self.norm2(vision)
        k, v = heads(self.k_proj(kv), self.num_heads), heads(self.v_proj(kv), self.num_heads)
        return self.o_proj(merge(softmax_attention(q, k, v)))


class RefLlamaMlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RefDecoderLayer(nn.Module):
    def __init__(self, c, vision_width, cross):
        super().__init__()
        d, eps = c["hidden_size"], c["rms_norm_eps"]
        self.self_attn = RefSelfAttention(d, c["num_attention_heads"])
        self.cross_attn = RefCrossAttention(d, c["num_attention_heads"], vision_width, eps) if cross else None
        self.mlp = RefLlamaMlp(d, c["intermediate_size"])
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d, eps), RMSNorm(d, eps)

    def forward(self, x, vision):
        x = x + self.self_attn(self.input_layernorm(x))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, vision)
        return x + self.mlp(self.post_attention_layernorm(x))


class RefLlamaModel(nn.Module):
    def __init__(self, c, vision_width, cross_every):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])  # the text side's; never read
        self.layers = nn.ModuleList(
            [RefDecoderLayer(c, vision_width, i % cross_every == 0) for i in range(c["num_hidden_layers"])]
        )
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class RefQLlama(nn.Module):
    def __init__(self, c, vision_width, cross_every):
        super().__init__()
        self.model = RefLlamaModel(c, vision_width, cross_every)
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)  # never read

    def forward(self, queries, vision):
        """Each layer's input, then the final normed state (output_hidden_states' count)."""
        states = [queries]
        for layer in self.model.layers:
            states.append(layer(states[-1], vision))
        states[-1] = self.model.norm(states[-1])
        return states


class RefPoolAttention(nn.Module):
    def __init__(self, d, out, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.q_bias, self.k_bias, self.v_bias = (nn.Parameter(torch.zeros(d)) for _ in range(3))
        self.proj = nn.Linear(d, out)

    def forward(self, x, k, v):
        q = heads(F.linear(x, self.q.weight, self.q_bias), self.num_heads)
        k = heads(F.linear(k, self.k.weight, self.k_bias), self.num_heads)
        v = heads(F.linear(v, self.v.weight, self.v_bias), self.num_heads)
        return self.proj(merge(softmax_attention(q, k, v)))


class RefAttentionPool(nn.Module):
    """AttentionPoolingBlock: the token mean attends to the tokens (LayerNorms eps 1e-5); ``[b, out]``."""

    def __init__(self, d, out, num_heads=4):
        super().__init__()
        self.norm1_q, self.norm1_k, self.norm1_v = (nn.LayerNorm(d, eps=1e-5) for _ in range(3))
        self.cross_attn = RefPoolAttention(d, out, num_heads)

    def forward(self, x):
        return self.cross_attn(self.norm1_q(x.mean(1, keepdim=True)), self.norm1_k(x), self.norm1_v(x)).squeeze(1)


class RefInternVL14B(nn.Module):
    """InternVLModel: ``forward`` returns the tower's hidden states and QLLaMA's."""

    def __init__(self, tower=TOWER, qllama=QLLAMA, num_queries=NUM_QUERIES, cross_every=CROSS_EVERY):
        super().__init__()
        self.vision_model = RefInternViT(tower)
        self.qllama = RefQLlama(qllama, tower["hidden_size"], cross_every)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, qllama["hidden_size"]))
        self.text_projection = nn.Parameter(torch.zeros(qllama["hidden_size"], CLIP_EMBED))
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.clip_projector = RefAttentionPool(tower["hidden_size"], CLIP_EMBED)
        self.clip_projector2 = RefAttentionPool(qllama["hidden_size"], CLIP_EMBED)
        self.itm_head = nn.Linear(qllama["hidden_size"], 2)

    @torch.no_grad()
    def forward(self, pixels):
        tower = self.vision_model(pixels)
        queries = self.query_tokens.expand(pixels.shape[0], -1, -1)
        return tower, self.qllama(queries, tower[-1])

    @torch.no_grad()
    def encode_image(self, pixels, mode):
        """InternVL-C: the pooled vision tokens; InternVL-G: plus the pooled query outputs, each normalized."""
        tower, qllama = self(pixels)
        backbone = self.clip_projector(tower[-1])
        if mode == "InternVL-C":
            return backbone
        image = self.clip_projector2(qllama[-1])
        return backbone / backbone.norm(dim=1, keepdim=True) + image / image.norm(dim=1, keepdim=True)


# ---- the checkpoint, as the hub stores it ------------------------------------------------------


def hub_config(tower=TOWER, qllama=QLLAMA, num_queries=NUM_QUERIES, cross_every=CROSS_EVERY) -> dict:
    """config.json shaped like OpenGVLab/InternVL-14B-224px's (InternVLConfig.to_dict)."""
    return {
        "architectures": ["InternVLModel"], "model_type": "internvl", "torch_dtype": "float32",
        "auto_map": {"AutoConfig": "configuration_internvl.InternVLConfig", "AutoModel": "modeling_internvl.InternVLModel"},
        "attn_pool_num_heads": 4, "clip_embed_dim": CLIP_EMBED, "cross_attention_frequency": cross_every,
        "force_image_size": None, "hidden_size": qllama["hidden_size"], "initializer_range": 0.02,
        "label_smoothing": 0.0, "num_query_token": num_queries, "use_backbone_lora": 0, "use_qllama_lora": 0,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "num_channels": 3,
            "hidden_act": "gelu", "norm_type": "rms_norm", "qkv_bias": False, "qk_normalization": True,
            "use_flash_attn": False, "dropout": 0.0, "attention_dropout": 0.0, "drop_path_rate": 0.0,
            "initializer_range": 1e-10, "initializer_factor": 0.1, **tower,
        },
        "qllama_config": {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "num_query_token": num_queries, "cross_attention_frequency": cross_every, **qllama,
        },
    }  # fmt: skip


PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "size": 224,
    "image_processor_type": "CLIPImageProcessor",
}  # fmt: skip


# InternVL's LLaVA fork builds InternVLModel without the contrastive and ITM heads (commented out there).
LLAVA_LACKS = ("text_projection", "logit_scale", "clip_projector", "itm_head")


def save_hub_checkpoint(model: RefInternVL14B, path: Path, config: dict, prefix: str = "", drop=()) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(drop)}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    if "vision_config" in config:  # the hub checkpoint's CLIPImageProcessor at the tower's size
        size = config["vision_config"]["image_size"]
        (path / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, "size": size, "crop_size": size}))
    return path


def reference(seed: int, **arch) -> RefInternVL14B:
    torch.manual_seed(seed)
    return randomize_all(RefInternVL14B(**arch), seed + 1)


# ---- our library --------------------------------------------------------------------------------


class Library:
    """A CPU library of ``config`` with its params: ``encode`` gives both outputs, ``hidden_states`` all states."""

    def __init__(self, config, params_dir: Path, dtype: str, workdir: Path):
        from tvm.runtime.vm import VirtualMachine

        from mlc_vision.compiler.export import build_library
        from mlc_vision.compiler.module import build_module
        from mlc_vision.weights.params import load_params

        built = build_module(config, dtype, "cpu", expose_hidden_states=True)
        self.path = build_library(built.mod, "cpu", workdir / f"internvl14b-{dtype}.so", metadata=built.metadata)
        self.metadata, self.dtype = built.metadata, dtype
        self.vm = VirtualMachine(tvm.runtime.load_module(str(self.path)), tvm.cpu())
        self.params = load_params(params_dir, [p["name"] for p in built.metadata["params"]], tvm.cpu())

    def __call__(self, entry: str, pixels: np.ndarray) -> list[np.ndarray]:
        out = self.vm[entry](tvm.runtime.tensor(pixels.astype(self.dtype), tvm.cpu()), self.params)
        out = [out] if isinstance(out, tvm.runtime.Tensor) else out
        return [t.numpy().astype(np.float32) for t in out]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny InternVL-14B saved in the hub layout, converted by our loader, its config resolved."""
    work = tmp_path_factory.mktemp("internvl14b")
    model = reference(seed=3)
    ckpt = save_hub_checkpoint(model, work / "ckpt", hub_config())
    params = convert(ckpt, work / "params")
    return model, ckpt, params, resolve_config(str(ckpt)), work


@pytest.fixture(scope="module")
def tiny_fp32(tiny):
    model, ckpt, params, config, work = tiny
    return Library(config, params, "float32", work)


def pixels(batch: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def reference_outputs(model, x: np.ndarray):
    tower, qllama = model(torch.from_numpy(x))
    return [t.detach().numpy() for t in tower], [t.detach().numpy() for t in qllama]


def test_config_and_metadata_from_the_hub_layout(tiny, tiny_fp32):
    _, _, _, config, _ = tiny
    assert config.family == "internvl_14b"
    assert (config.qllama.num_query_tokens, config.qllama.cross_attention_frequency) == (NUM_QUERIES, CROSS_EVERY)
    assert (config.preprocess.resize, config.preprocess.crop_size, config.preprocess.mean) == (
        "shortest_edge", 56, (0.485, 0.456, 0.406))
    outputs = tiny_fp32.metadata["entries"]["encode"]["outputs"]
    assert [(o["name"], o["shape"]) for o in outputs] == [
        ("features", ["batch", 16, TOWER["hidden_size"]]),
        ("query_outputs", ["batch", NUM_QUERIES, QLLAMA["hidden_size"]]),
    ]
    names = {p["name"] for p in tiny_fp32.metadata["params"]}
    assert "query_tokens" in names and not any("lm_head" in n or "embed_tokens" in n or "clip_projector" in n for n in names)
    assert sum("cross_attn.k_proj" in n for n in names) == 2  # layers 0 and 2 of 3


def test_fp32_every_hidden_state_and_both_outputs(tiny, tiny_fp32):
    model = tiny[0]
    x = pixels(2, TOWER["image_size"], seed=0)
    tower, qllama = reference_outputs(model, x)
    assert_all_close(tiny_fp32("hidden_states", x), tower + qllama, "InternVL-14B hidden states")
    features, queries = tiny_fp32("encode", x)
    assert_close(features, tower[-1][:, 1:], "features (last hidden state, patch tokens)")
    assert_close(queries, qllama[-1], "query_outputs")


def test_fp16_against_the_fp32_reference(tiny):
    model, ckpt, _, config, work = tiny
    lib = Library(config, convert(ckpt, work / "params16", dtype="float16"), "float16", work)
    x = pixels(2, TOWER["image_size"], seed=1)
    tower, qllama = reference_outputs(model, x)
    features, queries = lib("encode", x)
    assert_close(features, tower[-1][:, 1:], "features", "float16")
    assert_close(queries, qllama[-1], "query_outputs", "float16")


def test_select_layer_moves_the_features_not_the_queries(tiny):
    """``select_layer -2`` returns an earlier tower state; the queries still read the last one."""
    model, ckpt, params, _, work = tiny
    config = resolve_config(str(ckpt), select_layer=-2, feature="cls_patch")
    lib = Library(config, params, "float32", work / "select")
    x = pixels(1, TOWER["image_size"], seed=2)
    tower, qllama = reference_outputs(model, x)
    features, queries = lib("encode", x)
    assert_close(features, tower[-2], "features at select_layer -2, class token kept")
    assert_close(queries, qllama[-1], "query_outputs")


def test_vision_encoder_and_cli_run_return_both_outputs(tiny, tiny_fp32, tmp_path):
    from mlc_vision.cli import cli
    from mlc_vision.runtime.encoder import FeaturesAndQueries, VisionEncoder

    model, _, params, _, _ = tiny
    x = pixels(2, TOWER["image_size"], seed=4)
    tower, qllama = reference_outputs(model, x)
    encoder = VisionEncoder(tiny_fp32.path, params)
    out = encoder(x)
    assert isinstance(out, FeaturesAndQueries)
    assert_close(out.features, tower[-1][:, 1:], "VisionEncoder features")
    assert_close(out.query_outputs, qllama[-1], "VisionEncoder query_outputs")
    assert encoder.num_patches == 16 + NUM_QUERIES  # InternVL's LLaVA tower: patches + query tokens
    chw = encoder([x[0], x[1]], match_input_dtype=True)
    assert_close(chw.query_outputs, qllama[-1], "a list of (C, H, W) arrays")

    np.save(tmp_path / "pixels.npy", x)
    result = CliRunner().invoke(cli, ["run", "--lib", str(tiny_fp32.path), "--params", str(params),
                                      "--pixel-values", str(tmp_path / "pixels.npy"), "-o", str(tmp_path / "out.npy")])
    assert result.exit_code == 0, result.output
    assert_close(np.load(tmp_path / "out.npy"), tower[-1][:, 1:], "run: features")
    assert_close(np.load(tmp_path / "out.query_outputs.npy"), qllama[-1], "run: query_outputs")
    inspect = CliRunner().invoke(cli, ["inspect", str(tiny_fp32.path)])
    assert inspect.exit_code == 0 and '"query_outputs"' in inspect.output


@pytest.mark.parametrize("mode", ["InternVL-G", "InternVL-C"])
def test_pooled_is_the_internvl_image_embedding(tiny, mode):
    """``feature="pooled"``: one output, InternVL-G's (or, by the config's ``pooled_head``, InternVL-C's) embedding."""
    model, ckpt, params, _, work = tiny
    config = resolve_config(str(ckpt), feature="pooled")
    assert config.projection_dim == CLIP_EMBED and config.qllama.pooled_head == "internvl_g"
    if mode == "InternVL-C":
        config = dataclasses.replace(config, qllama=dataclasses.replace(config.qllama, pooled_head="internvl_c"))
    lib = Library(config, params, "float32", work / mode)
    assert [o["name"] for o in lib.metadata["entries"]["encode"]["outputs"]] == ["features"]
    x = pixels(2, TOWER["image_size"], seed=9)
    (embedding,) = lib("encode", x)
    assert embedding.shape == (2, 1, CLIP_EMBED)
    assert_close(embedding[:, 0], model.encode_image(torch.from_numpy(x), mode).numpy(), f"{mode} image embedding")


def test_a_missing_query_tensor_is_an_error_that_names_it(tiny, tmp_path):
    model = tiny[0]
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "query_tokens"}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(state, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(hub_config()))
    with pytest.raises(MlcVisionError, match="query_tokens"):
        convert(ckpt, tmp_path / "params")


def test_a_projector_is_refused_in_one_line(tiny):
    with pytest.raises(MlcVisionError, match="two outputs"):
        from mlc_vision.compiler.module import build_module

        build_module(resolve_config(str(tiny[1]), projector="linear", projector_hidden_size=32), "float32", "cpu")


# ---- InternVL's LLaVA: the tower named in mm_vision_tower, run at 336 px ------------------------------


def test_llava_checkpoint_naming_internvl_14b_runs_it_at_336(tiny, tmp_path):
    model = tiny[0]
    llava = tmp_path / "llava"
    tower_dir = llava / "pretrained" / "internvl_14b_224px"
    save_hub_checkpoint(model, llava, {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_size": 32,
        "mm_vision_tower": "./pretrained/internvl_14b_224px", "mm_vision_select_layer": -1,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
    }, prefix="model.vision_tower.vision_tower.", drop=LLAVA_LACKS)  # fmt: skip
    tower_dir.mkdir(parents=True)
    (tower_dir / "config.json").write_text(json.dumps(hub_config()))
    config = resolve_config(str(llava))
    assert (config.family, config.image_size, config.preprocess.crop_size) == ("internvl_14b", 336, 336)
    assert config.preprocess.pad_to_square and config.tiling is None
    assert config.projection_dim is None  # no InternVL-C/G heads in this copy of the model
    params = convert(llava, tmp_path / "params")
    lib = Library(config, params, "float32", tmp_path)
    x = pixels(1, 336, seed=5)
    tower, qllama = reference_outputs(model, x)  # the reference interpolates its position grid at the call
    features, queries = lib("encode", x)
    assert_close(features, tower[-1][:, 1:], "LLaVA InternVL-14B features at 336 px")
    assert_close(queries, qllama[-1], "LLaVA InternVL-14B query_outputs at 336 px")


# ---- one QLLaMA cross-attention layer at real width -----------------------------------------------

REAL_TOWER = dict(hidden_size=3200, intermediate_size=12800, num_hidden_layers=1, num_attention_heads=25,
                  image_size=224, patch_size=14, layer_norm_eps=1e-6)  # fmt: skip
REAL_QLLAMA = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                   rms_norm_eps=1e-6, vocab_size=8)  # fmt: skip


@pytest.mark.slow
def test_real_width_cross_attention_layer(tmp_path):
    """One InternViT-6B layer and one QLLaMA layer with cross-attention, at the real widths and 96 queries."""
    arch = dict(tower=REAL_TOWER, qllama=REAL_QLLAMA, num_queries=96, cross_every=2)
    model = reference(seed=7, **arch)
    ckpt = save_hub_checkpoint(model, tmp_path / "ckpt", hub_config(**arch))
    params = convert(ckpt, tmp_path / "params")
    config = resolve_config(str(ckpt))
    lib = Library(config, params, "float32", tmp_path)
    x = pixels(1, 224, seed=8)
    tower, qllama = reference_outputs(model, x)
    assert_all_close(lib("hidden_states", x), tower + qllama, "real-width InternVL-14B layer")
