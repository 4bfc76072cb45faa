"""mlc-vision: Hugging Face vision encoders compiled with Apache TVM."""

import os

__version__ = "0.1.0"

# TVM's CPU thread pool assumes 2-way SMT on x86 and starts one worker per two
# logical CPUs: on a 2-vCPU machine our CPU libraries would run on one core.
# Use every CPU this process may run on unless the user chose (TVM_NUM_THREADS
# is read when the pool starts, at the first parallel kernel).
if hasattr(os, "sched_getaffinity"):
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))


def __getattr__(name):
    # Lazy so that `import mlc_vision` (and the CLI's --help) does not import TVM.
    if name == "VisionEncoder":
        from .runtime.encoder import VisionEncoder

        return VisionEncoder
    raise AttributeError(name)


__all__ = ["VisionEncoder", "__version__"]
