"""Where a checkpoint is, which of its files hold weights, and its config.

``--model`` is a local directory or a hub id (``owner/name``). A hub id is
fetched in two steps so that nothing but what we read is downloaded: first
the small files (``config.json``, ``preprocessor_config.json``, the shard
index), then only the weight shards that hold keys we need. For a whole
LLaVA / InternVL-chat checkpoint that means the shards with the vision tower
and the projector: the language model's shards are never fetched nor opened.

The hub client honors ``HF_HUB_OFFLINE`` (then only the local cache is used).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import DEFAULT_GRID_PINPOINTS, Tiling
from ..errors import MlcVisionError

# The small files every conversion reads (fetched first for a hub id).
METADATA_PATTERNS = (
    "config.json",
    "preprocessor_config.json",
    "*.safetensors.index.json",
    "pytorch_model*.bin.index.json",
)
SAFETENSORS_INDEXES = ("model.safetensors.index.json",)
BIN_INDEXES = ("pytorch_model.bin.index.json",)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---- composite configs (a vision tower inside a bigger model) ---------------------------


@dataclass(frozen=True)
class Composite:
    """How a composite ``config.json`` nests its vision tower.

    ``vision_model_type`` fills ``model_type`` for a nested vision config that
    lacks one (transformers omits it when it equals the default); ``inherit``
    names outer fields that describe the tower and override the nested ones
    (CLIPModel's ``projection_dim`` sizes ``visual_projection``; the nested
    config carries a stale default); ``language`` lists the checkpoint keys of
    the language model, never read.
    """

    vision_model_type: str
    vision_key: str = "vision_config"
    inherit: tuple[str, ...] = ()
    language: tuple[str, ...] = ()


LLM_KEYS = (
    r"^(model\.)?language_model\.",
    r"^model\.(layers|embed_tokens|norm|rotary_emb)\.",  # LLaVA-1.5 original: the LLM is the root model
    r"^lm_head\.",
    r"^model\.image_newline$",
)

COMPOSITES = {
    "clip": Composite("clip_vision_model", inherit=("projection_dim",)),
    "siglip": Composite("siglip_vision_model"),
    "llava": Composite("clip_vision_model", language=LLM_KEYS),
    "llava_next": Composite("clip_vision_model", language=LLM_KEYS),
    "llava_onevision": Composite("siglip_vision_model", language=LLM_KEYS),
    "internvl_chat": Composite("intern_vit_6b", language=LLM_KEYS),
}


def load_hf_config(path: str | Path) -> tuple[dict | None, dict]:
    """``(vision_config, full_config)`` from a checkpoint directory.

    For a composite model (CLIP/SigLIP with their text tower, LLaVA,
    InternVL-chat) the first is the nested vision config, with ``model_type``
    filled in when missing; the second stays whole for what lives outside the
    tower (select layer, projector). The vision part is None when the
    checkpoint only names its tower (original LLaVA: ``mm_vision_tower``).
    """
    path = Path(path) / "config.json"
    try:
        full = json.loads(path.read_text())
    except FileNotFoundError:
        raise MlcVisionError(f"no config.json in {path.parent}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MlcVisionError(f"cannot read {path}: {err}") from None
    if not isinstance(full, dict):
        raise MlcVisionError(f"{path} is not a JSON object")
    composite = COMPOSITES.get(full.get("model_type"))
    nested = full.get(composite.vision_key if composite else "vision_config")
    if isinstance(nested, dict):
        vision = dict(nested)
        if composite:
            if not vision.get("model_type"):
                vision["model_type"] = composite.vision_model_type
            vision.update({field: full[field] for field in composite.inherit if field in full})
        return vision, full
    if full.get("mm_vision_tower"):  # the tower is named, its config is not in this checkpoint
        return None, full
    return dict(full), full


def language_model_keys(full_config: dict) -> tuple[str, ...]:
    """Regexes of the checkpoint keys that belong to the language model, if any."""
    composite = COMPOSITES.get(full_config.get("model_type"))
    return composite.language if composite else ()


# ---- options that live outside the vision config -----------------------------------------

FEATURE_STRATEGIES = {"default": "patch", "patch": "patch", "full": "cls_patch", "cls_patch": "cls_patch"}

# (outer config field, VisionConfig option, value -> option value or None to skip)
OUTER_FIELDS = (
    ("vision_feature_layer", "select_layer", lambda v: v if isinstance(v, int) else None),
    ("mm_vision_select_layer", "select_layer", lambda v: v if isinstance(v, int) else None),
    ("select_layer", "select_layer", lambda v: v if isinstance(v, int) else None),
    ("vision_feature_select_strategy", "feature", FEATURE_STRATEGIES.get),
    ("mm_vision_select_feature", "feature", FEATURE_STRATEGIES.get),
    ("downsample_ratio", "downsample_ratio", lambda v: float(v) if isinstance(v, (int, float)) else None),
)

# Used only when models/projector.py is absent: the projector a composite has by default.
DEFAULT_PROJECTORS = {
    "llava": "mlp2x_gelu",
    "llava_next": "mlp2x_gelu",
    "llava_onevision": "mlp2x_gelu",
    "internvl_chat": "mlp1",
}


def is_composite(full_config: dict) -> bool:
    """Whether the vision tower is only part of this config (CLIPModel, LLaVA, InternVL-chat, ...)."""
    return isinstance(full_config.get("vision_config"), dict) or "mm_vision_tower" in full_config


def outer_options(full_config: dict) -> dict:
    """VisionConfig options a composite config sets: select layer, feature, projector.

    Empty for a plain vision checkpoint. The projector (kind, the language
    model's width, InternVL's ``downsample_ratio``) comes from
    ``models.projector.projector_from_hf``, which refuses variants we cannot
    compile.
    """
    if not is_composite(full_config):
        return {}
    options = {}
    for field, option, convert in OUTER_FIELDS:
        if field in full_config and option not in options:
            value = convert(full_config[field])
            if value is not None:
                options[option] = value
    options.update(projector_options(full_config))
    options.update(tiling_options(full_config))
    return options


def tiling_options(full_config: dict) -> dict:
    """``{"tiling": ...}`` when a composite config says how its images are tiled (none: keep the tower's)."""
    model_type = full_config.get("model_type")
    if model_type == "internvl_chat":
        from ..models.intern_vit import tiling_from_hf

        return {"tiling": tiling_from_hf(full_config)}
    if model_type == "llava_next":
        return {"tiling": anyres_tiling(full_config)}
    return {}


def anyres_tiling(full_config: dict) -> Tiling:
    """LLaVA-NeXT's ``image_grid_pinpoints`` (transformers' default when absent)."""
    pinpoints = full_config.get("image_grid_pinpoints", DEFAULT_GRID_PINPOINTS)
    if not isinstance(pinpoints, (list, tuple)) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in pinpoints
    ):
        raise MlcVisionError(f"config.json image_grid_pinpoints must be a list of [height, width], got {pinpoints!r}")
    return Tiling(mode="anyres", grid_pinpoints=tuple(tuple(p) for p in pinpoints)).validated()


