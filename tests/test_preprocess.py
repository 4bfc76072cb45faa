"""Preprocessing parity: mlc_vision.runtime.preprocess against the transformers processors.

References (torch, torchvision, transformers are test-only):
- default backend: transformers 5's default ``CLIPImageProcessor`` / ``SiglipImageProcessor``
  (torchvision backend, CPU) -> bit-exact (max abs error 0);
- ``backend="pil"``: ``CLIPImageProcessorPil`` / ``SiglipImageProcessorPil`` -> bit-exact;
  InternVL's torchvision transform on a PIL image -> 1e-6 (float rounding only);
- LLaVA's ``expand2square`` (written here from LLaVA's definition) + the processor -> bit-exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import transformers
from PIL import Image
from transformers import AutoImageProcessor, CLIPImageProcessor, SiglipImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from mlc_vision.config import Preprocess
from mlc_vision.errors import MlcVisionError
from mlc_vision.checkpoint.processor import preprocess_config_from_hf
from mlc_vision.runtime.preprocess import preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- real-looking images ----------------------------------------------------------------


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """HxWx3 uint8: smooth gradients, a few hard-edged shapes, a fine texture and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y, x = y / max(height - 1, 1), x / max(width - 1, 1)
    img = np.stack([200 * x + 30, 180 * y + 40, 120 * (1 - x * y) + 60], axis=-1)
    for _ in range(4):  # discs and rectangles with sharp edges
        cy, cx, r = rng.uniform(0, 1, 3)
        color = rng.uniform(0, 255, 3)
        disc = (y - cy) ** 2 + (x - cx) ** 2 < (0.3 * r) ** 2
        mask = disc if rng.random() < 0.5 else (abs(y - cy) < r / 4) & (abs(x - cx) < r / 3)
        img[mask] = color
    img += 25 * np.sin(40 * x + 25 * y)[..., None]  # texture near the resampling frequency
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def rgba(height: int, width: int) -> Image.Image:
    alpha = np.linspace(0, 255, width, dtype=np.float64)[None, :] * np.linspace(0.2, 1, height)[:, None]
    return Image.fromarray(np.dstack([photo(height, width, 1), alpha.astype(np.uint8)]))


def palette(height: int, width: int, transparent: bool) -> Image.Image:
    image = Image.fromarray(photo(height, width, 2)).quantize(colors=64)
    if transparent:
        image.info["transparency"] = 3
    return image


def cases() -> dict[str, Image.Image]:
    return {
        "rgb_333x517": Image.fromarray(photo(333, 517)),
        "rgb_517x333": Image.fromarray(photo(517, 333, 3)),
        "tiny_3x5": Image.fromarray(photo(3, 5, 4)),
        "wide_20x1000": Image.fromarray(photo(20, 1000, 5)),
        "tall_1000x20": Image.fromarray(photo(1000, 20, 6)),
        "gray_L": Image.fromarray(photo(241, 190, 7)).convert("L"),
        "gray_LA": rgba(120, 97).convert("LA"),
        "rgba_alpha": rgba(250, 301),
        "palette_P": palette(160, 210, transparent=False),
        "palette_P_transparent": palette(160, 210, transparent=True),
        "cmyk": Image.fromarray(photo(140, 180, 8)).convert("CMYK"),
        "gray_16bit": Image.fromarray(photo(90, 130, 9)[..., 0].astype(np.uint16) * 3),
        "exact_size": Image.fromarray(photo(224, 224, 10)),
    }


CASES = cases()


def clip_kwargs(size: int = 224) -> dict:
    return {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}


def max_err(ours: np.ndarray, ref) -> float:
    ref = np.asarray(ref)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    return float(np.abs(ours - ref).max())


# ---- the default transformers processors (torchvision backend) -----------------------------


def test_default_processor_is_torchvision():
    """What transformers 5 hands out when torchvision is installed: the class we match by default."""
    assert CLIPImageProcessor().backend == "torchvision"
    assert SiglipImageProcessor().backend == "torchvision"


@pytest.mark.parametrize("name", list(CASES))
def test_clip_default_bit_exact(name):
    processor = CLIPImageProcessor(**clip_kwargs(336))
    pre = preprocess_config_from_hf(processor.to_dict())
    ours = preprocess(CASES[name], pre)
    assert max_err(ours, processor(CASES[name], return_tensors="np")["pixel_values"]) == 0.0


