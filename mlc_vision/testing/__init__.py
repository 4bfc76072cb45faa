"""Test-side code shared by the tests, ``bench`` and ``scripts/gpu_check.py``.

Torch references of each family (:mod:`.references`) and the parity
tolerances (:mod:`.parity`). It needs the ``test`` extra; without torch or
transformers importing it is a one-line error that says how to install
them (timm, the EVA-CLIP reference, is checked where it is used).
"""

from __future__ import annotations

import importlib.util

from ..errors import MlcVisionError

TEST_EXTRA = ("torch", "transformers")



def require(*names: str) -> None:
    """Raise the one-line install hint when any of ``names`` is not importable."""
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise MlcVisionError(
            f"mlc_vision.testing needs the test dependencies ({', '.join(missing)} missing): "
            "pip install mlc-vision[test]"
        )


require(*TEST_EXTRA)
