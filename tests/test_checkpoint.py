import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fourbit
from helpers import TinyLM


def quantized_model(tied=False, bias=True):
    model = TinyLM(tied=tied, bias=bias).eval()
    fourbit.quantize_(model, group_size=64)
    return model


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("tied", [False, True], ids=["separate", "tied"])
def test_round_trip_is_bit_exact_into_a_meta_model(tmp_path, tied):
    model = quantized_model(tied)
    path = tmp_path / "model.safetensors"
    assert fourbit.save_quantized(model, path) == [path]
    with torch.device("meta"):
        fresh = TinyLM(tied=tied, bias=True).eval()
    fourbit.load_quantized(fresh, path)
    assert not any(t.is_meta for t in fresh.state_dict().values())
    assert isinstance(fresh.layers[0].q_proj, fourbit.Int4Linear) and isinstance(fresh.lm_head, nn.Linear)
    assert_same_state(model, fresh)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(ids), fresh(ids))
    meta = json.loads(load_file_metadata(path)["quantized"])
    assert meta["layers.1.down_proj"] == dict(group_size=64, symmetric=False, in_features=352, out_features=128)


def load_file_metadata(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_sharded_round_trip(tmp_path):
    model = quantized_model()
    files = fourbit.save_quantized(model, tmp_path / "m.safetensors", max_shard_bytes=40_000)
    assert len(files) > 3 and files[-1].name == "m.safetensors.index.json"
    assert not (tmp_path / "m.safetensors").exists()
    fresh = TinyLM(bias=True)
    fourbit.load_quantized(fresh, tmp_path / "m.safetensors")
    assert_same_state(model, fresh)


def rewrite(path, drop=(), add=None, metadata=None):
    """Re-save a checkpoint with tensors dropped or added, or other metadata."""
    tensors = load_file(str(path))
    meta = dict(load_file_metadata(path), **(metadata or {}))
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    save_file(tensors, str(path), metadata=meta)


def assert_untouched(model):
    assert isinstance(model.layers[0].q_proj, nn.Linear) and model.layers[0].q_proj.weight.is_meta


@pytest.mark.parametrize("damage,message", [
    (dict(drop=["layers.0.q_proj.scales"]), "missing tensors.*layers.0.q_proj.scales"),
    (dict(drop=["norm.weight"]), "missing tensors.*norm.weight"),
    (dict(add={"layers.9.extra": torch.ones(3)}), "unexpected tensors.*layers.9.extra"),
    (dict(metadata={"format_version": "99"}), "format version '99'"),
    (dict(metadata={"format": "gguf"}), "not a fourbit checkpoint"),
    (dict(metadata={"quantized": json.dumps({"layers.7.q_proj": dict(
        group_size=64, symmetric=False, in_features=128, out_features=128)})}), "does not have"),
])
def test_bad_checkpoints_raise_and_leave_the_model_untouched(tmp_path, damage, message):
    path = tmp_path / "model.safetensors"
    fourbit.save_quantized(quantized_model(), path)
    rewrite(path, **damage)
    with torch.device("meta"):
        fresh = TinyLM(bias=True)
    with pytest.raises(ValueError, match=message):
        fourbit.load_quantized(fresh, path)
    assert_untouched(fresh)


def test_wrong_shape_raises(tmp_path):
    path = tmp_path / "model.safetensors"
    model = quantized_model()
    model.norm.weight = nn.Parameter(torch.ones(64))
    fourbit.save_quantized(model, path)
    with torch.device("meta"):
        fresh = TinyLM(bias=True)
    with pytest.raises(ValueError, match="norm.weight"):
        fourbit.load_quantized(fresh, path)
    assert_untouched(fresh)


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.001], ids=["tail", "half", "header"])
def test_truncated_file_raises_and_leaves_the_model_untouched(tmp_path, keep):
    path = tmp_path / "model.safetensors"
    fourbit.save_quantized(quantized_model(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with torch.device("meta"):
        fresh = TinyLM(bias=True)
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint|could not read"):
        fourbit.load_quantized(fresh, path)
    assert_untouched(fresh)


def test_missing_file_and_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        fourbit.load_quantized(TinyLM(), tmp_path / "nothing.safetensors")
    with pytest.raises(ValueError, match=".safetensors"):
        fourbit.save_quantized(TinyLM(), tmp_path / "model.bin")


def test_failed_save_leaves_the_previous_file(tmp_path):
    path = tmp_path / "model.safetensors"
    fourbit.save_quantized(quantized_model(), path)
    before = path.read_bytes()
    with torch.device("meta"):
        broken = TinyLM()
    with pytest.raises(ValueError, match="meta"):
        fourbit.save_quantized(broken, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