@pytest.mark.parametrize("name", list(CASES))
def test_siglip_default_bit_exact(name):
    processor = SiglipImageProcessor(size={"height": 384, "width": 384})
    pre = preprocess_config_from_hf(processor.to_dict())
    ours = preprocess(CASES[name], pre)
    assert max_err(ours, processor(CASES[name], return_tensors="np")["pixel_values"]) == 0.0


def test_batch_of_different_sizes():
    images = [CASES[k] for k in ("rgb_333x517", "tiny_3x5", "wide_20x1000", "rgba_alpha", "gray_L")]
    processor = CLIPImageProcessor(**clip_kwargs())
    ours = preprocess(images, preprocess_config_from_hf(processor.to_dict()))
    assert ours.shape == (5, 3, 224, 224)
    assert max_err(ours, processor(images, return_tensors="np")["pixel_values"]) == 0.0


def test_bilinear_and_other_crop():
    processor = CLIPImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=2)
    pre = preprocess_config_from_hf(processor.to_dict())
    assert pre.resample == "bilinear" and (pre.size, pre.crop_size) == (256, 224)
    images = [CASES["rgb_333x517"], CASES["tall_1000x20"]]
    assert max_err(preprocess(images, pre), processor(images, return_tensors="np")["pixel_values"]) == 0.0


# ---- the PIL backend ---------------------------------------------------------------------------


PIL_CASES = ["rgb_333x517", "tiny_3x5", "wide_20x1000", "tall_1000x20", "rgba_alpha", "palette_P"]


@pytest.mark.parametrize("name", PIL_CASES)
def test_pil_backend_bit_exact(name):
    siglip = SiglipImageProcessorPil(size={"height": 256, "width": 256})
    for processor in (CLIPImageProcessorPil(**clip_kwargs()), siglip):
        pre = preprocess_config_from_hf(processor.to_dict())
        ours = preprocess(CASES[name], pre, backend="pil")
        assert max_err(ours, processor(CASES[name], return_tensors="np")["pixel_values"]) == 0.0


def test_backends_differ_only_in_resize():
    """Documented gap between the two transformers backends: a few uint8 steps in the resize."""
    pre = Preprocess(size=224, crop_size=224)
    image = CASES["rgb_333x517"]
    gap = np.abs(preprocess(image, pre) - preprocess(image, pre, backend="pil")).max()
    assert 0 < gap < 8 / 255 / min(pre.std)
    # Without a resize only float rounding is left.
    same = CASES["exact_size"]
    assert np.abs(preprocess(same, pre) - preprocess(same, pre, backend="pil")).max() < 1e-6


# ---- LLaVA pad_to_square -------------------------------------------------------------------------


