import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

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
    assert meta["layers.1.down_proj"] == dict(group_size=64, symmetric=False, act_order=False, in_features=352,
                                              out_features=128)


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


# -- atomic saves ------------------------------------------------------------------------

SINGLE, SHARDED, FEWER_SHARDS = {}, dict(max_shard_bytes=40_000), dict(max_shard_bytes=150_000)


def snapshot(directory):
    """{file name: bytes} of everything in directory, hidden temporaries included."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def load_fresh(path):
    with torch.device("meta"):
        fresh = TinyLM(bias=True)
    return fourbit.load_quantized(fresh, path)


def fail_on_write(monkeypatch, call, error):
    """Make the call-th safetensors write stop half-way through its file and raise error."""
    import fourbit.checkpoint as checkpoint
    real, calls = checkpoint.save_file, []

    def save_file_failing(tensors, filename, metadata=None):
        calls.append(filename)
        real(tensors, filename, metadata=metadata)
        if len(calls) == call:
            with open(filename, "r+b") as f:
                f.truncate(len(f.read()) // 2)
            raise error()
    monkeypatch.setattr(checkpoint, "save_file", save_file_failing)
    return calls


@pytest.mark.parametrize("previous", [SINGLE, SHARDED], ids=["previous-single", "previous-sharded"])
@pytest.mark.parametrize("error", [
    lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), KeyboardInterrupt,
    lambda: RuntimeError("serializer failed"),
], ids=["disk-full", "interrupted", "error"])
def test_a_save_failing_on_shard_2_leaves_the_previous_checkpoint(tmp_path, monkeypatch, previous, error):
    path = tmp_path / "m.safetensors"
    old = quantized_model()
    fourbit.save_quantized(old, path, **previous)
    before = snapshot(tmp_path)
    calls = fail_on_write(monkeypatch, 2, error)
    with pytest.raises(type(error())):
        fourbit.save_quantized(quantized_model(), path, **SHARDED)
    assert len(calls) == 2
    assert snapshot(tmp_path) == before  # bit-identical; no new shard, no temporary left
    assert_same_state(old, load_fresh(path))


@pytest.mark.parametrize("first,second", [(SINGLE, SHARDED), (SHARDED, SINGLE), (SHARDED, FEWER_SHARDS)],
                         ids=["single-to-sharded", "sharded-to-single", "more-to-fewer-shards"])
def test_a_resave_in_another_layout_loads_the_new_model_and_leaves_no_stale_files(tmp_path, first, second):
    path = tmp_path / "m.safetensors"
    fourbit.save_quantized(quantized_model(), path, **first)
    new = quantized_model()
    files = fourbit.save_quantized(new, path, **second)
    assert (len(files) > 1) == bool(second)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)
    assert_same_state(new, load_fresh(path))


KILLED_SAVE = """
import sys, time
import torch
sys.path.insert(0, sys.argv[2])
import fourbit
import fourbit.checkpoint as checkpoint
from helpers import TinyLM

model = TinyLM(bias=True).eval()
fourbit.quantize_(model, group_size=64)
real, calls = checkpoint.save_file, []

