"""Contrastive towers: ``encode_text`` + the pooled image embedding + the logits, against
transformers' CLIPModel and SiglipModel and, for EVA-CLIP, open_clip's text tower (the one
EVA02-CLIP uses) with timm's Eva for the image side. Every parameter is random; the
checkpoints are saved in each model's own layout and converted by our loader (``--part both``)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from mlc_vision.checkpoint.resolve import resolve_config, resolve_text_config
from mlc_vision.compiler.contrastive import build_contrastive_module
from mlc_vision.compiler.export import build_library
from mlc_vision.errors import MlcVisionError
from mlc_vision.runtime.contrastive import ContrastiveEncoder, softmax
from mlc_vision.weights.convert import convert
from mlc_vision.weights.params import read_params
from parity import assert_fp16_close, assert_fp32_close
from test_eva_clip import TINY as EVA_VISION
from test_eva_clip import make_timm, port_config, port_state_dict

VOCAB, MAX_POS = 60, 12
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=VOCAB, max_position_embeddings=MAX_POS)
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              image_size=30, patch_size=8)
PROJ = 24
EOS, BOS, PAD = VOCAB - 1, VOCAB - 2, 1


def randomize_all(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: norms near 1, biases and embeddings O(0.2), weights O(1/sqrt(fan_in))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("logit_scale"):
                p.fill_(2.3)
            elif name.endswith("logit_bias"):
                p.fill_(-1.7)
            elif re.search(r"(norm|ln_\d|ln_final)[^.]*\.weight$", name):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim < 2 or "embedding" in name or "probe" in name:
                p.copy_(0.2 * noise if p.ndim < 2 else 0.5 * noise)
            else:
                p.copy_(noise / np.sqrt(p[0].numel()))
    return model.eval()


def token_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three texts of different lengths: start, random tokens, end of text, then padding (mask 0)."""
    rng = np.random.default_rng(seed)
    ids = np.full((3, 10), PAD, dtype=np.int64)
    mask = np.zeros((3, 10), dtype=np.int64)
    for row, length in enumerate((10, 5, 7)):
        ids[row, :length] = [BOS, *rng.integers(3, VOCAB - 3, length - 2), EOS]
        mask[row, :length] = 1
    return ids, mask


def pixels_for(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, 30, 30)).astype("float32")


# ---- references ----------------------------------------------------------------------------------


def _torch_outputs(model, ids, mask, pixels) -> dict:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    pixel_values=torch.from_numpy(pixels))
    return {k: getattr(out, k).numpy() for k in ("text_embeds", "image_embeds", "logits_per_image")}


def clip_reference(path, eos_token_id: int = EOS):
    text = dict(TEXT, eos_token_id=eos_token_id, bos_token_id=BOS, pad_token_id=PAD)
    model = randomize_all(CLIPModel(CLIPConfig(vision_config=VISION, text_config=text, projection_dim=PROJ)), seed=1)
    model.save_pretrained(path)
    return lambda ids, mask, pixels: _torch_outputs(model, ids, mask, pixels)


def siglip_reference(path):
    text = dict(TEXT, projection_size=PROJ, eos_token_id=EOS, pad_token_id=PAD)
    vision = dict(VISION, hidden_size=PROJ, num_attention_heads=4)  # SigLIP's image embedding is its width
    model = randomize_all(SiglipModel(SiglipConfig(vision_config=vision, text_config=text)), seed=2)
    model.save_pretrained(path)
    return lambda ids, mask, pixels: _torch_outputs(model, ids, mask, pixels)


# open_clip TextTransformer key -> InternVL's EvaCLIP port key (in_proj split in _eva_text_state)
OPEN_CLIP_TO_PORT = (
    (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"text_model.encoder.layers.\1.layer_norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"text_model.encoder.layers.\1.layer_norm2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"text_model.encoder.layers.\1.self_attn.out_proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"text_model.encoder.layers.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"text_model.encoder.layers.\1.mlp.fc2."),
    (r"^ln_final\.", "text_model.final_layer_norm."),
)
IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def _eva_text_state(text) -> dict:
    out = {}
    for key, value in text.state_dict().items():
        match = IN_PROJ.match(key)
        if match:
            layer, kind = match.groups()
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"text_model.encoder.layers.{layer}.self_attn.{part}_proj.{kind}"] = chunk.contiguous()
        elif key == "text_projection":  # open_clip: x @ proj; the port: a Linear without bias
            out["text_projection.weight"] = value.t().contiguous()
        elif key != "attn_mask":
            for pattern, replacement in OPEN_CLIP_TO_PORT:
                if re.search(pattern, key):
                    out[re.sub(pattern, replacement, key)] = value.contiguous()
                    break
            else:
                raise AssertionError(f"no port name for open_clip key {key}")
    return out


