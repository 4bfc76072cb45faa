"""mlc-vision: Hugging Face vision encoders compiled with Apache TVM."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import mlc_vision` (and the CLI's --help) does not import TVM.
    if name == "VisionEncoder":
        from .runtime.encoder import VisionEncoder

        return VisionEncoder
    raise AttributeError(name)


__all__ = ["VisionEncoder", "__version__"]
