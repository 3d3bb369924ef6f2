"""Fused projections whose checkpoint parts cannot become one Int4Linear (an int4 q and k
beside a float v, as in a Q4_K_M GGUF; parts of other group sizes or act-order permutations)
stay apart in a ConcatLinear: int4 parts on the int4 kernels, nothing quantized again, the
same weights and logits as the float model, through save_model and load_model."""

import pytest
import torch
from torch import nn

import fourbit
from fourbit.models.llama import LlamaConfig
from fourbit.models.loader import build_model
from fourbit.models.random_weights import RandomCheckpoint
from fourbit.nn import ConcatLinear
from helpers import relative_error

CONFIG = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=192, num_layers=2, num_heads=4,
                     num_kv_heads=2, attention_bias=True)


class MixedCheckpoint(RandomCheckpoint):
    """Random weights with q, k, gate int4 (quantize_weight: q, k at group 32, gate at 64) and
    v, up float: each fused layer's parts differ. `float_copy` serves every weight dequantized."""

    INT4 = {"q": 32, "k": 32, "gate": 64, "o": 32, "down": 32}

    def __init__(self, float_copy=False):
        super().__init__(CONFIG, seed=3)
        self.float_copy = float_copy

    def layer_tensor(self, i, role):
        w = super().layer_tensor(i, role)
        if role not in self.INT4:
            return w
        weight = fourbit.quantize_weight(w, group_size=self.INT4[role])
        return weight.dequantize() if self.float_copy else weight


@pytest.fixture(scope="module")
def models():
    return (build_model(MixedCheckpoint(), "cpu", torch.float32),
            build_model(MixedCheckpoint(float_copy=True), "cpu", torch.float32))


def dense(module):
    if isinstance(module, ConcatLinear):
        return torch.cat([dense(p) for p in module.parts])
    return module.weight.dequantize() if isinstance(module, fourbit.Int4Linear) else module.weight


def test_parts_that_differ_stay_apart_in_their_own_form(models):
    model, ref = models
    for layer, ref_layer in zip(model.layers, ref.layers):
        qkv, gate_up = layer.self_attn.qkv_proj, layer.mlp.gate_up_proj
        assert isinstance(qkv, ConcatLinear) and [type(p) for p in qkv.parts] == [fourbit.Int4Linear,
                                                                                     fourbit.Int4Linear, nn.Linear]
        assert isinstance(gate_up, ConcatLinear) and [type(p) for p in gate_up.parts] == [fourbit.Int4Linear,
                                                                                             nn.Linear]
        assert qkv.split_sizes == [128, 64, 64] and all(p.bias is not None for p in qkv.parts)
        for name in ("self_attn.qkv_proj", "mlp.gate_up_proj", "self_attn.o_proj", "mlp.down_proj"):
            assert torch.equal(dense(layer.get_submodule(name)), dense(ref_layer.get_submodule(name))), name
        assert torch.equal(layer.self_attn.qkv_proj.parts[2].bias,
                           ref_layer.self_attn.qkv_proj.bias[192:])  # the bias split by rows


def test_logits_and_greedy_equal_the_float_model(models):
    model, ref = models
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9))
    with torch.no_grad():
        out, plain, exact = model(ids), ref(ids), ref.double()(ids)
        ref.float()
    assert relative_error(out, exact) <= 2 * relative_error(plain, exact) + 4 * torch.finfo(torch.float32).eps
    prompts = [[1, 2, 3], [7, 8]]
    assert fourbit.generate(model, prompts, max_new_tokens=6) == fourbit.generate(ref, prompts, max_new_tokens=6)


def test_save_and_load_keep_the_parts(models, tmp_path):
    model, _ = models
    back = fourbit.load_model(fourbit.save_model(model, tmp_path / "m"), device="cpu", dtype=torch.float32)
    for (name, a), (_, b) in zip(model.named_modules(), back.named_modules()):
        assert type(a) is type(b), name
    for name, t in model.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name
    ids = torch.randint(0, CONFIG.vocab_size, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids), back(ids))


def test_quantize_false_and_a_config_still_fuse(models):
    plain = build_model(MixedCheckpoint(), "cpu", torch.float32, quantize=False)
    assert type(plain.layers[0].self_attn.qkv_proj) is nn.Linear
    assert torch.equal(plain.layers[0].self_attn.qkv_proj.weight, dense(models[1].layers[0].self_attn.qkv_proj))
    # A config at group 32 quantizes the float v; q, k (group 32 already) and v then fuse.
    quantized = build_model(MixedCheckpoint(), "cpu", torch.float32, quantize=dict(group_size=32))
    assert isinstance(quantized.layers[0].self_attn.qkv_proj, fourbit.Int4Linear)
    # gate is int4 at group 64, up quantized at 32: different group sizes stay apart.
    assert isinstance(quantized.layers[0].mlp.gate_up_proj, ConcatLinear)
    assert [p.group_size for p in quantized.layers[0].mlp.gate_up_proj.parts] == [64, 32]


def test_a_checkpoint_splitting_a_module_wrongly_raises(models, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    path = fourbit.save_model(models[0], tmp_path / "m") / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    concat = json.loads(metadata["concat"])
    concat["layers.0.self_attn.qkv_proj"] = [128, 64, 60]
    save_file(load_file(str(path)), str(path), metadata={**metadata, "concat": json.dumps(concat)})
    with pytest.raises(ValueError, match=r"splits 'layers.0.self_attn.qkv_proj' into parts of \[128, 64, 60\]"):
        fourbit.load_model(path.parent, device="cpu")
