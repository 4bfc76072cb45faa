"""A LLaVA checkpoint that names its vision tower (``mm_vision_tower``) instead of nesting its config.

Original LLaVA and InternVL's LLaVA fork (``internvl_chat_llava``) save the
tower's weights inside the whole checkpoint, under
``model.vision_tower.vision_tower.``, and write only its path or hub id in
``config.json`` (``./pretrained/InternViT-6B-448px-V1-5``, ``openai/clip-vit-large-patch14-336``,
an EVA-CLIP directory). InternVL's builder picks the tower's class from
substrings of that name; here the name is only a hint:

1. the tower's own ``config.json``, when the name leads to one (an absolute
   path, a path relative to the working directory or to the checkpoint, or a
   hub id in the hub cache / on the hub), routed by its fields and the
   checkpoint's keys;
2. else the preset whose parameter shapes equal those of the tower's keys in
   the checkpoint (the name breaks ties between architecturally equal
   presets, e.g. InternViT-6B-448px-V1-2 and V1-5);
3. else, when the checkpoint's keys are unknown (``.bin`` without torch), the
   preset whose ``hf_repo`` or name is the tower's name.

What InternVL's LLaVA tower does with an InternViT (InternViT-6B alone, or
inside InternVL-14B) is fixed in its code, not in the tower's files: a CLIP
image processor at 336 px (resize the short side, center crop) with ImageNet
mean/std, and the tower run at 336 px (its position embedding interpolated);
:data:`LLAVA_TOWER_RUNS_AT` says so. InternVL-14B's tower keeps its whole
``InternVLModel`` under the prefix (``vision_model.``, ``qllama.``,
``query_tokens``) and returns features and query outputs (models/internvl14b.py).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ..config import Preprocess, VisionConfig, list_presets, load_preset, preset_info
from ..errors import MlcVisionError
from ..models import Family, get_family, route
from .layouts import load_hf_config
from .processor import read_preprocess
from .source import REPO_ID, _hub_download
from .weight_plan import expected_params, key_mapper, mapped_names, settle_optional_parts

TOWER_PREFIX = "model.vision_tower.vision_tower."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# What InternVL's LLaVA CLIPVisionTower hard-codes for InternViT-6B and InternVL-14B: a CLIPImageProcessor
# at 336 px (short side resized, center crop) with ImageNet mean/std; the tower interpolates its position
# embedding to 336 at every forward (here: once, at convert).
LLAVA_INTERN_336 = (
    336,
    Preprocess(resize="shortest_edge", size=336, crop_size=336, resample="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD),
)
# family -> (image size, preprocessing) that InternVL's LLaVA CLIPVisionTower runs it at.
LLAVA_TOWER_RUNS_AT = {"intern_vit": LLAVA_INTERN_336, "internvl_14b": LLAVA_INTERN_336}



def named_tower(source_dir: Path, full: dict, shapes: dict | None, family: Family | None) -> tuple[Family, VisionConfig]:
    """The family and config of the tower a LLaVA ``config.json`` names in ``mm_vision_tower``."""
    name = str(full["mm_vision_tower"])
    keys = list(shapes) if shapes else None
    tower_dir = find_tower_dir(name, source_dir)
    if tower_dir is not None:
        vision, _ = load_hf_config(tower_dir)
        fam = family or route(vision, keys)
        config = fam.config_from_hf(vision)
        preprocess = read_preprocess(tower_dir, full)
        if preprocess is not None:
            config = dataclasses.replace(config, preprocess=preprocess)
    else:
        fam, config = preset_for_tower(name, full, shapes, family)
    return fam, as_run_by_llava(config, full)


def find_tower_dir(name: str, source_dir: Path) -> Path | None:
    """The tower's own directory (with a config.json), if the name leads to one here."""
    for candidate in (Path(name).expanduser(), Path(source_dir) / name):
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    if REPO_ID.match(name) and not name.startswith((".", "/", "~")):
        try:
            fetched = _hub_download(name, ["config.json", "preprocessor_config.json"])
        except MlcVisionError:
            return None
        return fetched if (fetched / "config.json").is_file() else None
    return None


