"""runtime/memory.py: whether a library's weights are packed once at load, by the memory left.

The library-level case (a built fp32 library on too little memory runs its plain entries, with
the same numbers) is in test_cpu_f32_gemm.py's test_prepacked_library_equals_its_entries."""

from __future__ import annotations

import warnings

import pytest

from mlc_vision.runtime import memory

PREPACK = {"function": "prepack_params", "entries": {"encode": "encode_prepacked"}}


def _metadata(prepack=PREPACK):
    params = [{"name": "w", "shape": [1024, 1024], "dtype": "float32"}, {"name": "b", "shape": [1024], "dtype": "bfloat16"}]
    return {"prepack": prepack, "params": params}


def test_params_bytes_counts_every_param_by_its_dtype():
    assert memory.params_bytes(_metadata()) == 1024 * 1024 * 4 + 1024 * 2


def test_meminfo_available_is_read_in_bytes(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2000000 kB\n")
    assert memory._meminfo_available(meminfo) == 2000000 * 1024
    meminfo.write_text("MemTotal: 1 kB\n")
    assert memory._meminfo_available(meminfo) is None
    assert memory._meminfo_available(tmp_path / "missing") is None


def test_cgroup_headroom_is_the_limit_less_the_usage(tmp_path):
    v2 = (tmp_path / "memory.max", tmp_path / "memory.current")
    v1 = (tmp_path / "limit_in_bytes", tmp_path / "usage_in_bytes")
    assert memory._cgroup_headroom((v2, v1)) is None  # neither readable: not in a cgroup we can see
    v1[0].write_text("3000\n")
    v1[1].write_text("1000\n")
    assert memory._cgroup_headroom((v2, v1)) == 2000
    v2[0].write_text("max\n")
    v2[1].write_text("500\n")
    assert memory._cgroup_headroom((v2, v1)) is None  # v2 without a limit; v1 is not looked at
    v2[0].write_text("400\n")
    assert memory._cgroup_headroom((v2, v1)) == 0  # over the limit already


def test_prepack_only_where_the_packed_copy_fits():
    needed = memory.params_bytes(_metadata()) + memory.HEADROOM_BYTES
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert memory.prepack_fits(_metadata(), available=needed)
        assert not memory.prepack_fits(_metadata(prepack=None), available=0)  # nothing to pack: no warning
    with pytest.warns(UserWarning, match=r"not packed at load: a packed copy needs 0\.5 GiB and 0\.5 GiB"):
        assert not memory.prepack_fits(_metadata(), available=needed - 1)


def test_unknown_memory_counts_as_fitting(monkeypatch):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: None)
    assert memory.prepack_fits(_metadata())
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 0)
    with pytest.warns(UserWarning):
        assert not memory.prepack_fits(_metadata())
