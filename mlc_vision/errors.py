"""The one error type users see.

Every mistake a user can make (a bad path, a missing key, an unknown target)
raises :class:`MlcVisionError` with a single-line message that names the
culprit. The CLI prints ``error: <message>`` and exits 1; anything else is a
bug in mlc-vision and keeps its traceback.
"""


class MlcVisionError(Exception):
    """A user-facing error with a one-line message naming what was wrong."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
