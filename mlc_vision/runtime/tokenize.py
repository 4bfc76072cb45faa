"""Texts -> ``input_ids`` / ``attention_mask`` with the checkpoint's own fast tokenizer (``tokenizer.json``).

Only the ``tokenizers`` library is needed (no transformers). Special tokens
are added by the tokenizer's own post-processor (CLIP: start and end of text;
SigLIP: ``</s>``), every text is truncated to the model's maximum length
(special tokens kept) and the batch padded as the model's processor does: to the longest text
(CLIP's ``padding=True``) or to the maximum length (SigLIP, whose processor
pads to 64; EVA-CLIP, whose open_clip tokenizer pads to 77). The pad id is
the tokenizer's pad token (``tokenizer_config.json`` / ``special_tokens_map.json``),
else the text config's ``pad_token_id``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import MlcVisionError

TOKENIZER_JSON = "tokenizer.json"


def _pad_token(directory: Path) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            token = json.loads(path.read_text()).get("pad_token")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MlcVisionError(f"cannot read {path}: {err}") from None
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            return token
    return None


class TextTokenizer:
    """The checkpoint's tokenizer with the padding and truncation of its processor."""

    def __init__(self, directory: str | Path, text_metadata: dict):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise MlcVisionError("tokenizing needs the tokenizers package: pip install tokenizers") from None
        directory = Path(directory)
        path = directory / TOKENIZER_JSON
        if not path.is_file():
            raise MlcVisionError(
                f"no {TOKENIZER_JSON} in {directory}: convert the checkpoint with --part text|both "
                "(it copies the tokenizer) or pass --tokenizer DIR"
            )
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises its own exception type
            raise MlcVisionError(f"cannot read tokenizer {path}: {str(err).splitlines()[0]}") from None
        self.max_length = int(text_metadata["max_length"])
        self._tokenizer.no_padding()
        # truncation before the special tokens are added, so that they always fit (as transformers does)
        self._tokenizer.enable_truncation(self.max_length)
        self.padding = text_metadata["padding"]
        pad = _pad_token(directory)
        pad_id = self._tokenizer.token_to_id(pad) if pad is not None else None
        self.pad_id = int(pad_id if pad_id is not None else text_metadata["pad_token_id"])

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, int32 ``[len(texts), length]``."""
        encoded = [self._tokenizer.encode(text) for text in texts]
        ids = [e.ids for e in encoded]
        length = self.max_length if self.padding == "max_length" else max(len(i) for i in ids)
        input_ids = np.full((len(ids), length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(ids), length), dtype=np.int32)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return input_ids, mask