def to_context(ids: np.ndarray) -> np.ndarray:
    """open_clip takes the whole context (padded as its tokenizer pads); causal, so padding never reaches the end of text."""
    return np.pad(ids, ((0, 0), (0, MAX_POS - ids.shape[1])), constant_values=PAD)


def eva_text_tower(width: int, heads: int, layers: int, mlp: int, seed: int):
    from open_clip.transformer import TextTransformer

    torch.manual_seed(seed)
    text = TextTransformer(context_length=MAX_POS, vocab_size=VOCAB, width=width, heads=heads, layers=layers,
                           mlp_ratio=mlp / width, output_dim=PROJ, act_layer=torch.nn.GELU)
    return randomize_all(text, seed=seed)


def eva_text_config(width: int, heads: int, layers: int, mlp: int) -> dict:
    """The port's EvaCLIPTextConfig fields (pre-norm LayerNorm blocks, q/k/v bias, erf GELU)."""
    return dict(model_type="clip_text_model", hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=heads, vocab_size=VOCAB, max_position_embeddings=MAX_POS, hidden_act="gelu",
                layer_norm_eps=1e-5, q_bias=True, k_bias=True, v_bias=True, post_layernorm=False,
                eos_token_id=EOS, pad_token_id=PAD)


def eva_reference(path):
    """EVA-CLIP in the port's layout: timm Eva (image) + open_clip's text tower (EVA02-CLIP's)."""
    vision = make_timm("E", dict(EVA_VISION, projection_dim=PROJ), seed=3)
    text = eva_text_tower(TEXT["hidden_size"], 4, 2, TEXT["intermediate_size"], seed=4)
    logit_scale = torch.tensor(2.3)
    path.mkdir(parents=True)
    tensors = port_state_dict(vision) | _eva_text_state(text) | {"logit_scale": logit_scale}
    save_file(tensors, str(path / "model.safetensors"))
    config = port_config("E", dict(EVA_VISION, projection_dim=PROJ), vision.norm.eps)
    config["text_config"] = eva_text_config(TEXT["hidden_size"], 4, 2, TEXT["intermediate_size"])
    (path / "config.json").write_text(json.dumps(config))

    def run(ids, mask, pixels):
        with torch.no_grad():
            image = vision(torch.from_numpy(pixels)).numpy()
            txt = text(torch.from_numpy(to_context(ids))).numpy()
        image = image / np.linalg.norm(image, axis=-1, keepdims=True)
        txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
        return {"text_embeds": txt, "image_embeds": image, "logits_per_image": np.exp(2.3) * image @ txt.T}

    return run


REFERENCES = {"clip": clip_reference, "siglip": siglip_reference, "eva_clip": eva_reference}


# ---- ours ------------------------------------------------------------------------------------------


def build_ours(ckpt, workdir, dtype: str) -> ContrastiveEncoder:
    params = convert(ckpt, workdir / f"params-{dtype}", dtype=dtype, part="both")
    config = resolve_config(str(ckpt), feature="pooled", projector="none")
    built = build_contrastive_module(config, resolve_text_config(str(ckpt)), dtype, "cpu", "both")
    lib = build_library(built.mod, "cpu", workdir / f"lib-{dtype}.so", metadata=built.metadata)
    return ContrastiveEncoder(lib, params)


def our_outputs(encoder: ContrastiveEncoder, ids, mask, pixels) -> dict:
    image = encoder.encode_images(pixels)
    text = encoder.encode_token_ids(ids, mask)
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return {"text_embeds": norm(text), "image_embeds": norm(image),
            "logits_per_image": encoder.logits_per_image(image, text)}


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            reference = REFERENCES[family](root / "ckpt")
            ids, mask = token_batch()
            pixels = pixels_for()
            cache[family] = dict(root=root, ckpt=root / "ckpt", expected=reference(ids, mask, pixels),
                                 ids=ids, mask=mask, pixels=pixels, encoders={})
        return cache[family]

    return get