def save_file_stalling(tensors, filename, metadata=None):
    calls.append(filename)
    real(tensors, filename, metadata=metadata)
    if len(calls) == 2:  # half of shard 2 is on disk: the process dies here
        with open(filename, "r+b") as f:
            f.truncate(len(f.read()) // 2)
        print("writing", flush=True)
        time.sleep(600)

checkpoint.save_file = save_file_stalling
fourbit.save_quantized(model, sys.argv[1], max_shard_bytes=40_000)
"""


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_and_the_next_save_cleans_up(tmp_path):
    directory = tmp_path / "ckpt"
    path = directory / "m.safetensors"
    old = quantized_model()
    fourbit.save_quantized(old, path, **SHARDED)
    before = snapshot(directory)
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path), str(Path(__file__).parent)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    after = snapshot(directory)
    assert {name: after.get(name) for name in before} == before  # the old files, bit-identical
    assert any(name.endswith(f".tmp-{child.pid}") for name in after)  # the kill left its temporary
    assert_same_state(old, load_fresh(path))

    new = quantized_model()
    files = fourbit.save_quantized(new, path, **SHARDED)
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in files)
    assert_same_state(new, load_fresh(path))


def test_save_model_never_leaves_a_half_written_config(tmp_path, monkeypatch):
    from fourbit.models.loader import build_model
    from fourbit.models.random_weights import RandomCheckpoint
    config = fourbit.models.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2,
                                        num_heads=4, num_kv_heads=2)
    model = build_model(RandomCheckpoint(config, seed=int(torch.randint(1 << 30, ()))), "cpu", torch.float32,
                        dict(group_size=32))
    directory = fourbit.save_model(model, tmp_path / "out")
    config_before = (directory / "config.json").read_bytes()
    real = Path.write_text

    def write_text_failing(self, text, *args, **kwargs):
        if "config.json" in self.name:  # the disk fills half-way through the config
            real(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, text, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", write_text_failing)
    with pytest.raises(OSError, match="No space left"):
        fourbit.save_model(model, directory)
    monkeypatch.undo()
    assert (directory / "config.json").read_bytes() == config_before
    assert not [p.name for p in directory.iterdir() if ".tmp-" in p.name]
    again = fourbit.load_model(directory, device="cpu")
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


@pytest.mark.parametrize("max_shard_bytes", [0, -1, "4GB", 1.5e9])
def test_a_bad_shard_size_raises(tmp_path, max_shard_bytes):
    with pytest.raises(ValueError, match="max_shard_bytes must be a positive int"):
        fourbit.save_quantized(quantized_model(), tmp_path / "m.safetensors", max_shard_bytes=max_shard_bytes)
    assert not list(tmp_path.iterdir())


# -- load checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("changes,message", [
    ({"layers.0.q_proj.qweight": torch.int64}, "tensor 'layers.0.q_proj.qweight' is torch.int64"),
    ({"layers.1.down_proj.qweight": torch.uint8}, "tensor 'layers.1.down_proj.qweight' is torch.uint8"),
    ({"layers.0.k_proj.scales": torch.float64}, "tensor 'layers.0.k_proj.scales' is torch.float64"),
    ({"layers.0.k_proj.scales": torch.float64, "layers.0.k_proj.offsets": torch.float64},
     "tensor 'layers.0.k_proj.scales' is torch.float64"),
    ({"layers.1.v_proj.offsets": torch.float64}, "tensor 'layers.1.v_proj.offsets' is torch.float64"),
    ({"layers.1.up_proj.offsets": torch.int32}, "tensor 'layers.1.up_proj.offsets' is torch.int32"),
], ids=["qweight-int64", "qweight-uint8", "scales-fp64", "scales-and-offsets-fp64", "offsets-fp64", "offsets-int32"])
def test_wrong_int4_dtypes_raise_naming_the_tensor(tmp_path, changes, message):
    path = tmp_path / "model.safetensors"
    fourbit.save_quantized(quantized_model(), path)
    tensors = load_file(str(path))
    rewrite(path, add={n: tensors[n].to(dtype) for n, dtype in changes.items()})
    with torch.device("meta"):
        fresh = TinyLM(bias=True)
    with pytest.raises(ValueError, match=re.escape(message)):
        fourbit.load_quantized(fresh, path)
    assert_untouched(fresh)


def mix_in_a_shard_of_another_save(path, tmp_path):
    other = tmp_path / "other" / "m.safetensors"
    theirs = fourbit.save_quantized(quantized_model(), other, **SHARDED)
    ours = json.loads(path.with_name(path.name + ".index.json").read_text())["weight_map"]
    shard = sorted(set(ours.values()))[1]
    (path.parent / shard).write_bytes(theirs[1].read_bytes())


def point_a_tensor_at_the_wrong_shard(path, tmp_path):
    index = path.with_name(path.name + ".index.json")
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    data["weight_map"]["norm.weight"] = next(s for s in shards if s != data["weight_map"]["norm.weight"])
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("damage,message", [
    (mix_in_a_shard_of_another_save, "mixes two saves"),
    (point_a_tensor_at_the_wrong_shard, r"tensors \['norm.weight'\] in .*which does not hold them"),
], ids=["shard-of-another-save", "tensor-in-the-wrong-shard"])
def test_bad_sharded_checkpoints_raise_and_leave_the_model_untouched(tmp_path, damage, message):
    path = tmp_path / "m.safetensors"
    fourbit.save_quantized(quantized_model(), path, **SHARDED)
    damage(path, tmp_path)
    with torch.device("meta"):
        fresh = TinyLM(bias=True)
    with pytest.raises(ValueError, match=message):
        fourbit.load_quantized(fresh, path)
    assert_untouched(fresh)
