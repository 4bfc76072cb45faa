"""weights/: sources, lazy readers, the params dir (read back by TVM's own
loaders) and convert, with random-init checkpoints saved by transformers."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import tvm
from safetensors.numpy import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from mlc_vision.config import Tiling
from mlc_vision.errors import MlcVisionError
from mlc_vision.weights.convert import convert
from mlc_vision.weights.params import ParamsWriter, load_params, read_params, write_params
from mlc_vision.weights.reader import iter_tensors
from mlc_vision.checkpoint.layouts import load_hf_config, outer_options
from mlc_vision.checkpoint.source import resolve_source

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=32, patch_size=8, projection_dim=16,
)


def _save(model: torch.nn.Module, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return _save(CLIPVisionModel(CLIPVisionConfig(**TINY)), tmp_path_factory.mktemp("clip"))


def _state(ckpt: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint dir, with the CLIP prefix stripped (our names)."""
    out = {}
    for entry in iter_tensors(sorted(ckpt.glob("*.safetensors"))):
        out[entry.key.removeprefix("vision_model.")] = entry.load()
    return out


def _tvm_load(params_dir: Path, names: list[str]) -> list[np.ndarray]:
    """Values as the C++ runtime sees them: vm.builtin.tensor_cache.load + param_array_from_cache_by_name."""
    tvm.get_global_func("vm.builtin.tensor_cache.clear")()
    tvm.get_global_func("vm.builtin.tensor_cache.load")(str(params_dir), tvm.cpu().dlpack_device_type(), 0)
    arrays = tvm.get_global_func("vm.builtin.param_array_from_cache_by_name")(names)
    out = [a.numpy() for a in arrays]
    tvm.get_global_func("vm.builtin.tensor_cache.clear")()
    return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality (works for bf16, where numpy's == would go through float)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# ---- params dir --------------------------------------------------------------------------


def test_params_round_trip_through_tvm_loaders(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.f16": rng.standard_normal((7,)).astype(np.float16),
        "c.bf16": rng.standard_normal((4, 4)).astype(ml_dtypes.bfloat16),
        "d.big": rng.standard_normal((300,)).astype(np.float32),  # over the cap: its own shard
    }
    with ParamsWriter(tmp_path / "p", shard_cap_bytes=512) as writer:
        for name, array in tensors.items():
            writer.add(name, array)
        out = writer.finish({"mlc_vision": {"family": "test"}})
    cache = json.loads((out / "tensor-cache.json").read_text())
    assert len(cache["records"]) >= 2 and all(s["format"] == "raw-shard" for s in cache["records"])
    records, meta = read_params(out)
    assert meta == {"mlc_vision": {"family": "test"}}
    assert records["c.bf16"].dtype == "bfloat16" and records["c.bf16"].nbytes == 32

    names = list(tensors)
    for name, got in zip(names, _tvm_load(out, names)):
        assert _same(got, tensors[name]), name
    from tvm.contrib.tvmjs import load_tensor_cache

    js, _ = load_tensor_cache(str(out), tvm.cpu())
    for name in names:
        assert _same(js[name].numpy(), tensors[name]), name
    for name, got in zip(names, load_params(out, names, tvm.cpu())):
        assert _same(got.numpy(), tensors[name]), name


def test_load_params_checks_name_shape_dtype(tmp_path):
    out = write_params(tmp_path / "p", [("w", np.zeros((2, 3), np.float16))], {})
    with pytest.raises(MlcVisionError, match="no parameter 'nope'"):
        load_params(out, ["w", "nope"], tvm.cpu())
    with pytest.raises(MlcVisionError, match=r"'w'.*shape \[2, 3\], expected \[3, 2\]"):
        load_params(out, [("w", [3, 2], "float16")], tvm.cpu())
    with pytest.raises(MlcVisionError, match=r"'w'.*dtype float16, expected float32"):
        load_params(out, [{"name": "w", "shape": [2, 3], "dtype": "float32"}], tvm.cpu())
    with pytest.raises(MlcVisionError, match="not a params dir"):
        read_params(tmp_path)


def test_writer_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ParamsWriter(tmp_path / "p") as writer:
            writer.add("w", np.zeros(3, np.float32))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_output_replaces_params_dir_but_not_other_dirs(tmp_path, clip_ckpt):
    out = tmp_path / "p"
    write_params(out, [("old", np.zeros(1, np.float32))], {})
    convert(clip_ckpt, out)
    assert "old" not in read_params(out)[0]
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(MlcVisionError, match="not a params dir"):
        convert(clip_ckpt, other)
    assert (other / "keep.txt").read_text() == "x" and not _leftovers(tmp_path)


# ---- convert --------------------------------------------------------------------------


def test_convert_clip_values_and_metadata(tmp_path, clip_ckpt):
    out = convert(clip_ckpt, tmp_path / "p")
    records, meta = read_params(out)
    state = _state(clip_ckpt)
    state.pop("embeddings.position_ids", None)
    assert set(records) == set(state)  # CLIPVisionModel: no visual_projection expected
    names = sorted(state)
    for name, got in zip(names, _tvm_load(out, names)):
        assert _same(got, state[name]), name
    info = meta["mlc_vision"]
    assert info["family"] == "clip" and info["dtype"] == "float32" and info["source"] == str(clip_ckpt)
    assert info["config"]["hidden_size"] == 32 and info["config"]["projection_dim"] is None


def test_convert_with_projection(tmp_path):
    torch.manual_seed(1)
    ckpt = _save(CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY)), tmp_path / "ckpt")
    records, meta = read_params(convert(ckpt, tmp_path / "p"))
    assert records["visual_projection.weight"].shape == (16, 32)
    assert meta["mlc_vision"]["config"]["projection_dim"] == 16


