"""``mlc-vision bench`` rows beyond batches: InternVL dynamic tiles (``--tiles``) and the image sizes
of native-resolution towers (``--native-size``), on tiny presets. No timing assertions."""

from __future__ import annotations

import json

import pytest

import mlc_vision.config as config_module
from mlc_vision import bench
from mlc_vision.cli import main
from mlc_vision.errors import MlcVisionError


def tiny_preset(monkeypatch, tmp_path, source: str, name: str, **fields) -> str:
    """A presets dir holding one preset: ``source`` with ``fields`` replaced."""
    preset = json.loads((config_module.PRESET_DIR / f"{source}.json").read_text())
    preset.update(fields)
    presets = tmp_path / "presets"
    presets.mkdir(exist_ok=True)
    (presets / f"{name}.json").write_text(json.dumps(preset))
    monkeypatch.setattr(config_module, "PRESET_DIR", presets)
    return name


def test_percent_of_peak_divides_by_the_best_probe_reading():
    """A row carries the FMA probe's readings around its calls; its % of peak takes the best of them and
    the run's first reading, so a slow first reading does not put rows over 100 %."""
    config = config_module.load_preset("clip-vit-base-patch16")
    ms = {"tvm": 100.0, "eager": 120.0}
    row = bench._make_row("clip-vit-base-patch16", config, 1, ms, None, None, 1.0, 100.0, [], (150.0, 120.0))
    assert (row.probe_before_gflops, row.probe_after_gflops) == (150.0, 120.0)
    assert row.pct_peak == pytest.approx(100 * row.tvm_gflops_per_s / 150.0, abs=0.1)
    unprobed = bench._make_row("clip-vit-base-patch16", config, 1, ms, None, None, 1.0, 100.0, [])
    assert unprobed.pct_peak == pytest.approx(100 * unprobed.tvm_gflops_per_s / 100.0, abs=0.1)
    machine = {"cpu": "test", "isa": [], "cores": 2, "ghz": 2.0, "fp32_flops_per_cycle": 32, "fp32_peak_gflops": 128.0}
    assert "| 150 / 120 |" in bench.markdown_table([row], machine, 3)
    assert "| n/a / n/a |" in bench.markdown_table([unprobed], machine, 3)


@pytest.mark.parametrize("count, grid", [(1, (1, 1)), (6, (2, 3)), (7, (1, 7)), (12, (3, 4))])
def test_tile_grid_is_the_squarest(count, grid):
    assert bench.tile_grid(count) == grid


def test_bench_tiles_row(monkeypatch, tmp_path, capsys):
    """``--tiles 6``: one image cut 2 x 3 plus the thumbnail, the whole encode_tiles against transformers."""
    pre = json.loads((config_module.PRESET_DIR / "internvit-300m-448px.json").read_text())["preprocess"]
    name = tiny_preset(
        monkeypatch, tmp_path, "internvit-300m-448px", "tiny-internvit", hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, image_size=28, preprocess=dict(pre, size=28),
    )  # fmt: skip
    out = tmp_path / "out"
    assert main(["bench", "-m", name, "--tiles", "6", "--runs", "2", "--no-peers", "--no-bf16", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("CPU: ")  # the machine header, as every table
    report = json.loads((out / "bench-tiles.json").read_text())
    (row,) = report["rows"]
    assert (row["image"], row["grid"], row["tiles"], row["tokens"]) == ("56x84", "2x3", 7, 7 * 4)
    assert row["tvm_ms"] > 0 and row["torch_eager_ms"] > 0
    table = (out / "bench-tiles.md").read_text()
    assert table.startswith("CPU: ") and f"| {name} | 56x84 | 2x3 | 7 |" in table
    assert not (out / "bench.json").exists() or json.loads((out / "bench.json").read_text())["rows"] == []


def test_native_size_option(monkeypatch, tmp_path):
    name = tiny_preset(
        monkeypatch, tmp_path, "qwen2.5-vl-7b-vision", "tiny-qwen", hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=2, merger_hidden_size=24, fullatt_block_indexes=[1],
    )  # fmt: skip
    out = tmp_path / "out"
    assert main(["bench", "-m", name, "--native-size", "56x84", "--runs", "1", "--no-bf16", "-o", str(out)]) == 0
    report = json.loads((out / "bench-native.json").read_text())
    assert [(r["image"], r["tokens"]) for r in report["rows"]] == [("56x84", 6)]


@pytest.mark.parametrize("text", ["448", "448x", "axb", "0x28", "28x28x3"])
def test_bad_native_size_is_one_line(text):
    with pytest.raises(MlcVisionError, match="expected HEIGHTxWIDTH"):
        bench.parse_image_size(text)


def test_native_size_not_a_multiple_is_one_line(monkeypatch, tmp_path, capsys):
    name = tiny_preset(monkeypatch, tmp_path, "qwen2.5-vl-7b-vision", "tiny-qwen", num_hidden_layers=1,
                       fullatt_block_indexes=[0])  # fmt: skip
    assert main(["bench", "-m", name, "--native-size", "50x56", "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: image size 50x56: both sides must be multiples of 28") and "\n" not in err