def as_run_by_llava(config: VisionConfig, full: dict) -> VisionConfig:
    """The tower as InternVL's LLaVA runs it: its family's fixed size and processor, LLaVA's padding, no tiles."""
    pad = full.get("image_aspect_ratio") == "pad"
    config = dataclasses.replace(config, tiling=None)
    runs_at = LLAVA_TOWER_RUNS_AT.get(config.family)
    if runs_at is None:
        return dataclasses.replace(config, preprocess=dataclasses.replace(config.preprocess, pad_to_square=pad))
    size, preprocess = runs_at
    checkpoint_size = config.checkpoint_image_size or config.image_size
    return dataclasses.replace(
        config, image_size=size, preprocess=dataclasses.replace(preprocess, pad_to_square=pad),
        checkpoint_image_size=checkpoint_size if checkpoint_size != size else None,
    )


# ---- presets as the tower's architecture --------------------------------------------------------


def _normalized(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _hinted(preset: str, tower_name: str) -> bool:
    """Whether the tower's name (its last path part) is this preset's name or hub repo."""
    wanted = _normalized(Path(tower_name.rstrip("/")).name)
    repo = preset_info(preset).get("hf_repo") or ""
    return wanted in (_normalized(preset), _normalized(repo.split("/")[-1])) or tower_name == repo


def tower_shapes(fam: Family, config: VisionConfig, full: dict, shapes: dict) -> dict:
    """``{our name: shape}`` of the checkpoint's tower keys, as ``fam`` maps them (projector left out)."""
    mapper = key_mapper(fam, dataclasses.replace(config, projector=None), full)
    out = {}
    for key, shape in shapes.items():
        name = mapper.resolve(key)
        if isinstance(name, str):
            out[name] = shape
    return out


def preset_fits(preset: str, full: dict, shapes: dict) -> tuple[Family, VisionConfig] | None:
    """The preset's family and config when its full model has exactly the tower's parameters and shapes."""
    config = dataclasses.replace(load_preset(preset), projector=None)
    fam = get_family(config.family)
    if not mapped_names(key_mapper(fam, config, full), shapes):
        return None
    config = settle_optional_parts(fam, config, full, shapes)
    want = {name: shape for name, (shape, _) in expected_params(fam, config, "float32").items()}
    return (fam, config) if tower_shapes(fam, config, full, shapes) == want else None


def preset_for_tower(name: str, full: dict, shapes: dict | None, family: Family | None) -> tuple[Family, VisionConfig]:
    """The preset that is the tower: by the checkpoint's shapes, the name breaking ties."""
    presets = list_presets()
    if shapes is None:
        hinted = [p for p in presets if _hinted(p, name)]
        if not hinted:
            raise MlcVisionError(
                f"config.json names vision tower {name!r}: no config.json found for it, the checkpoint's keys "
                "cannot be listed, and no preset has that name or hf_repo"
            )
        config = load_preset(hinted[0])
        return family or get_family(config.family), config
    fits = {p: fit for p in presets if (fit := preset_fits(p, full, shapes)) is not None}
    if family is not None:
        fits = {p: fit for p, fit in fits.items() if fit[0] is family}
    if not fits:
        count = sum(1 for key in shapes if key.startswith(TOWER_PREFIX))
        raise MlcVisionError(
            f"config.json names vision tower {name!r}: no config.json found for it (looked at the path, "
            f"beside the checkpoint and in the hub cache), and no preset's parameters match the {count} tower "
            f"keys under {TOWER_PREFIX!r}; put the tower's config.json at {name!r}"
        )
    hinted = [p for p in fits if _hinted(p, name)]
    chosen = hinted[0] if hinted else sorted(fits)[0]
    if not hinted and len({_architecture(fit[1]) for fit in fits.values()}) > 1:
        raise MlcVisionError(
            f"vision tower {name!r}: the checkpoint's keys fit several presets ({', '.join(sorted(fits))}) "
            "and the name is none of them"
        )
    return fits[chosen]


def _architecture(config: VisionConfig) -> str:
    """The config without what does not change the network (its name, preprocessing, how images are tiled)."""
    return repr(dataclasses.replace(config, preset=None, preprocess=Preprocess(), tiling=None))