@pytest.mark.parametrize("saved, asked, stored", [
    (torch.bfloat16, None, "bfloat16"),
    (torch.float16, None, "float16"),
    (torch.float32, "bfloat16", "bfloat16"),
    (torch.float32, "float16", "float16"),
    (torch.bfloat16, "float32", "float32"),
])
def test_convert_dtypes(tmp_path, saved, asked, stored):
    torch.manual_seed(2)
    ckpt = _save(CLIPVisionModel(CLIPVisionConfig(**TINY)).to(saved), tmp_path / "ckpt")
    out = convert(ckpt, tmp_path / "p", dtype=asked)
    records, meta = read_params(out)
    assert meta["mlc_vision"]["dtype"] == stored
    assert {r.dtype for r in records.values()} == {stored}
    name = "encoder.layers.1.mlp.fc1.weight"
    want = _state(ckpt)[name].astype(np.float32).astype(records[name].read().dtype)
    assert _same(_tvm_load(out, [name])[0], want)


def test_convert_sharded_with_index(tmp_path, clip_ckpt):
    torch.manual_seed(3)
    ckpt = _save(CLIPVisionModel(CLIPVisionConfig(**TINY)), tmp_path / "ckpt", max_shard_size="20KB")
    assert (ckpt / "model.safetensors.index.json").is_file() and len(list(ckpt.glob("*.safetensors"))) > 2
    out = convert(ckpt, tmp_path / "p")
    state = _state(ckpt)
    for name, rec in read_params(out)[0].items():
        assert _same(rec.read(), state[name]), name


def test_convert_pytorch_bin(tmp_path, clip_ckpt):
    ckpt = tmp_path / "bin"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((clip_ckpt / "config.json").read_text())
    state = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in load_file(clip_ckpt / "model.safetensors").items()}
    torch.save(state, ckpt / "pytorch_model.bin")
    records, meta = read_params(convert(ckpt, tmp_path / "p"))
    assert meta["mlc_vision"]["dtype"] == "bfloat16"
    want = state["encoder.layers.0.self_attn.q_proj.weight"].view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    assert _same(records["encoder.layers.0.self_attn.q_proj.weight"].read(), want)


def test_safetensors_preferred_over_bin_index(tmp_path, clip_ckpt):
    """A checkpoint with both a .bin shard index and model.safetensors is read from the safetensors."""
    ckpt = tmp_path / "both"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors"):
        (ckpt / name).write_bytes((clip_ckpt / name).read_bytes())
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "pytorch_model-1.bin"}}))
    assert [p.name for p in resolve_source(ckpt).weight_files()] == ["model.safetensors"]
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(MlcVisionError, match="missing"):  # now the .bin index is the one read
        resolve_source(ckpt).weight_files()


