"""Projectors: vision features -> the language model's embedding width.

A chat runtime feeds the projected features straight into its LLM, so the
projector is compiled into the same library, after feature selection:

- ``linear``: LLaVA-1.0's one ``Linear(vision, llm)``.
- ``mlp2x_gelu``: LLaVA-1.5 / transformers ``LlavaMultiModalProjector``:
  ``Linear(vision, llm)``, GELU (erf), ``Linear(llm, llm)``.
- ``mlp1``: InternVL-chat: ``pixel_shuffle(downsample_ratio)`` merges each
  2x2 block of patch tokens into one token of 4x the width (1024 tokens ->
  256 for 448/14), then ``LayerNorm(4c)``, ``Linear(4c, llm)``, GELU,
  ``Linear(llm, llm)``.

Parameters live under ``projector.`` in the params dir and in the library's
parameter list; :data:`PROJECTOR_WEIGHTS` maps each kind's checkpoint keys
there, so a whole LLaVA / InternVL-chat checkpoint converts in one pass.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..config import IMAGE_NEWLINE_PARAM, PROJECTORS, VisionConfig
from ..errors import MlcVisionError
from .weight_map import WeightMap
from . import layers

KINDS = PROJECTORS
PREFIX = "projector"  # parameter names: projector.linear_1.weight, ...
LAYER_NORM_EPS = 1e-5  # InternVL's mlp1 uses torch's nn.LayerNorm default


# ---- geometry ------------------------------------------------------------------------------


def input_width(config: VisionConfig) -> int:
    """Width of the features the projector reads (after the shuffle for ``mlp1``)."""
    return config.hidden_size * config.tokens.merge**2


def check(config: VisionConfig) -> None:
    """Refuse a projector the selected features cannot feed, naming why."""
    if config.projector not in KINDS:
        raise MlcVisionError(f"unknown projector {config.projector!r}; known: {', '.join(KINDS)}")
    if not config.projector_hidden_size:
        raise MlcVisionError(
            f"projector {config.projector} needs projector_hidden_size (the LLM width; --projector-hidden-size)"
        )
    if config.feature == "pooled":
        raise MlcVisionError("a projector maps token features; it cannot follow feature 'pooled'")
    if config.qllama is not None:
        raise MlcVisionError(
            "InternVL-14B's encode has two outputs (features and query outputs); its LLaVA projector "
            "(two_mlp, one MLP for each) is not built: compile without a projector"
        )
    if config.projector == "mlp1":
        _check_shuffle(config)


def _check_shuffle(config: VisionConfig) -> None:
    """``pixel_shuffle`` needs only patch tokens, in a grid whose sides the factor divides."""
    layout = config.tokens
    if layout.selected != layout.num_patches:
        raise MlcVisionError("projector mlp1 shuffles the patch grid: compile it with feature 'patch'")
    factor, (rows, cols) = layout.merge, layout.grid
    if rows % factor or cols % factor:
        raise MlcVisionError(
            f"projector mlp1 merges {factor}x{factor} patches but the grid is {rows}x{cols} "
            f"(image_size {config.image_size} / patch_size {config.patch_size}); pick an image size whose grid "
            f"is a multiple of {factor}"
        )


# ---- Relax module -------------------------------------------------------------------------------


def pixel_shuffle(x: Tensor, grid: tuple[int, int], factor: int) -> Tensor:
    """InternVL's ``pixel_shuffle`` (``ps_version`` 'v2') on ``[b, rows*cols, c]`` row-major tokens.

    Output token ``(i, j)`` holds the ``factor x factor`` block of patches at
    rows ``i*factor + t``, columns ``j*factor + s``, its channels ordered
    ``(t, s, c)``: the layout InternVL's view/permute/view/permute sequence
    produces. One reshape-transpose-reshape gives the same result.
    """
    b, _, c = x.shape
    rows, cols = grid[0] // factor, grid[1] // factor
    x = op.reshape(x, (b, rows, factor, cols, factor, c))  # b, i, t, j, s, c
    x = op.permute_dims(x, [0, 1, 3, 2, 4, 5])  # b, i, j, t, s, c
    return op.reshape(x, (b, rows * cols, factor * factor * c))


class Projector(nn.Module):
    """The projector ``config.projector`` names; attribute names are the params' names.

    ``linear``: ``linear``; ``mlp2x_gelu``: ``linear_1``, ``linear_2``;
    ``mlp1``: ``norm``, ``linear_1``, ``linear_2``.
    """

    def __init__(self, config: VisionConfig):
        check(config)
        self.kind = config.projector
        self.grid = config.tokens.grid
        self.factor = config.tokens.merge
        width_in, width_out = input_width(config), config.projector_hidden_size
        if self.kind == "linear":
            self.linear = nn.Linear(width_in, width_out)
            return
        if self.kind == "mlp1":
            self.norm = nn.LayerNorm(width_in, eps=LAYER_NORM_EPS)
        self.linear_1 = nn.Linear(width_in, width_out)
        self.linear_2 = nn.Linear(width_out, width_out)

    def forward(self, features: Tensor) -> Tensor:
        """``[b, tokens, vision width] -> [b, tokens', llm width]``."""
        if self.kind == "linear":
            return self.linear(features)
        x = features
        if self.kind == "mlp1":
            x = self.norm(pixel_shuffle(x, self.grid, self.factor))
        return self.linear_2(layers.gelu_erf(self.linear_1(x)))


def projector_params(config: VisionConfig, dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of the projector's params, named as in the params dir."""
    module = Projector(config)
    module.to(dtype)
    return {
        f"{PREFIX}.{name}": (tuple(int(d) for d in p.shape), str(p.dtype)) for name, p in module.named_parameters()
    }


# ---- weights -------------------------------------------------------------------------------------
# Prefix tables only: each source layer maps to one of ours. transformers v5
# saves Llava checkpoints in the v4 layout (``multi_modal_projector.*`` at the
# root) and names them ``model.multi_modal_projector.*`` in memory: both are read.

PROJECTOR_WEIGHTS = {
    "linear": WeightMap(
        prefixes=(
            ("model.mm_projector.", f"{PREFIX}.linear."),  # LLaVA-1.0 (original repo)
            ("mm_projector.", f"{PREFIX}.linear."),
        ),
    ),
    "mlp2x_gelu": WeightMap(
        prefixes=(
            ("model.mm_projector.0.", f"{PREFIX}.linear_1."),  # LLaVA-1.5 (original repo)
            ("model.mm_projector.2.", f"{PREFIX}.linear_2."),
            ("mm_projector.0.", f"{PREFIX}.linear_1."),
            ("mm_projector.2.", f"{PREFIX}.linear_2."),
            ("model.multi_modal_projector.", f"{PREFIX}."),  # transformers Llava (in memory, v4.52+)
            ("multi_modal_projector.", f"{PREFIX}."),  # transformers Llava (as saved)
        ),
    ),
    "mlp1": WeightMap(
        prefixes=(
            ("mlp1.0.", f"{PREFIX}.norm."),  # InternVL-chat: Sequential(LayerNorm, Linear, GELU, Linear)
            ("mlp1.1.", f"{PREFIX}.linear_1."),
            ("mlp1.3.", f"{PREFIX}.linear_2."),
        ),
    ),
}


# LLaVA-NeXT's row separator, converted beside the projector when the runtime packs anyres tiles
IMAGE_NEWLINE_WEIGHTS = WeightMap(
    prefixes=(("model.image_newline", IMAGE_NEWLINE_PARAM), ("image_newline", IMAGE_NEWLINE_PARAM)),
)


def weight_map(config: VisionConfig) -> WeightMap:
    """The map of ``config.projector``'s checkpoint keys (what convert merges with the tower's)."""
    check(config)
    if config.has_image_newline:
        return PROJECTOR_WEIGHTS[config.projector].merged(IMAGE_NEWLINE_WEIGHTS)
    return PROJECTOR_WEIGHTS[config.projector]
