"""Reliability: no crash, no silent corruption, no lost output, whatever the input or fault.

Every bad input is one ``error:`` line, exit 1, no traceback, nothing at
``-o`` (and an earlier output there intact); a fuzzed safetensors header is
either read exactly as the ``safetensors`` library reads it or refused in one
line; one ``VisionEncoder`` serves several threads; a run killed with SIGKILL
at any point of ``convert`` or ``compile`` never costs the previous output,
and the next run leaves no temporary files. See docs/internals.md, "Runtime
guarantees".
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from mlc_vision import atomic
from mlc_vision.cli import main
from mlc_vision.weights import params as params_module

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
REPO = Path(__file__).resolve().parents[1]


# ---- helpers ----------------------------------------------------------------------------------


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code: int, err: str, *culprits: str) -> None:
    assert code == 1, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for culprit in culprits:
        assert culprit in err, (culprit, err)


def snapshot(path: Path) -> dict[str, str] | None:
    """``{relative name: sha256}`` of a file or a directory tree; None when absent."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def hidden_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def save_clip(root: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**{**TINY, **overrides})).eval().save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_clip(tmp_path_factory.mktemp("rel-ckpt"))


@pytest.fixture(scope="module")
def built(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("rel-out")
    lib, params = root / "clip.so", root / "params"
    assert main(["compile", "-m", str(checkpoint), "-o", str(lib)]) == 0
    assert main(["convert", "-m", str(checkpoint), "-o", str(params)]) == 0
    np.save(root / "px.npy", np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    return lib, params, root / "px.npy"


def copy_checkpoint(checkpoint: Path, dst: Path, edit) -> Path:
    shutil.copytree(checkpoint, dst)
    edit(dst)
    return dst


def edit_json(name: str, change):
    def edit(path: Path):
        data = json.loads((path / name).read_text())
        data = change(data)
        (path / name).write_text(json.dumps(data))

    return edit


def set_field(name: str, field: str, value):
    def change(data):
        target = data
        *parents, last = field.split(".")
        for key in parents:
            target = target[key]
        target[last] = value
        return data

    return edit_json(name, change)


# ---- config.json and preprocessor_config.json: checked before any work -------------------------------

CONFIG_CASES = {
    "heads 0": ("num_attention_heads", 0),
    "patch 0": ("patch_size", 0),
    "hidden string": ("hidden_size", "64"),
    "unknown act": ("hidden_act", "swishy"),
    "hidden 2**40": ("hidden_size", 2**40),
    "channels 0": ("num_channels", 0),
}

PREPROCESSOR_CASES = {
    "a list": (edit_json("preprocessor_config.json", lambda d: [d]), "JSON object"),
    "mean string": (set_field("preprocessor_config.json", "image_mean", "gray"), "image_mean"),
    "mean null": (set_field("preprocessor_config.json", "image_mean", None), "image_mean"),
    "rescale string": (set_field("preprocessor_config.json", "rescale_factor", "x"), "rescale_factor"),
    "size string": (set_field("preprocessor_config.json", "size.shortest_edge", "big"), "size.shortest_edge"),
    "resample list": (set_field("preprocessor_config.json", "resample", [3]), "resample"),
    "crop 0": (set_field("preprocessor_config.json", "crop_size", 0), "crop_size"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
@pytest.mark.parametrize("command", ["compile", "convert"])
def test_bad_config_json_is_one_line(case, command, checkpoint, tmp_path, capsys):
    field, value = CONFIG_CASES[case]
    ckpt = copy_checkpoint(checkpoint, tmp_path / "ck", set_field("config.json", field, value))
    out = tmp_path / ("x.so" if command == "compile" else "params")
    code, _, err = run_cli(capsys, command, "-m", ckpt, "-o", out)
    assert_one_error(code, err, "config.json", field)
    assert not out.exists() and hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("case", sorted(PREPROCESSOR_CASES))
def test_bad_preprocessor_config_is_one_line(case, checkpoint, tmp_path, capsys):
    edit, field = PREPROCESSOR_CASES[case]
    ckpt = copy_checkpoint(checkpoint, tmp_path / "ck", edit)
    code, _, err = run_cli(capsys, "compile", "-m", ckpt, "-o", tmp_path / "x.so")
    assert_one_error(code, err, "preprocessor_config.json", field)
    assert not (tmp_path / "x.so").exists()


def test_config_check_knows_every_activation_of_the_model_builder():
    from mlc_vision.models.layers import ACTIVATIONS, GATED_ACTIVATIONS
    from mlc_vision.validate import KNOWN_ACTIVATIONS

    assert sorted(KNOWN_ACTIVATIONS) == sorted({**ACTIVATIONS, **GATED_ACTIVATIONS})


# ---- CLI usage and paths -------------------------------------------------------------------------------


USAGE_CASES = {
    "feature": (["--feature", "foo"], "--feature"),
    "dtype": (["--dtype", "float64"], "--dtype"),
    "select layer": (["--select-layer", "abc"], "--select-layer"),
    "projector width": (["--projector", "linear", "--projector-hidden-size", "-5"], "projector_hidden_size"),
    "image size 0": (["--image-size", "0"], "image_size"),
}


@pytest.mark.parametrize("case", sorted(USAGE_CASES))
def test_compile_usage_errors_are_one_line_exit_1(case, checkpoint, tmp_path, capsys):
    options, culprit = USAGE_CASES[case]
    code, _, err = run_cli(capsys, "compile", "-m", checkpoint, *options, "-o", tmp_path / "x.so")
    assert_one_error(code, err, culprit)
    assert not (tmp_path / "x.so").exists()


def test_help_exits_0(capsys):
    code, out, _ = run_cli(capsys, "compile", "--help")
    assert code == 0 and "--model" in out


def test_compile_output_is_checked_before_compiling(checkpoint, tmp_path, capsys, monkeypatch):
    import mlc_vision.compiler.export as export

    def no_compile(*_, **__):
        raise AssertionError("compiled before checking -o")

    monkeypatch.setattr(export, "compile_module", no_compile)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.so").mkdir()
    for out, culprit in ((tmp_path / "dir.so", "is a directory"), (tmp_path / "file" / "x.so", "which is a file")):
        code, _, err = run_cli(capsys, "compile", "-m", checkpoint, "-o", out)
        assert_one_error(code, err, culprit)


def test_read_only_output_is_one_line(built, checkpoint, tmp_path, capsys, monkeypatch):
    lib, params, pixels = built

    def read_only(self, *_, **__):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "touch", read_only)
    for argv in (
        ["compile", "-m", checkpoint, "-o", tmp_path / "x.so"],
        ["convert", "-m", checkpoint, "-o", tmp_path / "params"],
        ["run", "--lib", lib, "--params", params, "--pixel-values", pixels, "-o", tmp_path / "f.npy"],
    ):
        code, _, err = run_cli(capsys, *argv)
        assert_one_error(code, err, "cannot be written", os.strerror(errno.EROFS))
    assert list(tmp_path.iterdir()) == []


def test_nonexistent_relative_path_is_neither_dir_nor_hub_id(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "compile", "-m", "ck/x", "-o", "x.so")
    assert_one_error(code, err, "'ck/x' is neither a local directory nor a reachable hub id")


# ---- disk full -------------------------------------------------------------------------------------------


def _disk_full(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_in_convert_leaves_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(params_module._Shard, "append", _disk_full)
    code, _, err = run_cli(capsys, "convert", "-m", checkpoint, "-o", tmp_path / "params")
    assert_one_error(code, err, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_abort_cleans_up_when_closing_the_shard_fails(tmp_path):
    writer = params_module.ParamsWriter(tmp_path / "params")
    writer.add("w", np.zeros(4, np.float32))

    class FullDisk:
        def close(self):
            _disk_full()

    real = writer.current.file
    writer.current.file = FullDisk()
    with pytest.raises(OSError):
        writer.abort()
    real.close()
    assert list(tmp_path.iterdir()) == []


def test_disk_full_in_compile_and_run_keeps_the_old_output(built, checkpoint, tmp_path, capsys, monkeypatch):
    lib, params, pixels = built
    shutil.copy(lib, tmp_path / "clip.so")
    shutil.copy(f"{lib}.json", tmp_path / "clip.so.json")
    before = snapshot(tmp_path)
    monkeypatch.setattr(atomic, "commit", _disk_full)
    code, _, err = run_cli(capsys, "compile", "-m", checkpoint, "--select-layer", "-2", "-o", tmp_path / "clip.so")
    assert_one_error(code, err, os.strerror(errno.ENOSPC))
    assert snapshot(tmp_path) == before
    monkeypatch.setattr(atomic, "_write_synced", _disk_full)
    code, _, err = run_cli(capsys, "run", "--lib", lib, "--params", params, "--pixel-values", pixels, "-o", tmp_path / "f.npy")
    assert_one_error(code, err, os.strerror(errno.ENOSPC))
    assert snapshot(tmp_path) == before


# ---- run: bad inputs, mismatched or damaged files ------------------------------------------------------


def _run(capsys, lib, params, pixels, out, *extra):
    return run_cli(capsys, "run", "--lib", lib, "--params", params, "--pixel-values", pixels, "-o", out, *extra)


@pytest.mark.parametrize("device", ["foo", "cpu:99", "cuda:x", "llvm"])
def test_bad_device_is_one_line(device, built, tmp_path, capsys):
    lib, params, pixels = built
    code, _, err = _run(capsys, lib, params, pixels, tmp_path / "f.npy", "--device", device)
    assert_one_error(code, err, repr(device))
    assert not (tmp_path / "f.npy").exists()


def test_run_outputs_and_inputs_that_are_not_files(built, tmp_path, capsys):
    lib, params, pixels = built
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.npy").mkdir()
    np.savez(tmp_path / "px.npz", pixels=np.load(pixels))
    cases = (
        (pixels, tmp_path / "dir.npy", "is a directory"),
        (pixels, tmp_path / "file" / "f.npy", "which is a file"),
        (tmp_path / "px.npz", tmp_path / "f.npy", ".npz"),
    )
    for px, out, culprit in cases:
        code, _, err = _run(capsys, lib, params, px, out)
        assert_one_error(code, err, culprit)
    assert not (tmp_path / "f.npy").exists()


@pytest.mark.parametrize("size", [4096, 50000, 150000])
def test_truncated_library_is_one_line(size, built, tmp_path, capsys):
    lib, params, pixels = built
    short = tmp_path / "t.so"
    short.write_bytes(lib.read_bytes()[:size])
    code, _, err = _run(capsys, short, params, pixels, tmp_path / "f.npy")
    assert_one_error(code, err, "truncated")
    code, _, err = run_cli(capsys, "inspect", short)
    assert_one_error(code, err, "truncated")


FRESH_PROCESS_SCRIPT = """
import json, sys
from mlc_vision.cli import main
for args in json.loads(sys.argv[1]):
    print(main(args), flush=True)
"""


def test_truncated_and_foreign_libraries_do_not_crash_a_fresh_process(built, tmp_path):
    """In a process of its own: a crash there is a signal, not a failed assertion."""
    import tvm_ffi

    lib, params, pixels = built
    short = tmp_path / "t.so"
    short.write_bytes(lib.read_bytes()[:150000])
    foreign = tmp_path / "foreign.so"
    shutil.copy(next(Path(tvm_ffi.__file__).parent.rglob("libtvm_ffi.so")), foreign)
    calls = [
        [*command, str(bad)]
        for bad in (short, foreign)
        for command in (["run", "--params", str(params), "--pixel-values", str(pixels), "-o", str(tmp_path / "f.npy"), "--lib"], ["inspect"])
    ]
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT, json.dumps(calls)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1"] * len(calls)
    lines = proc.stderr.splitlines()
    assert len(lines) == len(calls) and all(line.startswith("error: ") for line in lines), lines
    assert [("is truncated" in line, "is not a TVM library" in line) for line in lines] == [(True, False)] * 2 + [(False, True)] * 2


def test_params_for_another_activation_are_refused(built, tmp_path, capsys):
    lib, _, pixels = built
    gelu = save_clip(tmp_path / "gelu", hidden_act="gelu")
    assert main(["convert", "-m", str(gelu), "-o", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    code, _, err = _run(capsys, lib, tmp_path / "p", pixels, tmp_path / "f.npy")
    assert_one_error(code, err, "hidden_act", "'gelu'", "'quick_gelu'")
    assert not (tmp_path / "f.npy").exists()


@pytest.mark.parametrize("metadata", ["absent", "null"])
def test_params_without_metadata_are_refused(metadata, built, tmp_path, capsys):
    lib, params, pixels = built
    shutil.copytree(params, tmp_path / "p")
    cache = json.loads((tmp_path / "p" / "tensor-cache.json").read_text())
    if metadata == "absent":
        del cache["metadata"]
    else:
        cache["metadata"] = None
    (tmp_path / "p" / "tensor-cache.json").write_text(json.dumps(cache))
    code, _, err = _run(capsys, lib, tmp_path / "p", pixels, tmp_path / "f.npy")
    assert_one_error(code, err, "no mlc_vision metadata")


def test_damaged_shard_is_caught_by_verify_and_a_short_one_always(built, tmp_path, capsys):
    lib, params, pixels = built
    shutil.copytree(params, tmp_path / "p")
    shard = tmp_path / "p" / "params_shard_0.bin"
    data = bytearray(shard.read_bytes())
    data[::4] = bytes(len(data[::4]))
    shard.write_bytes(bytes(data))
    code, _, err = _run(capsys, lib, tmp_path / "p", pixels, tmp_path / "f.npy", "--verify")
    assert_one_error(code, err, "params_shard_0.bin", "md5")
    shard.write_bytes(bytes(data[:-4]))
    code, _, err = _run(capsys, lib, tmp_path / "p", pixels, tmp_path / "f.npy")
    assert_one_error(code, err, "params_shard_0.bin", "bytes")
    assert not (tmp_path / "f.npy").exists()


def test_verify_passes_on_good_params(built, tmp_path, capsys):
    lib, params, pixels = built
    code, _, err = _run(capsys, lib, params, pixels, tmp_path / "f.npy", "--verify")
    assert code == 0, err


def test_nan_pixels_warn_in_one_line(built, tmp_path, capsys):
    lib, params, _ = built
    pixels = np.zeros((1, 3, 32, 32), np.float32)
    pixels[0, 1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", pixels)
    code, _, err = _run(capsys, lib, params, tmp_path / "nan.npy", tmp_path / "f.npy")
    assert code == 0
    assert err.startswith("warning: ") and err.count("\n") == 1 and "NaN" in err, err


# ---- checkpoints that lie --------------------------------------------------------------------------------


def _header_and_data(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_safetensors(path: Path, header: dict, data: bytes, length_delta: int = 0, padding: int = 0) -> None:
    text = json.dumps(header).encode() + b" " * padding
    path.write_bytes(struct.pack("<Q", len(text) + length_delta) + text + data)


def _short_header_length(path: Path):
    header, data = _header_and_data(path / "model.safetensors")
    _write_safetensors(path / "model.safetensors", header, data, length_delta=-4, padding=4)


def _overlapping_offsets(path: Path):
    header, data = _header_and_data(path / "model.safetensors")
    header["pre_layrnorm.bias"]["data_offsets"] = header["embeddings.class_embedding"]["data_offsets"]
    _write_safetensors(path / "model.safetensors", header, data)


def _nan_weight(path: Path):
    tensors = load_file(path / "model.safetensors")
    tensors["encoder.layers.0.mlp.fc1.bias"][3] = np.nan
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _shard_outside(path: Path):
    other = path.parent / "other"
    other.mkdir()
    (path / "model.safetensors").rename(other / "model.safetensors")
    keys = list(_header_and_data(other / "model.safetensors")[0])
    weight_map = {k: "../other/model.safetensors" for k in keys if k != "__metadata__"}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _weight_map_list(path: Path):
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))


def _deep_header(path: Path):
    text = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8:])


def _infinite_shape(path: Path):
    raw = (path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n].replace(b'"shape":[64]', b'"shape":[Infinity]', 1)
    assert b"Infinity" in text
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


CHECKPOINT_CASES = {
    "header length 4 short": (_short_header_length, "model.safetensors"),
    "overlapping offsets": (_overlapping_offsets, "overlaps"),
    "NaN weight": (_nan_weight, "encoder.layers.0.mlp.fc1.bias"),
    "shard outside": (_shard_outside, "outside the checkpoint"),
    "weight_map list": (_weight_map_list, "weight_map"),
    "nested header": (_deep_header, "nested"),
    "Infinity shape": (_infinite_shape, "Infinity"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_lying_checkpoint_is_one_line(case, checkpoint, tmp_path, capsys):
    edit, culprit = CHECKPOINT_CASES[case]
    ckpt = copy_checkpoint(checkpoint, tmp_path / "ck", edit)
    code, _, err = run_cli(capsys, "convert", "-m", ckpt, "-o", tmp_path / "params")
    assert_one_error(code, err, culprit)
    assert not (tmp_path / "params").exists() and hidden_leftovers(tmp_path) == []


# ---- fuzz: mutated safetensors headers, each read in a forked child -------------------------------------

FUZZ_CASES = 300


def test_fuzzed_headers_never_crash_nor_pass_silently(checkpoint, tmp_path):
    """tests/safetensors_fuzz.py, in a small process of its own, forks one child per mutated file."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "safetensors_fuzz.py"), str(checkpoint / "model.safetensors"), str(FUZZ_CASES), "2026", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = json.loads(proc.stdout)
    assert len(outcomes) == FUZZ_CASES
    bad = [o for o in outcomes if o["verdict"] not in ("refused by both", "refused by us only", "read equal by both")]
    assert not bad, bad[:5]
    counts = {v: sum(o["verdict"] == v for o in outcomes) for v in ("refused by both", "read equal by both")}
    # The mutations reach both sides: most files are corrupt, some stay valid.
    assert counts["refused by both"] > FUZZ_CASES // 2 and counts["read equal by both"] > 0, counts


# ---- threads -----------------------------------------------------------------------------------------


def test_one_encoder_from_four_threads_equals_sequential(built):
    from mlc_vision.runtime.encoder import VisionEncoder

    lib, params, _ = built
    encoder = VisionEncoder(lib, params)
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((1 + i % 3, 3, 32, 32)).astype(np.float32) for i in range(24)]
    sequential = [encoder(x) for x in inputs]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(indices):
        try:
            start.wait()
            for i in indices:
                results[i] = encoder(inputs[i])
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=work, args=(range(t, len(inputs), 4),)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i, expected in enumerate(sequential):
        np.testing.assert_array_equal(results[i], expected)


# ---- kill -9 at every phase of a replacing convert and compile ---------------------------------------

def _killed_at(phase: str, argv: list, exchange: bool = True) -> None:
    """Run the CLI in a forked child told to SIGKILL itself at ``phase``; fail unless it died there.

    ``exchange=False`` takes the rename-aside path of filesystems without ``RENAME_EXCHANGE``.
    """
    pid = os.fork()
    if pid == 0:
        os.environ[atomic.TEST_DIE_AT_ENV] = phase
        if not exchange:
            atomic._exchange = lambda a, b: False
        try:
            main([str(a) for a in argv])
        finally:
            os._exit(99)  # reached only when the phase never came
    deadline = time.monotonic() + 300
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"the child killed at {phase} hung")
    assert os.WIFSIGNALED(done[1]) and os.WTERMSIG(done[1]) == signal.SIGKILL, f"not killed at {phase}: {done[1]}"


@pytest.fixture(scope="module")
def params_f16(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel-f16") / "params"
    assert main(["convert", "-m", str(checkpoint), "-o", str(out), "--dtype", "float16"]) == 0
    return out


CONVERT_KILLS = [("writing", True), ("after-swap", True), ("mid-swap", False)]
# Each compile case compiles twice (killed, then the next run): two phases run by default, all with --run-slow.
COMPILE_KILLS = [
    "writing",
    pytest.param("before-swap", marks=pytest.mark.slow),
    "mid-swap",
    pytest.param("after-swap", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("phase,exchange", CONVERT_KILLS)
def test_killed_convert_never_loses_the_params(phase, exchange, built, params_f16, checkpoint, tmp_path, capsys):
    _, params, _ = built
    out = tmp_path / "params"
    shutil.copytree(params, out)
    old = snapshot(out)
    new = {k.replace(params_f16.name, out.name, 1): v for k, v in snapshot(params_f16).items()}
    _killed_at(phase, ["convert", "-m", checkpoint, "-o", out, "--dtype", "float16"], exchange)
    atomic.recover(out)  # what the next run does first
    assert snapshot(out) in (old, new)
    assert main(["convert", "-m", str(checkpoint), "-o", str(out), "--dtype", "float16"]) == 0
    assert snapshot(out) == new
    assert hidden_leftovers(tmp_path) == []
    capsys.readouterr()


@pytest.mark.parametrize("phase", COMPILE_KILLS)
def test_killed_compile_never_loses_the_library_nor_splits_it_from_its_json(phase, built, checkpoint, tmp_path):
    lib, _, _ = built
    out = tmp_path / "clip.so"
    shutil.copy(lib, out)
    shutil.copy(f"{lib}.json", f"{out}.json")
    old_lib, old_json = out.read_bytes(), Path(f"{out}.json").read_bytes()
    _killed_at(phase, ["compile", "-m", checkpoint, "--select-layer", "-2", "-o", out])
    atomic.recover(out)
    atomic.recover(Path(f"{out}.json"))
    metadata = json.loads(Path(f"{out}.json").read_text())
    if metadata["select_layer"] == -1:
        assert (out.read_bytes(), Path(f"{out}.json").read_bytes()) == (old_lib, old_json)
    else:
        assert metadata["select_layer"] == -2 and out.read_bytes() != old_lib
    assert hidden_leftovers(tmp_path) == []
    assert main(["compile", "-m", str(checkpoint), "--select-layer", "-2", "-o", str(out)]) == 0
    assert json.loads(Path(f"{out}.json").read_text())["select_layer"] == -2
    assert hidden_leftovers(tmp_path) == []


def test_next_run_cleans_leftovers_of_dead_runs(built, tmp_path):
    lib, params, _ = built
    out = tmp_path / "params"
    shutil.copytree(params, out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".params.tmp-{pid}-0123abcd").mkdir()
    (tmp_path / f".params.old-{pid}-0123abcd").mkdir()
    (tmp_path / f".clip.so.tmp-{pid}-0123abcd.so").write_bytes(b"half")
    legacy = tmp_path / ".clip.so.89abcdef.partial.so"
    legacy.write_bytes(b"half")
    hour_ago = time.time() - 2 * atomic.STALE_WITHOUT_PID_S
    os.utime(legacy, (hour_ago, hour_ago))
    alive = tmp_path / f".params.tmp-{os.getppid()}-0123abcd"
    alive.mkdir()
    atomic.recover(out)
    atomic.recover(tmp_path / "clip.so")
    assert hidden_leftovers(tmp_path) == [alive.name]
    assert snapshot(out) == {k.replace(params.name, "params", 1): v for k, v in snapshot(params).items()}


def test_params_dir_modes_follow_the_umask(built, checkpoint, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["convert", "-m", str(checkpoint), "-o", str(tmp_path / "params")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "params").stat().st_mode & 0o777 == 0o755