def expand2square(pil_img, background_color):
    """LLaVA's definition (llava/mm_utils.py)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


@pytest.mark.parametrize("name", ["rgb_333x517", "rgb_517x333", "tiny_3x5", "wide_20x1000", "tall_1000x20", "gray_L"])
def test_llava_pad_to_square(name):
    processor = CLIPImageProcessor(**clip_kwargs(336))
    image = CASES[name].convert("RGB")
    ref = processor.preprocess(
        expand2square(image, tuple(int(x * 255) for x in processor.image_mean)), return_tensors="np"
    )["pixel_values"]
    pre = preprocess_config_from_hf(processor.to_dict(), pad_to_square=True)
    assert max_err(preprocess(image, pre), ref) == 0.0


# ---- InternVL -----------------------------------------------------------------------------------------


def internvl_transform(size: int = 448):
    """InternVL-Chat's build_transform (torchvision transforms on a PIL image)."""
    return T.Compose(
        [
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


INTERNVL = Preprocess(resize="exact", size=448, crop_size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@pytest.mark.parametrize("name", ["rgb_333x517", "tiny_3x5", "wide_20x1000", "tall_1000x20", "gray_L", "exact_size"])
def test_internvl_pil_backend(name):
    """T.Resize on a PIL image is Pillow's resize: only float rounding is left (ToTensor divides in float32)."""
    ref = internvl_transform()(CASES[name]).numpy()[None]
    assert max_err(preprocess(CASES[name], INTERNVL, backend="pil"), ref) <= 1e-6


def test_internvl_default_backend_tolerance():
    """The default (torchvision-tensor) resize is not Pillow's: documented gap of a few uint8 steps."""
    image = CASES["rgb_333x517"]
    gap = max_err(preprocess(image, INTERNVL), internvl_transform()(image).numpy()[None])
    assert gap <= 16 / 255 / min(IMAGENET_STD)


# ---- inputs -----------------------------------------------------------------------------------------------


def test_paths_arrays_and_pil_agree(tmp_path):
    pre = Preprocess()
    array = photo(150, 230, 11)
    path = tmp_path / "photo.png"
    Image.fromarray(array).save(path)
    from_pil = preprocess(Image.fromarray(array), pre)
    assert np.array_equal(preprocess(str(path), pre), from_pil)
    assert np.array_equal(preprocess(path, pre), from_pil)
    assert np.array_equal(preprocess(array, pre), from_pil)
    gray = array[..., 0]
    assert np.array_equal(preprocess(gray, pre), preprocess(Image.fromarray(gray), pre))
    assert preprocess([path, array, Image.fromarray(gray)], pre).shape == (3, 3, 224, 224)


def test_exif_orientation_applied(tmp_path):
    array = photo(120, 200, 12)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, exif=exif.tobytes(), quality=95)
    processor = CLIPImageProcessor(**clip_kwargs())
    ref = processor(transformers.image_utils.load_image(str(path)), return_tensors="np")["pixel_values"]
    assert max_err(preprocess(path, preprocess_config_from_hf(processor.to_dict())), ref) == 0.0


def test_unreadable_file_is_one_line_error(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not a png")
    for path in (bad, tmp_path / "missing.jpg"):
        with pytest.raises(MlcVisionError) as err:
            preprocess(path, Preprocess())
        message = str(err.value)
        assert str(path) in message and "\n" not in message


def test_bad_inputs_are_errors():
    with pytest.raises(MlcVisionError, match="uint8"):
        preprocess(np.zeros((10, 10, 3), np.float32), Preprocess())
    with pytest.raises(MlcVisionError, match="empty"):
        preprocess([], Preprocess())
    with pytest.raises(MlcVisionError, match="backend"):
        preprocess(CASES["tiny_3x5"], Preprocess(), backend="cv2")
    with pytest.raises(MlcVisionError, match="resample"):
        preprocess(CASES["tiny_3x5"], Preprocess(resample="lanczos"))


# ---- preprocessor_config.json -> Preprocess ------------------------------------------------------------


def test_config_from_clip_processor():
    pre = preprocess_config_from_hf(CLIPImageProcessor(**clip_kwargs(336)).to_dict())
    assert pre == Preprocess(resize="shortest_edge", size=336, crop_size=336, resample="bicubic")


def test_config_from_siglip_processor():
    pre = preprocess_config_from_hf(SiglipImageProcessorPil(size={"height": 384, "width": 384}).to_dict())
    assert pre == Preprocess(
        resize="exact", size=384, crop_size=None, resample="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )


def test_config_from_saved_processor(tmp_path):
    """The file save_pretrained writes, read back through AutoImageProcessor and through us."""
    SiglipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert processor.backend == "torchvision"
    image = CASES["rgb_517x333"]
    ref = processor(image, return_tensors="np")["pixel_values"]
    assert max_err(preprocess(image, preprocess_config_from_hf(config)), ref) == 0.0


def test_config_old_style_and_errors():
    old_clip = {"size": 224, "crop_size": 224, "do_center_crop": True, "resample": 3,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    assert preprocess_config_from_hf(old_clip) == Preprocess()
    assert preprocess_config_from_hf({"size": 448, "do_center_crop": False}).resize == "exact"
    with pytest.raises(MlcVisionError, match="square"):
        preprocess_config_from_hf({"size": {"height": 224, "width": 320}})
    with pytest.raises(MlcVisionError, match="resample"):
        preprocess_config_from_hf({"size": {"height": 224, "width": 224}, "resample": 9})
    with pytest.raises(MlcVisionError, match="do_resize"):
        preprocess_config_from_hf({"do_resize": False})
