"""VisionConfig: everything needed to build a library, and where it comes from.

A config is made from a preset (``mlc_vision/presets/<name>.json``, package data) or from a checkpoint's
``config.json`` (the family module turns the Hugging Face fields into ours).
Compile options (``--select-layer``, ``--feature``, ``--image-size``,
``--projector``) are applied on top with :func:`with_options`.

The dataclass is a superset of what the families need; each family reads the
fields that describe it and the defaults keep the others inert.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MlcVisionError

# Package data: the same path in a checkout, an editable install and a wheel.
PRESET_DIR = Path(__file__).resolve().parent / "presets"

# The canonical option values (the CLI's choices are built from these).
DTYPES = ("float32", "float16", "bfloat16")
FEATURES = ("patch", "cls_patch", "pooled")  # pooled: the [b, 1, width] pooled/projected embedding
PROJECTORS = ("linear", "mlp2x_gelu", "mlp1")  # see models/projector.py
# Resampling filters, by the Pillow codes that ``preprocessor_config.json`` stores.
HF_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
RESAMPLE_FILTERS = tuple(HF_RESAMPLE.values())
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)



def reject_unknown_fields(cls, data: dict, what: str, list_known: bool = True) -> None:
    """A dict for dataclass ``cls`` may hold only its fields; one line names the others."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        listed = f"; known: {sorted(known)}" if list_known else ""
        raise MlcVisionError(f"unknown {what} field(s) {sorted(unknown)}{listed}")

@dataclass(frozen=True)
class Preprocess:
    """How an image becomes ``pixel_values`` (the transformers image processor's fields).

    resize: ``shortest_edge`` (resize the short side to ``size`` keeping the
    aspect ratio, then center-crop ``crop_size``; CLIP) or ``exact`` (resize to
    ``size`` x ``size``; SigLIP, InternViT).

    backend: whose resize arithmetic to reproduce bit for bit: ``torchvision``
    (transformers 5's default image processors) or ``pil`` (Pillow; what
    InternVL's own torchvision-on-PIL transform does).
    """

    resize: str = "shortest_edge"
    size: int = 224
    crop_size: int | None = 224
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = False
    backend: str = "torchvision"
    # resize "smart" (Qwen2-VL's smart_resize): the pixel budget of an image, any size in between kept
    min_pixels: int | None = None
    max_pixels: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        reject_unknown_fields(cls, data, "preprocessing")
        data = dict(data)
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(float(v) for v in data[key])
        return cls(**data)


TILING_MODES = ("internvl", "anyres")  # see runtime/tiling.py and docs/tiling.md
# LLaVA-NeXT's image_newline (LLM width), in the params dir beside the projector;
# the runtime appends it to each row of tokens when it packs anyres tiles.
IMAGE_NEWLINE_PARAM = "projector.image_newline"
# transformers' LlavaNextConfig default, [height, width] each
DEFAULT_GRID_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class Tiling:
    """How one image of any size becomes several fixed-size tiles (a runtime contract).

    ``internvl``: InternVL's dynamic tiles: a grid of ``rows x cols`` tiles of
    ``image_size`` with ``min_tiles <= rows * cols <= max_tiles`` chosen by the
    image's aspect ratio, plus a thumbnail of the whole image when the grid has
    more than one tile and ``thumbnail`` is set. ``anyres``: LLaVA-NeXT's
    ``image_grid_pinpoints`` (``[height, width]`` pairs), with OneVision's
    ``anyres_max``. Grids are height x width.
    """

    mode: str = "internvl"
    min_tiles: int = 1
    max_tiles: int = 12
    thumbnail: bool = True
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    # LLaVA-OneVision ("anyres_max_N"): an unpadded token map larger than N tiles' worth
    # is shrunk (bilinear) to about that size before the newline rows are added
    anyres_max: int | None = None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["grid_pinpoints"] = [list(p) for p in self.grid_pinpoints]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Tiling":
        reject_unknown_fields(cls, data, "tiling")
        data = dict(data)
        data["grid_pinpoints"] = tuple(tuple(int(v) for v in p) for p in data.get("grid_pinpoints", ()))
        return cls(**data).validated()

    def validated(self) -> "Tiling":
        if self.mode not in TILING_MODES:
            raise MlcVisionError(f"tiling mode must be one of {TILING_MODES}, got {self.mode!r}")
        check_tile_range(self.min_tiles, self.max_tiles)
        return self