def encoder_of(tower: dict, dtype: str) -> ContrastiveEncoder:
    """Our library and params for a tower, built once per dtype and module."""
    if dtype not in tower["encoders"]:
        tower["encoders"][dtype] = build_ours(tower["ckpt"], tower["root"], dtype)
    return tower["encoders"][dtype]


def assert_logits_within_embedding_error(ours: dict, ref: dict, logit_scale: float, what: str) -> None:
    """fp16 logits: each off by at most what its embeddings' errors allow.

    ``|cos(a', b') - cos(a, b)| <= |a' - a| + |b' - b|`` for unit vectors, so a
    logit may move by ``exp(logit_scale)`` times that and no more. The logits
    of random towers are differences of small cosines (cancellation), so a
    relative bound on them would measure the cancellation, not the library;
    a wrong scale, bias or formula still breaks this one.
    """
    d_image = np.linalg.norm(ours["image_embeds"] - ref["image_embeds"], axis=-1)
    d_text = np.linalg.norm(ours["text_embeds"] - ref["text_embeds"], axis=-1)
    allowed = np.exp(logit_scale) * (d_image[:, None] + d_text[None, :]) + 1e-5
    error = np.abs(ours["logits_per_image"] - ref["logits_per_image"])
    assert (error <= allowed).all(), f"{what}: logit errors {error.max():.3g} exceed what the embeddings allow"


@pytest.mark.parametrize("family", sorted(REFERENCES))
def test_contrastive_parity_fp32_and_fp16(towers, family):
    tower = towers(family)
    expected = tower["expected"]
    encoder = encoder_of(tower, "float32")
    ours = our_outputs(encoder, tower["ids"], tower["mask"], tower["pixels"])
    for key, ref in expected.items():
        assert_fp32_close(ours[key], ref, f"{family} float32 {key}")
    assert encoder.metadata["text"]["logits"] == ("sigmoid" if family == "siglip" else "softmax")
    half = encoder_of(tower, "float16")
    ours = our_outputs(half, tower["ids"], tower["mask"], tower["pixels"])
    for key in ("text_embeds", "image_embeds"):
        assert_fp16_close(ours[key], expected[key], f"{family} float16 {key}")
    assert_logits_within_embedding_error(ours, expected, half.logit_scale, f"{family} float16 logits_per_image")


def test_clip_legacy_eos_id_pools_the_highest_id(tmp_path):
    """CLIP configs with eos_token_id 2 pool at argmax(input_ids), as transformers does."""
    reference = clip_reference(tmp_path / "ckpt", eos_token_id=2)
    ids, mask = token_batch(seed=4)
    ids[:, 3] = np.where(mask[:, 3] == 1, VOCAB - 3, ids[:, 3])  # a higher id than the end of text's neighbours
    ours = our_outputs(build_ours(tmp_path / "ckpt", tmp_path, "float32"), ids, mask, pixels_for(1))
    assert resolve_text_config(str(tmp_path / "ckpt")).pooling == "argmax"
    expected = reference(ids, mask, pixels_for(1))
    assert_fp32_close(ours["text_embeds"], expected["text_embeds"], "legacy eos text_embeds")


def test_symbolic_length_and_batch(towers):
    """One library for every batch and length up to max_position_embeddings; longer is refused."""
    encoder = encoder_of(towers("clip"), "float32")
    ids, mask = token_batch(seed=6)
    whole = encoder.encode_token_ids(ids, mask)
    np.testing.assert_allclose(encoder.encode_token_ids(ids[1:2, :5], mask[1:2, :5]), whole[1:2], rtol=1e-5, atol=1e-5)
    long = np.full((1, MAX_POS + 1), 5)
    with pytest.raises(MlcVisionError, match="exceed the model's maximum"):
        encoder.encode_token_ids(long, np.ones_like(long))


def test_convert_parts(towers, tmp_path):
    ckpt = towers("siglip")["ckpt"]
    text, _ = read_params(convert(ckpt, tmp_path / "text", part="text"))
    vision, _ = read_params(convert(ckpt, tmp_path / "vision"))
    assert "logit_bias" in text and "text_model.head.weight" in text
    assert not any(name.startswith(("text_model.", "logit_")) for name in vision)
    assert not any(name.startswith(("embeddings.", "encoder.")) for name in text)


