"""SigLIP vision tower (SigLIP so400m/base, SigLIP2 fixed-resolution; LLaVA-OneVision's encoder).

Semantics follow transformers' ``SiglipVisionModel``:

- no class token: ``patch`` and ``cls_patch`` both keep every token
  (27 x 27 = 729 for 384/14; the conv drops the last 6 pixel rows/columns);
- ``hidden_states[0]`` is the patch embedding (conv with bias) plus the learned
  position embedding; there is no pre-norm;
- ``post_layernorm`` runs over all tokens of the last layer and gives
  transformers' ``last_hidden_state``; ``hidden_states[-1]`` is the same layer
  *before* it. Our ``patch``/``cls_patch`` features return ``hidden_states``
  (no post-norm) like every family here; ``post_norm_tokens=True`` (last layer
  only) returns ``last_hidden_state`` instead (PaliGemma, Idefics use that);
- ``feature="pooled"`` runs the attention-pooling head (``vision_use_head``)
  on ``last_hidden_state`` and returns ``[b, 1, hidden]`` (``pooler_output``).

LLaVA-OneVision takes ``hidden_states[-1]`` of a tower whose config has 26
layers (so400m has 27: its last layer is dropped), without post-norm, all 729
tokens: from the 27-layer google checkpoint that is ``select_layer=-2``.

SigLIP2 NaFlex (``model_type`` ``siglip2``) is a different model (linear patch
embedding over variable-size patch sequences, attention mask, resized position
embedding) and is refused with a message; SigLIP2 fixed-resolution checkpoints
are saved as ``siglip`` and route here.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..config import Preprocess, VisionConfig
from ..errors import MlcVisionError
from .weight_map import LLAVA_NON_VISION_KEYS, WeightMap
from .transforms import interpolate_position_embedding
from . import layers
from .registry import Family, register

NAME = "siglip"
# siglip2*: claimed only to refuse them with a reason (see config_from_hf).
MODEL_TYPES = ("siglip_vision_model", "siglip", "siglip2_vision_model", "siglip2")
ARCHITECTURES = ("SiglipVisionModel", "SiglipModel", "SiglipForImageClassification")
NAFLEX_MODEL_TYPES = ("siglip2_vision_model", "siglip2")

# The SigLIP image processor: resize to size x size (no crop), mean = std = 0.5.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


# ---- config ------------------------------------------------------------------------


def config_from_hf(hf: dict) -> VisionConfig:
    """Our config from a ``SiglipVisionConfig`` dict (the vision part of a SigLIP/LLaVA config)."""
    if hf.get("model_type") in NAFLEX_MODEL_TYPES:
        raise MlcVisionError(
            f"model_type {hf.get('model_type')!r} is SigLIP2 NaFlex (variable resolution, linear patch "
            "embedding, attention mask), which mlc-vision does not support; SigLIP2 fixed-resolution "
            "checkpoints (model_type 'siglip') are supported"
        )
    image_size = _single(hf.get("image_size", 224), "image_size")
    return VisionConfig(
        family=NAME,
        hidden_size=hf.get("hidden_size", 768),
        intermediate_size=hf.get("intermediate_size", 3072),
        num_hidden_layers=hf.get("num_hidden_layers", 12),
        num_attention_heads=hf.get("num_attention_heads", 12),
        image_size=image_size,
        patch_size=_single(hf.get("patch_size", 16), "patch_size"),
        num_channels=hf.get("num_channels", 3),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
        hidden_act=hf.get("hidden_act", "gelu_pytorch_tanh"),
        class_token=False,
        patch_bias=True,
        use_head=bool(hf.get("vision_use_head", True)),
        preprocess=Preprocess(
            resize="exact", size=image_size, crop_size=None, resample="bicubic",
            mean=SIGLIP_MEAN, std=SIGLIP_STD,
        ),
    ).validated()


def _single(value, name: str) -> int:
    """SigLIP configs allow ``[h, w]`` sizes; we compile square images only."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise MlcVisionError(f"{name} {list(value)} is not square; only square SigLIP inputs are supported")
        value = value[0]
    return int(value)


# ---- module -------------------------------------------------------------------------


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        self.patch_embedding = layers.PatchEmbedding(config, bias=True)
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.patch_embedding(pixel_values) + self.position_embedding.weight


class PackedMultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` with its packed ``in_proj_weight`` ``[3d, d]`` kept as saved.

    Keeping the packed layout keeps the weight map a pure rename; the graph
    slices q, k and v out of it (constant work that weight lifting hoists).
    """

    def __init__(self, config: VisionConfig):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.in_proj_weight = nn.Parameter((3 * d, d))
        self.in_proj_bias = nn.Parameter((3 * d,))
        self.out_proj = nn.Linear(d, d)

    def _project(self, x: Tensor, index: int) -> Tensor:
        d = self.in_proj_weight.shape[1]
        begin, end = index * d, (index + 1) * d
        w = layers.slice_axis(self.in_proj_weight, 0, begin, end, "in_proj_w")
        b = layers.slice_axis(self.in_proj_bias, 0, begin, end, "in_proj_b")
        return op.matmul(x, op.permute_dims(w, [1, 0])) + b

    def forward(self, query: Tensor, key_value: Tensor) -> Tensor:
        q = self._project(query, 0)
        k = self._project(key_value, 1)
        v = self._project(key_value, 2)
        return self.out_proj(layers.attention(q, k, v, self.num_heads))


class SiglipMultiheadAttentionPoolingHead(nn.Module):
    """A learned probe attends over all tokens; then a pre-norm MLP with a residual."""

    def __init__(self, config: VisionConfig):
        self.probe = nn.Parameter((1, 1, config.hidden_size))
        self.attention = PackedMultiheadAttention(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = layers.Mlp(config)

    def forward(self, tokens: Tensor) -> Tensor:
        """``[b, s, d] -> [b, 1, d]``."""
        b, _, d = tokens.shape
        probe = op.broadcast_to(self.probe, (b, 1, d))
        x = self.attention(probe, tokens)
        return x + self.mlp(self.layernorm(x))


def _check_options(config: VisionConfig) -> None:
    if config.feature == "pooled" and not config.use_head:
        raise MlcVisionError(
            "feature 'pooled' needs SigLIP's attention-pooling head, but this checkpoint has none "
            "(vision_use_head is false); use feature 'patch'"
        )
    layers.check_post_norm_tokens(config, "SigLIP's post_layernorm")


class VisionModel(nn.Module):
    """SigLIP's vision transformer, built up to the selected layer (``full`` builds everything)."""

    def __init__(self, config: VisionConfig, full: bool = False):
        if not full:  # the full model (what convert expects) does not depend on the options
            _check_options(config)
        self.config = config
        pooled = config.feature == "pooled"
        needs_post_norm = full or pooled or config.post_norm_tokens
        num_layers = config.num_hidden_layers if needs_post_norm else config.num_layers_compiled
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = layers.Encoder(
            [layers.EncoderLayer(config, layers.SelfAttention(config)) for _ in range(num_layers)]
        )
        if needs_post_norm:
            self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.use_head and (full or pooled):
            self.head = SiglipMultiheadAttentionPoolingHead(config)

    def hidden_states(self, pixel_values: Tensor) -> list[Tensor]:
        """Embeddings, then the output of every built layer (none has the post-norm)."""
        return self.encoder.hidden_states(self.embeddings(pixel_values))

    def last_hidden_state(self, last_hidden: Tensor) -> Tensor:
        """transformers' ``last_hidden_state``: the post-norm over every token of the last layer."""
        return self.post_layernorm(last_hidden)

    def pooled(self, last_hidden: Tensor) -> Tensor:
        """``[b, 1, hidden]``: transformers' ``pooler_output`` (the attention-pooling head)."""
        return self.head(self.last_hidden_state(last_hidden))

    def forward(self, pixel_values: Tensor) -> Tensor:
        states = self.hidden_states(pixel_values)
        if self.config.post_norm_tokens and self.config.feature != "pooled":
            return self.last_hidden_state(states[-1])
        return layers.features(states, self.config, self.pooled)


# ---- weights -------------------------------------------------------------------------


WEIGHTS = WeightMap(
    prefixes=(
        # SiglipModel, SiglipForImageClassification; SiglipVisionModel in transformers v4
        ("vision_model.", ""),
        # SiglipVisionModel as transformers v5 saves it: no vision_model. prefix
        ("embeddings.", "embeddings."),
        ("encoder.", "encoder."),
        ("post_layernorm.", "post_layernorm."),
        ("head.", "head."),
        # LLaVA-NeXT / LLaVA-OneVision, most specific first:
        ("model.vision_tower.vision_tower.vision_model.", ""),  # original LLaVA-NeXT repo
        ("model.vision_tower.vision_model.", ""),  # transformers v4.52+
        ("vision_tower.vision_model.", ""),  # transformers v4 (llava-hf hub checkpoints)
        ("model.vision_tower.", ""),  # transformers v5 module layout
        ("vision_tower.", ""),  # transformers v5 save_pretrained
    ),
    ignore=(
        r"^text_model\.",
        r"^logit_scale$",
        r"^logit_bias$",
        r"position_ids$",
        r"^classifier\.",  # SiglipForImageClassification's linear head
        *LLAVA_NON_VISION_KEYS,
    ),
    # a library compiled at another image size gets the position table resampled
    # (bicubic, as transformers' interpolate_pos_encoding does)
    transforms=((r"^embeddings\.position_embedding\.weight$", interpolate_position_embedding),),
)


FAMILY = register(
    Family(
        name=NAME,
        model_types=MODEL_TYPES,
        architectures=ARCHITECTURES,
        config_from_hf=config_from_hf,
        module=VisionModel,
        weights=WEIGHTS,
    )
)