def check_tile_range(min_tiles: int, max_tiles: int) -> None:
    """One line for a tile count range that no grid can satisfy."""
    if min_tiles < 1 or max_tiles < min_tiles:
        raise MlcVisionError(
            f"tile counts out of range: min_tiles {min_tiles}, max_tiles {max_tiles} "
            "(need 1 <= min_tiles <= max_tiles)"
        )


@dataclass(frozen=True)
class QueryTransformer:
    """InternVL-14B's QLLaMA: learned query tokens through LLaMA layers that cross-attend to the vision tokens.

    ``num_query_tokens`` learned tokens go through ``num_hidden_layers`` LLaMA
    decoder layers (RMSNorm, rotary positions ``0..num_query_tokens-1``,
    SwiGLU MLP) whose self-attention is bidirectional; every
    ``cross_attention_frequency``-th layer (0, f, 2f, ...) adds a
    cross-attention over the tower's last hidden state (keys and values
    projected from the tower's width). A final RMSNorm gives the query
    outputs, ``[batch, num_query_tokens, hidden_size]``. ``vocab_size`` is
    the text side's (the image side never reads the token embedding).

    ``feature="pooled"`` is the contrastive image embedding, ``projection_dim``
    (InternVL's ``clip_embed_dim``) wide, from attention-pooling heads of
    ``attn_pool_num_heads`` heads: ``internvl_c`` pools the vision tokens
    (``clip_projector``); ``internvl_g`` adds the pooled query outputs
    (``clip_projector2``), each L2-normalized, as InternVL-G does.
    """

    num_query_tokens: int = 96
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    cross_attention_frequency: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    vocab_size: int = 49954
    attn_pool_num_heads: int = 16
    pooled_head: str = "internvl_g"  # internvl_c | internvl_g

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QueryTransformer":
        reject_unknown_fields(cls, data, "qllama")
        return cls(**data).validated()

    def validated(self) -> "QueryTransformer":
        from .validate import check_query_transformer  # types and ranges, without importing TVM

        check_query_transformer(self)
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            raise MlcVisionError(
                f"qllama hidden_size {self.hidden_size} must split into {self.num_attention_heads} heads of an even "
                "width (rotary positions rotate pairs of channels)"
            )
        return self


