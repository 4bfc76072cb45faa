"""Image-text similarity with a contrastive library (``compile --part both``) and its params (``convert --part both``).

``logits_per_image = logit_scale.exp() * cos(image_embeds, text_embeds)``
(+ ``logit_bias`` for SigLIP), as transformers' ``CLIPModel`` / ``SiglipModel``
compute them; probabilities are the softmax over the texts of each image
(CLIP, EVA-CLIP: zero-shot classification) or the sigmoid of each pair
(SigLIP).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm

from ..errors import MlcVisionError
from ..weights.params import NUMPY_DTYPES, load_params, read_params
from ..cpu_features import check_cpu_library
from .encoder import (
    PerThreadVM,
    check_params_match,
    entry_function,
    entry_params,
    load_library,
    param_names,
    parse_device,
    read_metadata,
)
from .preprocess import preprocess
from .tokenize import TextTokenizer


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


PROBABILITIES = {"softmax": lambda logits: softmax(logits, axis=1), "sigmoid": sigmoid}


class ContrastiveEncoder:
    """Images and texts -> embeddings -> logits and probabilities."""

    def __init__(self, lib: str | Path, params: str | Path, device: str = "cpu", tokenizer: str | Path | None = None):
        self.lib_path, self.params_dir = Path(lib), Path(params)
        self.tvm_device = parse_device(device)
        self._vm = PerThreadVM(load_library(self.lib_path), self.tvm_device)  # safe from several threads
        self.metadata = read_metadata(self._vm.first, self.lib_path)
        check_cpu_library(self.metadata, self.lib_path)
        if self.metadata.get("part") != "both":
            raise MlcVisionError(
                f"library {self.lib_path} has no image and text entries (part {self.metadata.get('part', 'vision')!r}); "
                "compile it with --part both"
            )
        check_params_match(self.metadata, self.params_dir)
        params = load_params(self.params_dir, param_names(self.metadata), self.tvm_device)
        self._params = entry_params(self._vm.first, self.metadata, params)  # fp32 CPU: weights packed once
        self.text = self.metadata["text"]
        self._tokenizer_dir = Path(tokenizer) if tokenizer is not None else self.params_dir
        self._tokenizer = None
        self.logit_scale, self.logit_bias = self._logit_scalars()

    def _logit_scalars(self) -> tuple[float, float]:
        records, _ = read_params(self.params_dir)
        scale = float(records["logit_scale"].read().reshape(-1)[0])
        bias = float(records["logit_bias"].read().reshape(-1)[0]) if "logit_bias" in records else 0.0
        return scale, bias

    def _tensor(self, array: np.ndarray):
        return tvm.runtime.tensor(np.ascontiguousarray(array), self.tvm_device)

    def encode_images(self, images) -> np.ndarray:
        """``[n, projection_dim]`` float32 image embeddings (unnormalized)."""
        from ..config import Preprocess

        pixels = images if isinstance(images, np.ndarray) else preprocess(images, Preprocess.from_dict(self.metadata["preprocess"]))
        encode = self._vm[entry_function(self.metadata, "encode", self._params.packed)]
        out = encode(self._tensor(pixels.astype(NUMPY_DTYPES[self.metadata["dtype"]])), self._params.tensors).numpy()
        return out[:, 0].astype(np.float32)

    def encode_token_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """``[m, projection_dim]`` float32 text embeddings of tokenized texts (int ``[m, length]``)."""
        if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
            raise MlcVisionError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be equal [batch, length]")
        if input_ids.shape[1] > self.text["max_length"]:
            raise MlcVisionError(f"{input_ids.shape[1]} tokens exceed the model's maximum of {self.text['max_length']}")
        encode_text = self._vm[entry_function(self.metadata, "encode_text", self._params.packed)]
        ids, mask = (self._tensor(a.astype(np.int32)) for a in (input_ids, attention_mask))
        out = encode_text(ids, mask, self._params.tensors)
        return out.numpy().astype(np.float32)

    @property
    def tokenizer(self) -> TextTokenizer:
        """The checkpoint's tokenizer (read on first use: token ids can be passed without one)."""
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(self._tokenizer_dir, self.text)
        return self._tokenizer

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.encode_token_ids(*self.tokenizer(list(texts)))

    def logits_per_image(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        cos = _normalized(image_embeds) @ _normalized(text_embeds).T
        return np.exp(self.logit_scale) * cos + self.logit_bias

    def probabilities(self, images, texts: list[str]) -> np.ndarray:
        """``[n_images, n_texts]``: softmax over the texts (CLIP, EVA) or sigmoid per pair (SigLIP)."""
        logits = self.logits_per_image(self.encode_images(images), self.encode_texts(texts))
        return PROBABILITIES[self.text["logits"]](logits)