def _llava_checkpoint(root: Path, clip_ckpt: Path) -> Path:
    """A transformers-Llava-shaped checkpoint: tower + projector in one shard, the LLM in another."""
    root.mkdir()
    vision = json.loads((clip_ckpt / "config.json").read_text())
    vision.pop("architectures", None)
    vision.pop("model_type", None)  # composite configs may omit it: load_hf_config fills it
    config = {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": vision, "text_config": {"model_type": "llama", "hidden_size": 48},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    }
    (root / "config.json").write_text(json.dumps(config))
    tower = {f"model.vision_tower.vision_model.{k}": v for k, v in load_file(clip_ckpt / "model.safetensors").items()}
    rng = np.random.default_rng(5)
    for name, shape in {"linear_1.weight": (48, 32), "linear_1.bias": (48,), "linear_2.weight": (48, 48),
                        "linear_2.bias": (48,)}.items():
        tower[f"multi_modal_projector.{name}"] = rng.standard_normal(shape).astype(np.float32)
    save_file(tower, root / "model-00001-of-00002.safetensors")
    # The language model's shard is garbage: converting must never open it.
    (root / "model-00002-of-00002.safetensors").write_bytes(b"\xff" * 64)
    weight_map = {k: "model-00001-of-00002.safetensors" for k in tower}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in
                       ("model.language_model.embed_tokens.weight", "lm_head.weight")})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def test_convert_llava_reads_only_the_tower(tmp_path, clip_ckpt):
    ckpt = _llava_checkpoint(tmp_path / "llava", clip_ckpt)
    vision, full = load_hf_config(ckpt)
    assert vision["model_type"] == "clip_vision_model" and full["model_type"] == "llava"
    assert outer_options(full) == {
        "select_layer": -2, "feature": "patch", "projector": "mlp2x_gelu", "projector_hidden_size": 48,
    }
    assert resolve_source(ckpt).weight_files(lambda k: not k.startswith(("lm_head", "model.language"))) == [
        ckpt / "model-00001-of-00002.safetensors"
    ]
    records, meta = read_params(convert(ckpt, tmp_path / "p", projector=False))
    assert "embeddings.class_embedding" in records and not any("projector" in n for n in records)
    assert meta["mlc_vision"]["config"]["select_layer"] == -2
    assert meta["mlc_vision"]["config"]["projector"] is None


def test_convert_llava_with_projector(tmp_path, clip_ckpt):
    ckpt = _llava_checkpoint(tmp_path / "llava", clip_ckpt)
    records, meta = read_params(convert(ckpt, tmp_path / "p"))
    state = load_file(ckpt / "model-00001-of-00002.safetensors")
    assert _same(records["projector.linear_2.weight"].read(), state["multi_modal_projector.linear_2.weight"])
    assert _same(records["encoder.layers.1.mlp.fc2.weight"].read(),
                 state["model.vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight"])
    config = meta["mlc_vision"]["config"]
    assert (config["projector"], config["projector_hidden_size"], config["projection_dim"]) == ("mlp2x_gelu", 48, None)


@pytest.mark.parametrize("model_type, vision_type", [
    ("clip", "clip_vision_model"), ("siglip", "siglip_vision_model"), ("internvl_chat", "intern_vit_6b"),
])
def test_load_hf_config_composites(tmp_path, model_type, vision_type):
    full = {"model_type": model_type, "vision_config": {"hidden_size": 8}}
    if model_type == "clip":
        full["projection_dim"] = 24  # CLIPModel's width wins over the nested config's stale default
    if model_type == "internvl_chat":
        full.update(select_layer=-1, downsample_ratio=0.5, llm_config={"hidden_size": 20}, ps_version="v2")
    (tmp_path / "config.json").write_text(json.dumps(full))
    vision, got_full = load_hf_config(tmp_path)
    inherited = {"projection_dim": 24} if model_type == "clip" else {}
    assert vision == {"hidden_size": 8, "model_type": vision_type, **inherited} and got_full == full
    if model_type == "internvl_chat":
        assert outer_options(full) == {
            "select_layer": -1, "downsample_ratio": 0.5, "projector": "mlp1", "projector_hidden_size": 20,
            "tiling": Tiling("internvl", min_tiles=1, max_tiles=12, thumbnail=True),  # InternVL's defaults
        }


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MlcVisionError, match="cannot fetch 'nobody-xyz/no-such-model'.*HF_HUB_OFFLINE") as err:
        resolve_source("nobody-xyz/no-such-model")
    assert "\n" not in str(err.value)


# ---- bad inputs: one line naming the culprit, nothing at -o ----------------------------------


def _edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def _truncate(src: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    data = (src / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) - 1000])
    return dst