@dataclass(frozen=True)
class VisionConfig:
    """Architecture + preprocessing + feature selection of one vision encoder."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # quick_gelu | gelu | gelu_tanh
    norm_type: str = "layer_norm"  # layer_norm | rms_norm
    qkv_bias: bool = True  # family-specific meaning (EVA: q and v only)
    qk_norm: bool = False  # InternViT-6B: RMSNorm over all channels of q and k
    layer_scale: bool = False  # InternViT: ls1/ls2
    post_norm_blocks: bool = False  # EVA-CLIP-E: x + LN(attn(x)) instead of x + attn(LN(x))
    class_token: bool = True
    register_tokens: int = 0  # DINOv2 with registers: learned tokens after the class token, no position
    patch_bias: bool = False
    projection_dim: int | None = None  # CLIP/EVA visual_projection output width
    projection_bias: bool = False  # EVA-CLIP's EvaCLIPModel head has a bias; CLIP's and EvaCLIP...WithProjection's have none
    use_head: bool = False  # SigLIP attention-pooling head
    # Apply the final norm after the last layer to the returned tokens (SigLIP:
    # transformers' last_hidden_state = post_layernorm(hidden_states[-1])).
    post_norm_tokens: bool = False
    # The image size the checkpoint's position embedding was trained for. When it
    # differs from image_size, convert interpolates the position embedding.
    checkpoint_image_size: int | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    select_layer: int = -1
    feature: str = "patch"
    projector: str | None = None  # None | linear | mlp2x_gelu | mlp1
    projector_hidden_size: int | None = None  # LLM width the projector maps to
    downsample_ratio: float = 0.5  # InternVL pixel_shuffle ratio for the mlp1 projector
    preset: str | None = None
    tiling: Tiling | None = None  # None: one image is one input of image_size
    # Native-resolution towers (Qwen2-VL, Qwen2.5-VL): the patch count is an input, not image_size.
    temporal_patch_size: int = 1  # frames per patch (a still image is repeated)
    spatial_merge_size: int = 1  # the patch merger joins merge x merge patches into one output token
    window_size: int = 0  # window attention span in pixels (0: every block attends over the whole image)
    fullatt_block_indexes: tuple[int, ...] = ()  # blocks that attend over the whole image despite windows
    merger_hidden_size: int | None = None  # the patch merger's output width (the LLM's)
    rope_theta: float = 10000.0  # base of the 2D rotary position
    # InternVL-14B: QLLaMA's query tokens over the tower (a second output of encode); None for every other tower
    qllama: QueryTransformer | None = None

    # ---- derived geometry -------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def tokens(self) -> "TokenLayout":
        """The token layout of this config (computed here only)."""
        return TokenLayout.of(self)

    @property
    def num_patches(self) -> int:
        return self.tokens.num_patches

    @property
    def num_positions(self) -> int:
        """Rows of a learned position table: the class token (if any) and the patches; registers have none."""
        return self.tokens.class_tokens + self.tokens.num_patches

    @property
    def num_hidden_states(self) -> int:
        """Length of ``hidden_states`` in the reference: embeddings + one per layer."""
        return self.num_hidden_layers + 1

    @property
    def layer_index(self) -> int:
        """``select_layer`` as a non-negative index into the hidden states."""
        return normalize_layer(self.select_layer, self.num_hidden_states)

    @property
    def num_layers_compiled(self) -> int:
        """Encoder layers that run: those after the selected hidden state are not compiled."""
        return self.layer_index

    # ---- (de)serialization ---------------------------------------------------
    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["preprocess"] = self.preprocess.to_dict()
        data["tiling"] = self.tiling.to_dict() if self.tiling is not None else None
        data["qllama"] = self.qllama.to_dict() if self.qllama is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "VisionConfig":
        reject_unknown_fields(cls, data, "config", list_known=False)  # ~50 fields: too many to list
        data = dict(data)
        if isinstance(data.get("preprocess"), dict):
            data["preprocess"] = Preprocess.from_dict(data["preprocess"])
        if isinstance(data.get("tiling"), dict):
            data["tiling"] = Tiling.from_dict(data["tiling"])
        if isinstance(data.get("qllama"), dict):
            data["qllama"] = QueryTransformer.from_dict(data["qllama"])
        if "fullatt_block_indexes" in data:
            data["fullatt_block_indexes"] = tuple(int(i) for i in data["fullatt_block_indexes"])
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise MlcVisionError(f"config is missing field(s) {missing}")
        return cls(**data).validated()

    def validated(self) -> "VisionConfig":
        from .validate import check_config_values  # types and ranges first: the checks below do arithmetic

        check_config_values(self)
        if self.feature not in FEATURES:
            raise MlcVisionError(f"feature must be one of {FEATURES}, got {self.feature!r}")
        if self.hidden_size % self.num_attention_heads:
            raise MlcVisionError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size < self.patch_size:
            raise MlcVisionError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if self.register_tokens < 0:
            raise MlcVisionError(f"register_tokens must be >= 0, got {self.register_tokens}")
        normalize_layer(self.select_layer, self.num_hidden_states)
        return self

    @property
    def native_resolution(self) -> bool:
        """Images keep their own size (Qwen2-VL's smart resize): the library takes patches, not fixed-size pixels."""
        return self.preprocess.resize == "smart"

    @property
    def has_image_newline(self) -> bool:
        """LLaVA-NeXT: the params hold ``image_newline`` (it needs the projector: it has the LLM's width)."""
        return self.tiling is not None and self.tiling.mode == "anyres" and self.projector is not None


def check_pinpoints(pinpoints, tile_size: int) -> None:
    """anyres grids must be whole tiles: ``[height, width]`` multiples of the tower's image size."""
    if not pinpoints:
        raise MlcVisionError("anyres tiling needs at least one grid pinpoint")
    for point in pinpoints:
        if len(point) != 2 or min(point) < tile_size or point[0] % tile_size or point[1] % tile_size:
            raise MlcVisionError(
                f"grid pinpoint {list(point)} is not a [height, width] multiple of the tile size {tile_size}"
            )


@dataclass(frozen=True)
class TokenLayout:
    """The tokens of a hidden state and of what ``encode`` returns, in order.

    A hidden state is ``prefix`` tokens (the class token, then any register
    tokens) followed by the ``grid`` of patches, ``(height, width)``, row
    major. The conv drops trailing pixels (384/14 -> 27 patches, 6 px lost).
    Feature ``patch`` drops the prefix, ``cls_patch`` keeps it, ``pooled`` is
    one token. A projector may then merge ``merge x merge`` blocks of patches
    into one token (InternVL's pixel shuffle).
    """

    class_tokens: int
    register_tokens: int
    grid: tuple[int, int]
    feature: str
    merge: int = 1

    @classmethod
    def of(cls, config: "VisionConfig") -> "TokenLayout":
        side = config.image_size // config.patch_size
        return cls(
            class_tokens=1 if config.class_token else 0,
            register_tokens=config.register_tokens,
            grid=(side, side),
            feature=config.feature,
            merge=merge_factor(config.downsample_ratio) if config.projector == "mlp1" else 1,
        )

    @property
    def prefix(self) -> int:
        """Tokens before the patches: class token and registers."""
        return self.class_tokens + self.register_tokens

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def sequence(self) -> int:
        """Length of a hidden state."""
        return self.prefix + self.num_patches

    @property
    def selected(self) -> int:
        """Tokens per image after feature selection (before any projector)."""
        if self.feature == "pooled":
            return 1
        return self.num_patches if self.feature == "patch" else self.sequence

    @property
    def dropped_prefix(self) -> int:
        """Leading tokens that feature selection drops."""
        return self.prefix if self.feature == "patch" else 0

    @property
    def output_grid(self) -> tuple[int, int]:
        """The patch grid after the projector's merge."""
        return self.grid[0] // self.merge, self.grid[1] // self.merge

    @property
    def output(self) -> int:
        """Tokens per image that ``encode`` returns."""
        if self.merge == 1:
            return self.selected
        rows, cols = self.output_grid
        return rows * cols

    def to_dict(self) -> dict:
        """The ``tokens`` entry of a library's metadata (what a runtime reads instead of computing it)."""
        return {
            "prefix": self.prefix,
            "class": self.class_tokens,
            "registers": self.register_tokens,
            "grid": list(self.grid),
            "sequence": self.sequence,
            "selected": self.selected,
            "dropped_prefix": self.dropped_prefix,
            "merge": self.merge,
            "output_grid": list(self.output_grid),
            "output": self.output,
        }


def merge_factor(downsample_ratio: float) -> int:
    """Side of the square of patches that a pixel shuffle of ``downsample_ratio`` merges (2 for 0.5)."""
    factor = round(1 / downsample_ratio)
    if not math.isclose(factor * downsample_ratio, 1.0):
        raise MlcVisionError(f"downsample_ratio {downsample_ratio} is not 1/n for an integer n")
    return factor


def normalize_layer(select_layer: int, num_hidden_states: int) -> int:
    """Python-style index into ``hidden_states`` (``-1`` is the last)."""
    index = select_layer + num_hidden_states if select_layer < 0 else select_layer
    if not 0 <= index < num_hidden_states:
        raise MlcVisionError(
            f"select_layer {select_layer} is out of range: the model has {num_hidden_states} hidden states "
            f"(valid: {-num_hidden_states}..{num_hidden_states - 1})"
        )
    return index


def with_options(config: VisionConfig, **options: Any) -> VisionConfig:
    """Apply compile options that are not None (``image_size`` also fixes the preprocessing size)."""
    options = {k: v for k, v in options.items() if v is not None}
    image_size = options.get("image_size")
    if image_size is not None and image_size != config.image_size:
        if config.checkpoint_image_size is None:
            options["checkpoint_image_size"] = config.image_size
        pre = config.preprocess
        options["preprocess"] = dataclasses.replace(
            pre, size=image_size, crop_size=image_size if pre.crop_size is not None else None
        )
    return dataclasses.replace(config, **options).validated()


# ---- presets ----------------------------------------------------------------


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> VisionConfig:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise MlcVisionError(f"unknown preset {name!r}; presets: {', '.join(list_presets())}")
    data = json.loads(path.read_text())
    data.pop("description", None)
    data.pop("hf_repo", None)
    data["preset"] = name
    return VisionConfig.from_dict(data)


def preset_info(name: str) -> dict:
    """The preset's JSON as written (description and hub repo included)."""
    return json.loads((PRESET_DIR / f"{name}.json").read_text())
