"""Whether a library's weights can be packed once at load without running out of memory.

An fp32 CPU library's ``prepack_params`` (``metadata["prepack"]``) makes a packed
copy of every linear layer's weights while the loaded ones are still held: for
the time of that call the weights take about twice their size. For a tower of a
few hundred million parameters that is a second or two of a gigabyte more; for
a multi-billion-parameter tower in fp32 it can be more than the machine, or the
container, has left, and then Linux kills the process instead of raising an
error. So the runtime packs only where the packed copy fits in the memory that
is still available, and otherwise calls the library's plain entries, which give
the same numbers and pack their weights in every call instead.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from ..weights.params import NUMPY_DTYPES

#: Memory left free beyond the packed copy: the packing pads each weight to 64 columns, and the
#: process allocates activations and scratch right after.
HEADROOM_BYTES = 512 << 20

_MEMINFO = Path("/proc/meminfo")
#: cgroup v2 (limit, usage), then v1; the first pair that is readable is the container's.
_CGROUP_FILES = (
    (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
    (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes")),
)


def _meminfo_available(meminfo: Path = _MEMINFO) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom(files=_CGROUP_FILES) -> int | None:
    for limit_file, usage_file in files:
        try:
            limit, usage = limit_file.read_text().strip(), usage_file.read_text().strip()
        except OSError:
            continue
        if limit == "max" or not limit.isdigit() or not usage.isdigit():
            return None  # no limit set (v1 writes a huge number, which passes as one)
        return max(0, int(limit) - int(usage))
    return None


def available_memory_bytes() -> int | None:
    """Bytes this process can still allocate: the OS's MemAvailable, lowered to what the container's
    cgroup limit leaves; None where neither is known (not Linux)."""
    known = [b for b in (_meminfo_available(), _cgroup_headroom()) if b is not None]
    return min(known) if known else None


def params_bytes(metadata: dict) -> int:
    """Bytes of the library's parameters (``metadata["params"]``), the bound on what packing copies."""
    return sum(math.prod(spec["shape"]) * NUMPY_DTYPES[spec["dtype"]].itemsize for spec in metadata["params"])


def prepack_fits(metadata: dict, available: int | None = None) -> bool:
    """Whether the library's weights may be packed once at load (module docstring): it has a
    ``prepack`` function and a packed copy of its params fits in the ``available`` memory (read
    from the OS when None; unknown counts as fitting). A library that could pack but does not
    fit says so in a warning."""
    if not metadata.get("prepack"):
        return False
    available = available_memory_bytes() if available is None else available
    needed = params_bytes(metadata) + HEADROOM_BYTES
    if available is None or needed <= available:
        return True
    warnings.warn(
        f"the library's weights are not packed at load: a packed copy needs {needed / 2**30:.1f} GiB "
        f"and {available / 2**30:.1f} GiB of memory is available; each call packs them instead "
        "(the same numbers, a few per cent slower)",
        stacklevel=3,
    )
    return False