def _set_config(src: Path, dst: Path, **fields) -> Path:
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config.update(fields)
    (dst / "config.json").write_text(json.dumps(config))
    os.symlink(src / "model.safetensors", dst / "model.safetensors")
    return dst


def _mixed(tensors):
    tensors["embeddings.class_embedding"] = tensors["embeddings.class_embedding"].astype(np.float16)


BAD_INPUTS = {
    "missing dir": (lambda src, dst: dst / "nope", r"does not exist"),
    "not a dir": (lambda src, dst: src / "config.json", r"is not a directory"),
    "no config.json": (lambda src, dst: (dst.mkdir(), dst)[1], r"no config\.json in"),
    "unknown family": (lambda src, dst: _set_config(src, dst, model_type="bert", architectures=["BertModel"]),
                       r"unsupported model \(model_type='bert'"),
    "missing key": (lambda src, dst: _edit_checkpoint(src, dst, lambda t: t.pop("encoder.layers.1.mlp.fc2.bias")),
                    r"lacks 1 parameter.*encoder\.layers\.1\.mlp\.fc2\.bias"),
    "extra key": (lambda src, dst: _edit_checkpoint(
        src, dst, lambda t: t.update({"encoder.layers.1.extra.weight": np.zeros(2, np.float32)})),
        r"unexpected key 'encoder\.layers\.1\.extra\.weight' in model\.safetensors"),
    "wrong shape": (lambda src, dst: _edit_checkpoint(
        src, dst, lambda t: t.update({"encoder.layers.0.mlp.fc1.bias": np.zeros(65, np.float32)})),
        r"shape mismatch for key 'encoder\.layers\.0\.mlp\.fc1\.bias' in model\.safetensors: "
        r"expected \[64\], got \[65\]"),
    "truncated safetensors": (_truncate, r"truncated safetensors file .*model\.safetensors"),
    "mixed dtypes": (lambda src, dst: _edit_checkpoint(src, dst, _mixed), r"mixes dtypes float16 \(1 keys"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(tmp_path, clip_ckpt, case):
    make, message = BAD_INPUTS[case]
    source = make(clip_ckpt, tmp_path / "ckpt")
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    with pytest.raises(MlcVisionError, match=message) as err:
        convert(source, out_parent / "params")
    assert "\n" not in str(err.value)
    assert list(out_parent.iterdir()) == []


def test_lossy_cast_needs_dtype(tmp_path):
    torch.manual_seed(4)
    ckpt = _save(CLIPVisionModel(CLIPVisionConfig(**TINY)), tmp_path / "ckpt")
    big = _edit_checkpoint(ckpt, tmp_path / "big", lambda t: t["embeddings.class_embedding"].__setitem__(0, 1e6))
    with pytest.raises(MlcVisionError, match=r"'embeddings\.class_embedding' .* overflows float16"):
        convert(big, tmp_path / "p", dtype="float16")
    assert not (tmp_path / "p").exists() and not _leftovers(tmp_path)


def test_corrupt_header_is_one_line(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(MlcVisionError, match=r"corrupt or truncated safetensors file .*x\.safetensors"):
        list(iter_tensors([path]))


# ---- hub ids ------------------------------------------------------------------------------


def test_hub_fetches_config_then_only_needed_shards(tmp_path, clip_ckpt, monkeypatch):
    """A hub id downloads config/index first, then only the tower's shard, never the LLM's."""
    import huggingface_hub

    snapshot = _llava_checkpoint(tmp_path / "snapshot", clip_ckpt)
    calls = []

    def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=None, local_files_only=False, **_):
        calls.append((repo_id, sorted(allow_patterns)))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = convert("someone/tiny-llava", tmp_path / "p", projector=False)
    assert calls == [
        ("someone/tiny-llava", sorted(["config.json", "preprocessor_config.json", "*.safetensors.index.json",
                                       "pytorch_model*.bin.index.json"])),
        ("someone/tiny-llava", ["model-00001-of-00002.safetensors"]),
    ]
    assert read_params(out)[1]["mlc_vision"]["source"] == "hf://someone/tiny-llava"


def test_hub_offline_uses_the_cache(tmp_path, clip_ckpt, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someone--tiny-clip"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((clip_ckpt / name).read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    records, meta = read_params(convert("someone/tiny-clip", tmp_path / "p"))
    assert "encoder.layers.1.mlp.fc2.weight" in records and meta["mlc_vision"]["source"] == "hf://someone/tiny-clip"