def projector_options(full_config: dict) -> dict:
    try:
        from ..models import projector
    except ModuleNotFoundError as err:
        if err.name != "mlc_vision.models.projector":
            raise
        return _fallback_projector_options(full_config)
    spec = projector.projector_from_hf(full_config)
    return spec.options() if spec is not None else {}


def _fallback_projector_options(full_config: dict) -> dict:
    kind = full_config.get("mm_projector_type") or DEFAULT_PROJECTORS.get(full_config.get("model_type"))
    if kind is None:
        return {}
    options = {"projector": kind}
    for text_key in ("text_config", "llm_config"):
        width = (full_config.get(text_key) or {}).get("hidden_size")
        if width:
            options["projector_hidden_size"] = width
            break
    else:
        if full_config.get("hidden_size"):
            options["projector_hidden_size"] = full_config["hidden_size"]
    return options


# ---- the source itself ---------------------------------------------------------------------------


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return constants.HF_HUB_OFFLINE or env in ("1", "true", "yes", "on")


def _hub_download(repo_id: str, patterns: list[str], revision: str | None = None) -> Path:
    """Fetch only ``patterns`` of a hub repo (or find them in the cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, local_files_only=_offline()
        )
    except Exception as err:  # network boundary: many error types, all the user's environment
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = " (HF_HUB_OFFLINE is set: only the local cache is used)" if _offline() else ""
        raise MlcVisionError(f"cannot fetch {repo_id!r} from the Hugging Face hub{offline}: {first}") from None
    return Path(path)


@dataclass(frozen=True)
class Source:
    """A resolved checkpoint: a local directory, fetched from the hub when ``repo_id`` is set."""

    spec: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        return f"hf://{self.repo_id}" if self.repo_id else str(self.path)

    def weight_files(self, wanted: Callable[[str], bool] | None = None) -> list[Path]:
        """The weight files to read, with an index only the shards that hold a wanted key.

        safetensors are preferred over ``.bin``; ``.bin`` needs torch (checked
        by the reader). For a hub id the chosen files are fetched now.
        """
        names = self._weight_file_names(wanted)
        if self.repo_id:
            self._fetch(names)
        paths = [self.path / name for name in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise MlcVisionError(f"weight file(s) listed by the index are missing: {', '.join(missing)}")
        return paths

    def _weight_file_names(self, wanted) -> list[str]:
        for index_names in (SAFETENSORS_INDEXES, BIN_INDEXES):
            for index_name in index_names:
                index = self.path / index_name
                if index.is_file():
                    return shards_from_index(index, wanted)
        for index in sorted(self.path.glob("*.safetensors.index.json")):
            return shards_from_index(index, wanted)
        if (self.path / "model.safetensors").is_file() or self.repo_id and self._hub_has("model.safetensors"):
            return ["model.safetensors"]
        singles = sorted(p.name for p in self.path.glob("*.safetensors"))
        if singles:
            return singles
        if (self.path / "pytorch_model.bin").is_file() or self.repo_id and self._hub_has("pytorch_model.bin"):
            return ["pytorch_model.bin"]
        raise MlcVisionError(
            f"no weights in {self.describe()}: expected model.safetensors, sharded *.safetensors with "
            "model.safetensors.index.json, or pytorch_model*.bin"
        )

    def _hub_has(self, name: str) -> bool:
        try:
            self._fetch([name])
        except MlcVisionError:
            return False
        return (self.path / name).is_file()

    def _fetch(self, names: list[str]) -> None:
        fetched = _hub_download(self.repo_id, list(names), self.revision)
        if fetched != self.path:
            raise MlcVisionError(f"hub snapshot of {self.repo_id!r} moved while fetching ({fetched})")


def shards_from_index(index: Path, wanted: Callable[[str], bool] | None) -> list[str]:
    """Shard file names of an index, in first-appearance order; with ``wanted``, only those needed."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise MlcVisionError(f"cannot read shard index {index}: {err}") from None
    shards: dict[str, bool] = {}
    for key, shard in weight_map.items():
        needed = wanted is None or wanted(key)
        shards[shard] = shards.get(shard, False) or needed
    return [shard for shard, needed in shards.items() if needed]


def resolve_source(spec: str | Path, revision: str | None = None) -> Source:
    """A local checkpoint directory, or a hub id fetched (config and index only, for now)."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        return Source(text, _checked_dir(path))
    if isinstance(spec, Path) or not REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise MlcVisionError(f"checkpoint directory {path} does not exist")
    snapshot = _hub_download(text, list(METADATA_PATTERNS), revision)
    return Source(text, _checked_dir(snapshot), repo_id=text, revision=revision)


def _checked_dir(path: Path) -> Path:
    if not path.is_dir():
        raise MlcVisionError(f"checkpoint path {path} is not a directory")
    if not (path / "config.json").is_file():
        raise MlcVisionError(f"no config.json in checkpoint directory {path}")
    return path.resolve()