def test_text_part_of_a_vision_checkpoint_is_one_line(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(MlcVisionError, match="no text tower"):
        convert(tmp_path / "ckpt", tmp_path / "p", part="text")


# ---- tokenizer and the similarity command ------------------------------------------------------------


WORDS = ["a", "photo", "of", "cat", "dog", "the", "red", "car", "on", "grass"]


def save_tokenizer(path, padding_side_token: str = "<pad>") -> None:
    """A word-level fast tokenizer with start/end tokens added by its post-processor, saved as transformers does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, padding_side_token: PAD, **{w: i + 3 for i, w in enumerate(WORDS)},
             "<start>": BOS, "<end>": EOS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<start> $A <end>",
                                                       special_tokens=[("<start>", BOS), ("<end>", EOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token=padding_side_token,
                                   bos_token="<start>", eos_token="<end>")
    fast.save_pretrained(path)
    return fast


@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_tokenizer_pads_and_truncates_as_transformers(tmp_path, padding):
    from mlc_vision.runtime.tokenize import TextTokenizer

    fast = save_tokenizer(tmp_path)
    texts = ["a photo of a cat", "dog", " ".join(WORDS * 2)]  # the last one is truncated to MAX_POS
    ours = TextTokenizer(tmp_path, {"max_length": MAX_POS, "padding": padding, "pad_token_id": 0})
    ids, mask = ours(texts)
    want = fast(texts, padding="max_length" if padding == "max_length" else True, truncation=True, max_length=MAX_POS)
    np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"]))
    assert ids[2, -1] == EOS  # the end-of-text token survives truncation


def test_similarity_command(towers, tmp_path, capsys):
    from PIL import Image

    from mlc_vision.cli import main

    tower = towers("clip")
    save_tokenizer(tower["ckpt"])
    images = []
    for i, color in enumerate(((200, 30, 30), (20, 180, 40))):
        images += ["--image", str(tmp_path / f"{i}.png")]
        Image.new("RGB", (41, 33), color).save(tmp_path / f"{i}.png")
    texts = ["a photo of a cat", "the red car on grass"]
    code = main(["similarity", *images, "--text", texts[0], "--text", texts[1], "--model", str(tower["ckpt"])])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out[0] == "# clip: softmax over texts"
    probs = np.array([[float(v) for v in line.split("\t")[1:]] for line in out[2:]])
    # the same numbers from transformers, on our preprocessing and the fast tokenizer's ids
    from transformers import PreTrainedTokenizerFast

    from mlc_vision.runtime.preprocess import preprocess

    config = resolve_config(str(tower["ckpt"]))
    pixels = preprocess([str(tmp_path / "0.png"), str(tmp_path / "1.png")], config.preprocess)
    tok = PreTrainedTokenizerFast.from_pretrained(tower["ckpt"])(texts, padding=True, truncation=True, max_length=MAX_POS)
    model = CLIPModel.from_pretrained(tower["ckpt"]).eval()
    expected = _torch_outputs(model, np.asarray(tok["input_ids"]), np.asarray(tok["attention_mask"]), pixels)
    np.testing.assert_allclose(probs, softmax(expected["logits_per_image"], axis=1), atol=2e-4)


# ---- one layer at each text tower's real width (slow) -------------------------------------------------

REAL = {  # width, heads, mlp of CLIP-L/14's, SigLIP so400m's and EVA02-CLIP-E's text towers
    "clip": (768, 12, 3072),
    "siglip": (1152, 16, 4304),
    "eva_clip": (1024, 16, 4096),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(REAL))
def test_real_width_text_layer(tmp_path, family, monkeypatch):
    width, heads, mlp = REAL[family]
    monkeypatch.setitem(TEXT, "hidden_size", width)
    monkeypatch.setitem(TEXT, "num_attention_heads", heads)
    monkeypatch.setitem(TEXT, "intermediate_size", mlp)
    monkeypatch.setitem(TEXT, "num_hidden_layers", 1)
    if family == "eva_clip":
        reference = _eva_real(tmp_path / "ckpt", width, heads, mlp)
    else:
        reference = REFERENCES[family](tmp_path / "ckpt")
    ids, mask = token_batch(seed=7)
    pixels = pixels_for(2)
    ours = our_outputs(build_ours(tmp_path / "ckpt", tmp_path, "float32"), ids, mask, pixels)
    assert_fp32_close(ours["text_embeds"], reference(ids, mask, pixels)["text_embeds"], f"{family} real-width text")


def _eva_real(path, width, heads, mlp):
    vision = make_timm("E", dict(EVA_VISION, projection_dim=PROJ), seed=3)
    text = eva_text_tower(width, heads, 1, mlp, seed=8)
    path.mkdir(parents=True)
    save_file(port_state_dict(vision) | _eva_text_state(text) | {"logit_scale": torch.tensor(2.3)},
              str(path / "model.safetensors"))
    config = port_config("E", dict(EVA_VISION, projection_dim=PROJ), vision.norm.eps)
    config["text_config"] = eva_text_config(width, heads, 1, mlp)
    (path / "config.json").write_text(json.dumps(config))

    def run(ids, mask, pixels):
        with torch.no_grad():
            txt = text(torch.from_numpy(to_context(ids))).numpy()
        return {"text_embeds": txt / np.linalg.norm(txt, axis=-1, keepdims=True)}

    return run


def test_inspect_shows_the_text_entry(towers, capsys):
    from mlc_vision.cli import main

    encoder = encoder_of(towers("siglip"), "float32")
    assert main(["inspect", str(encoder.lib_path)]) == 0
    metadata = json.loads(capsys.readouterr().out)
    assert metadata["part"] == "both" and metadata["text"]["logits"] == "sigmoid"
    assert metadata["entries"]["encode_text"]["output"]["shape"] == ["batch", PROJ]
    assert metadata["entries"]["encode"]["output"]["shape"] == ["batch", 1, PROJ]
    assert {"logit_scale", "logit_bias"} <= {p["name"] for p in metadata["params"]}


def test_text_only_library(towers, tmp_path):
    """--part text: encode_text alone; VisionEncoder and ContrastiveEncoder refuse it in one line."""
    from mlc_vision.runtime.encoder import VisionEncoder

    tower = towers("eva_clip")
    config = resolve_config(str(tower["ckpt"]), feature="pooled", projector="none")
    built = build_contrastive_module(config, resolve_text_config(str(tower["ckpt"])), "float32", "cpu", "text")
    assert set(built.metadata["entries"]) == {"encode_text"}
    lib = build_library(built.mod, "cpu", tmp_path / "text.so", metadata=built.metadata)
    params = convert(tower["ckpt"], tmp_path / "params", part="text")
    with pytest.raises(MlcVisionError, match="no image entry"):
        VisionEncoder(lib, params)
    with pytest.raises(MlcVisionError, match="compile it with --part both"):
        ContrastiveEncoder(lib, params)


def test_gpu_targets_are_refused_in_one_line(towers):
    ckpt = str(towers("clip")["ckpt"])
    config = resolve_config(ckpt, feature="pooled", projector="none")
    with pytest.raises(MlcVisionError, match="build for cpu only, not 'cuda'"):
        build_contrastive_module(config, resolve_text_config(ckpt), "float16", "cuda", "both")


def test_compile_part_refuses_tower_options(towers, capsys):
    from mlc_vision.cli import main

    code = main(["compile", "--model", str(towers("clip")["ckpt"]), "--part", "both", "--select-layer", "-2"])
    assert code == 1 and "--select-layer do not apply" in capsys.readouterr().err


def test_cli_compile_convert_similarity_siglip(towers, tmp_path, capsys):
    """compile/convert --part both through the CLI, then similarity --lib --params (sigmoid per pair)."""
    from PIL import Image

    from mlc_vision.cli import main

    tower = towers("siglip")
    save_tokenizer(tower["ckpt"])
    lib, params = tmp_path / "siglip.so", tmp_path / "params"
    assert main(["compile", "--model", str(tower["ckpt"]), "--part", "both", "-o", str(lib)]) == 0
    assert main(["convert", "--model", str(tower["ckpt"]), "--part", "both", "-o", str(params)]) == 0
    assert (params / "tokenizer.json").is_file()
    Image.new("RGB", (37, 52), (90, 60, 200)).save(tmp_path / "a.png")
    capsys.readouterr()
    texts = ["a red car", "the dog on grass"]
    code = main(["similarity", "--image", str(tmp_path / "a.png"), "--text", texts[0], "--text", texts[1],
                 "--lib", str(lib), "--params", str(params)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out[0] == "# siglip: sigmoid per pair"
    printed = np.array([float(v) for v in out[2].split("\t")[1:]])
    encoder = ContrastiveEncoder(lib, params)
    assert np.allclose(printed, encoder.probabilities([str(tmp_path / "a.png")], texts)[0], atol=1e-4)
    ids, _ = encoder.tokenizer(texts)
    assert ids.shape == (2, MAX_POS)  # SigLIP pads to the maximum length
