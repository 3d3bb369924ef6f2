"""Format version 2: what exact imports need (format.py). Scales and offsets of different
dtypes (fp16 s with fp32 m = -z * s, the GPTQ / AWQ / compressed-tensors zero point), and an
act-order permutation of the input channels, on every backend, through checkpoints and the
loader's fused projections."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import fourbit
from conftest import backend_cases, need
from fourbit.format import Int4Weight, pack_int4, padded_k
from fourbit.models import loader
from helpers import TinyLM, assert_matmul_accuracy


def zero_point_weight(n, k, group_size, scale_dtype=torch.float16, perm=None):
    """An integer-zero-point weight as GPTQ stores it, w = (q - z) * s with fp16 s and
    z in [0, 15], as an Int4Weight with fp32 offsets m = -z * s; and its exact fp64 matrix
    [n, k] in input-channel order, computed here from q, z and s."""
    k_pad = padded_k(k, group_size)
    glen = k_pad if group_size == -1 else group_size
    q = torch.randint(0, 16, (n, k_pad))
    q[:, k:] = 0
    s = (torch.rand(n, k_pad // glen) * 0.02 + 0.001).to(scale_dtype)
    z = torch.randint(0, 16, (n, k_pad // glen))
    offsets = -z.to(torch.float32) * s.to(torch.float32)  # exact: 11 or 8 bits times 4 bits
    weight = Int4Weight(pack_int4(q), s, offsets, group_size, (n, k), perm=perm)
    stored = ((q - z.repeat_interleave(glen, 1)).double() * s.double().repeat_interleave(glen, 1))[:, :k]
    dense = stored if perm is None else torch.empty_like(stored).index_copy_(1, perm.long(), stored)
    return weight, dense


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp32_offsets_hold_zero_points_exactly_where_16_bits_do_not(scale_dtype):
    weight, dense = zero_point_weight(64, 256, 32, scale_dtype)
    assert torch.equal(weight.dequantize(), dense.float())
    rounded = Int4Weight(weight.qweight, weight.scales, weight.offsets.to(scale_dtype), 32, (64, 256))
    assert not torch.equal(rounded.dequantize(), dense.float())  # why the format grew


@pytest.mark.parametrize("device,backend", backend_cases("int4_mm"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_mixed_dtypes_and_act_order_on_every_backend(act_order, dtype, device, backend):
    need(device, backend)
    n, k, m = 48, 200, 3  # K not a multiple of the group: a short last group, as GPTQ writes it
    perm = torch.randperm(k) if act_order else None
    weight, dense = zero_point_weight(n, k, 64, perm=perm)
    layer = fourbit.Int4Linear(k, n, bias=False, group_size=64, act_order=act_order, backend=backend)
    layer.load_weight(weight.to(device))
    x = torch.randn(m, k, device=device).to(dtype)
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernel takes 16-bit activations (test_ops checks its refusal)")
    out = layer(x)
    assert_matmul_accuracy(out, x, dense.to(device))
    assert torch.equal(layer.weight.dequantize().cpu(), dense.float())


def test_act_order_layer_equals_its_float_original():
    """perm really reorders K: the same words without it give another product."""
    k = 128
    perm = torch.randperm(k)
    weight, dense = zero_point_weight(32, k, 32, perm=perm)
    x = torch.randn(2, k)
    permuted = fourbit.Int4Linear(k, 32, bias=False, group_size=32, act_order=True)
    permuted.load_weight(weight)
    plain = fourbit.Int4Linear(k, 32, bias=False, group_size=32)
    plain.load_weight(Int4Weight(weight.qweight, weight.scales, weight.offsets, 32, (32, k)))
    assert_matmul_accuracy(permuted(x), x, dense)
    assert not torch.allclose(plain(x), permuted(x), atol=1e-3)


class PermutedTinyLM(TinyLM):
    """TinyLM whose first q_proj is an act-order int4 layer with fp32 offsets."""

    def __init__(self, perm=None, **kw):
        super().__init__(**kw)
        k = self.layers[0].q_proj.in_features
        self.layers[0].q_proj = fourbit.Int4Linear(k, self.layers[0].q_proj.out_features, bias=True, group_size=32,
                                                   act_order=True)
        if perm is not None:
            weight, _ = zero_point_weight(self.layers[0].q_proj.out_features, k, 32, perm=perm)
            self.layers[0].q_proj.load_weight(weight, torch.randn(weight.shape[0]))


def test_checkpoint_round_trip_keeps_dtypes_and_perm(tmp_path):
    model = PermutedTinyLM(perm=torch.randperm(128), bias=True).eval()
    fourbit.quantize_(model, group_size=64)  # the other layers; q_proj is already int4
    path = tmp_path / "model.safetensors"
    fourbit.save_quantized(model, path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format_version"] == "2"
        assert json.loads(f.metadata()["quantized"])["layers.0.q_proj"]["act_order"] is True
    with torch.device("meta"):
        fresh = TinyLM(bias=True).eval()
    fourbit.load_quantized(fresh, path)
    q = fresh.layers[0].q_proj
    assert q.act_order and q.offsets.dtype == torch.float32 and q.scales.dtype == torch.float16
    for name, t in model.state_dict().items():
        assert torch.equal(t, fresh.state_dict()[name]) and t.dtype == fresh.state_dict()[name].dtype, name
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), fresh(ids))


def test_version_1_checkpoints_still_load(tmp_path):
    model = TinyLM(bias=True).eval()
    fourbit.quantize_(model, group_size=64)
    path = tmp_path / "model.safetensors"
    fourbit.save_quantized(model, path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    quantized = {name: {k: v for k, v in cfg.items() if k != "act_order"}  # as version 1 wrote it
                 for name, cfg in json.loads(metadata["quantized"]).items()}
    save_file(load_file(str(path)), str(path), metadata={**metadata, "format_version": "1",
                                                          "quantized": json.dumps(quantized)})
    with torch.device("meta"):
        fresh = TinyLM(bias=True).eval()
    fourbit.load_quantized(fresh, path)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), fresh(ids))


@pytest.mark.parametrize("perm,message", [
    (torch.zeros(128, dtype=torch.int32), "perm must hold each of the K = 128 input channels exactly once"),
    (torch.arange(127, dtype=torch.int32), r"perm' is torch.int32 \(127,\), the model expects torch.int32 \(128,\)"),
], ids=["repeats", "short"])
def test_a_bad_perm_in_a_checkpoint_raises_naming_it(tmp_path, perm, message):
    model = PermutedTinyLM(perm=torch.randperm(128), bias=True).eval()
    path = tmp_path / "model.safetensors"
    fourbit.save_quantized(model, path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["layers.0.q_proj.perm"] = perm
    save_file(tensors, str(path), metadata=metadata)
    with torch.device("meta"):
        fresh = TinyLM(bias=True).eval()
    with pytest.raises(ValueError, match=f"layers.0.q_proj.*{message}"):
        fourbit.load_quantized(fresh, path)
    assert isinstance(fresh.layers[0].q_proj, nn.Linear)  # untouched


def test_loader_fuses_parts_of_different_dtypes_exactly_and_keeps_perms_apart():
    perm = torch.randperm(96)
    q, dq = zero_point_weight(16, 96, 32, perm=perm)
    k, dk = zero_point_weight(8, 96, 32, torch.bfloat16, perm=perm)
    half = Int4Weight(k.qweight, k.scales, k.offsets.bfloat16(), 32, k.shape, perm=perm)  # bf16 offsets
    fused = loader._fuse([q, half])
    assert isinstance(fused, Int4Weight) and fused.scales.dtype == fused.offsets.dtype == torch.float32
    assert torch.equal(fused.dequantize(), torch.cat([dq.float(), half.dequantize()]))
    other, _ = zero_point_weight(8, 96, 32, perm=torch.randperm(96))
    assert loader._fuse([q, other]) == [q, other]  # different permutations: kept apart (test_unfused.py)
