"""fourbit.integrations.vllm without a vLLM engine: registration, the config, the shard
check, one layer's create_weights / load / process / apply, and the checkpoint layout."""

import importlib
import json

import pytest
import torch
from torch import nn

import fourbit
from fourbit.integrations import vllm as fv


def test_entry_point_registers_fourbit():
    from importlib.metadata import entry_points

    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm.plugins import load_plugins_by_group

    assert "fourbit" in [e.name for e in entry_points(group="vllm.general_plugins")]
    load_plugins_by_group("vllm.general_plugins")["fourbit"]()
    fv.register()  # again: every vLLM process calls it
    assert get_quantization_config("fourbit") is fv.FourbitVllmConfig
    assert QUANTIZATION_METHODS.count("fourbit") == 1


def test_reimport_replaces_the_registration():
    module = importlib.reload(fv)
    from vllm.model_executor.layers.quantization import get_quantization_config
    assert get_quantization_config("fourbit") is module.FourbitVllmConfig


def test_from_config_takes_fourbit_config_fields():
    config = fv.FourbitVllmConfig.from_config({"quant_method": "fourbit", "group_size": 64, "symmetric": True,
                                               "modules_to_not_convert": ["lm_head"], "backend": "auto",
                                               "format_version": 2})
    assert (config.group_size, config.symmetric, config.modules_to_not_convert) == (64, True, ["lm_head"])
    assert fv.FourbitVllmConfig().group_size == 128  # quantization="fourbit" with no quantization_config


@pytest.mark.parametrize("config, error", [
    ({"group_size": 48}, r"group_size must be one of"),
    ({"group_size": 32, "bits": 4}, r"unknown fourbit quantization_config key\(s\) \['bits'\]"),
    ({"quant_method": "bitsandbytes"}, r"quant_method 'bitsandbytes' is not one fourbit reads"),
    ({"format_version": 9}, r"format version 9 is not one this fourbit reads"),
    ({"backend": "tpu"}, r"unknown backend 'tpu'"),
], ids=["group-size", "unknown-key", "quant-method", "format-version", "backend"])
def test_from_config_errors(config, error):
    with pytest.raises((ValueError, TypeError), match=error):
        fv.FourbitVllmConfig.from_config(config)


# ---- the tensor-parallel shard check -------------------------------------------------------

@pytest.mark.parametrize("k, tp", [(512, 2), (1024, 4), (256, 1)], ids=["512/2", "1024/4", "not-split"])
def test_shards_on_group_boundaries_pass(k, tp):
    fv.check_shard("model.layers.0.mlp.down_proj", fv.LayerSpec(128, False), k, k // tp)


@pytest.mark.parametrize("spec, k, tp, error", [
    (fv.LayerSpec(128, False), 384, 2, r"model.layers.0.mlp.down_proj: tensor parallelism splits its K = 384 input "
                                       r"channels into 2 shards of 192, not a multiple of group_size 128"),
    (fv.LayerSpec(32, False), 80, 2, r"K = 80 input channels into 2 shards of 40, not a multiple of group_size 32"),
    (fv.LayerSpec(-1, False), 512, 2, r"group_size -1 has one group per row spanning all of K"),
    (fv.LayerSpec(64, True), 512, 2, r"an act-order layer \(perm\) mixes input channels from every shard"),
], ids=["half-group", "half-word", "one-group-per-row", "act-order"])
def test_shards_that_split_a_group_fail(spec, k, tp, error):
    with pytest.raises(ValueError, match=error):
        fv.check_shard("model.layers.0.mlp.down_proj", spec, k, k // tp)


def test_create_weights_checks_the_shard():
    method = fv.FourbitLinearMethod(fv.FourbitVllmConfig(group_size=128), fv.LayerSpec(128, False),
                                    "model.layers.3.self_attn.o_proj")
    with pytest.raises(ValueError, match=r"model.layers.3.self_attn.o_proj: .* K = 384 .* 2 shards of 192"):
        method.create_weights(nn.Module(), 192, [256], 384, 256, torch.float32, weight_loader=None)


# ---- which layers are int4 ---------------------------------------------------------------

class FakeLinear(nn.Module):
    pass


def _linear_base():
    from vllm.model_executor.layers.linear import LinearBase
    layer = LinearBase.__new__(LinearBase)
    nn.Module.__init__(layer)
    return layer


def test_get_quant_method_reads_the_checkpoint_per_part():
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    config = fv.FourbitVllmConfig(group_size=64)
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    int4 = fv.LayerSpec(64, False)
    config.layers = {f"model.layers.0.self_attn.{p}_proj": int4 for p in "qkvo"}
    config.layers["model.layers.1.self_attn.v_proj"] = int4  # q and k of layer 1 are float
    layer = _linear_base()
    assert isinstance(config.get_quant_method(layer, "model.layers.0.self_attn.qkv_proj"), fv.FourbitLinearMethod)
    assert isinstance(config.get_quant_method(layer, "model.layers.0.self_attn.o_proj"), fv.FourbitLinearMethod)
    assert isinstance(config.get_quant_method(layer, "model.layers.0.mlp.down_proj"), UnquantizedLinearMethod)
    assert config.get_quant_method(FakeLinear(), "model.layers.0.self_attn.rotary_emb") is None
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.qkv_proj: vLLM runs .*q_proj.*k_proj.*v_proj as "
                                         r"one layer, but the checkpoint stores them differently"):
        config.get_quant_method(layer, "model.layers.1.self_attn.qkv_proj")


def test_without_headers_modules_to_not_convert_decides():
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    config = fv.FourbitVllmConfig(group_size=32, modules_to_not_convert=["lm_head", "model.layers.1", "down_proj"])
    layer = _linear_base()
    assert isinstance(config.get_quant_method(layer, "model.layers.0.self_attn.o_proj"), fv.FourbitLinearMethod)
    for prefix in ("model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj"):
        assert isinstance(config.get_quant_method(layer, prefix), UnquantizedLinearMethod)


def test_stored_int4_layers_from_headers(smollm_int4_dir):
    layers = fv.stored_int4_layers(smollm_int4_dir, 32)
    assert len(layers) == 30 * 7 and set(layers.values()) == {fv.LayerSpec(32, False)}
    assert "model.layers.29.mlp.down_proj" in layers and "lm_head" not in layers
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj: qweight \[576, 192\] and scales "
                                         r"\[576, 48\] are not int4 groups of group_size 128"):
        fv.stored_int4_layers(smollm_int4_dir, 128)


def test_stored_int4_layers_refuses_a_save_model_directory(smollm, tmp_path):
    fourbit.save_model(smollm, tmp_path)
    with pytest.raises(ValueError, match=r"fourbit.save_model checkpoint .*vllm.save_pretrained\(model, directory\)"):
        fv.stored_int4_layers(tmp_path, 32)


# ---- one layer, as vLLM drives it ---------------------------------------------------------

def test_scales_take_the_narrowest_exact_dtype():
    exact_fp16 = torch.randn(4, 3).half().float()
    assert fv._narrowest_exact(exact_fp16, torch.float32).dtype == torch.float16
    assert fv._narrowest_exact(exact_fp16.bfloat16().float(), torch.bfloat16).dtype == torch.bfloat16
    assert fv._narrowest_exact(torch.tensor([1 / 3]), torch.bfloat16).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
@pytest.mark.parametrize("k, group_size", [(256, 64), (200, 32), (96, -1)], ids=["g64", "k200-g32", "g-1"])
def test_one_layer_equals_int4_linear(dtype, act_order, k, group_size):
    n = 48
    weight = fourbit.quantize_weight(torch.randn(n, k) * 0.05, group_size=group_size, dtype=dtype)
    if act_order:
        weight.perm = torch.randperm(k).to(torch.int32)
    reference = fourbit.Int4Linear(k, n, bias=True, group_size=group_size, dtype=dtype, act_order=act_order)
    bias = torch.randn(n, dtype=dtype)
    reference.load_weight(weight, bias)

    method = fv.FourbitLinearMethod(fv.FourbitVllmConfig(group_size=group_size), fv.LayerSpec(group_size, act_order),
                                    "layer")
    layer = nn.Module()
    loader = lambda param, loaded: param.data.copy_(loaded)  # what vLLM's loader does on one rank
    method.create_weights(layer, k, [n], k, n, dtype, weight_loader=loader)
    for name in ("qweight", "scales", "offsets"):
        getattr(layer, name).weight_loader(getattr(layer, name), getattr(weight, name))
    if act_order:
        layer.perm.weight_loader(layer.perm, weight.perm)
    method.process_weights_after_loading(layer)
    assert layer.scales.dtype == weight.scales.dtype and torch.equal(layer.scales, weight.scales)
    x = torch.randn(5, k, dtype=dtype)
    assert torch.equal(method.apply(layer, x, bias), reference(x))
    assert torch.equal(method.dequantize_weight(layer), weight.dequantize(dtype))


def test_fused_parts_with_different_perms_fail():
    method = fv.FourbitLinearMethod(fv.FourbitVllmConfig(group_size=64), fv.LayerSpec(64, True),
                                    "model.layers.0.self_attn.qkv_proj")
    layer = nn.Module()
    method.create_weights(layer, 128, [64, 32, 32], 128, 128, torch.float32, weight_loader=None)
    layer.perm.weight_loader(layer.perm, torch.randperm(128), "q")
    layer.perm.weight_loader(layer.perm, torch.randperm(128), "k")
    with pytest.raises(ValueError, match=r"qkv_proj: its parts \['k', 'q'\] have different act-order permutations"):
        method.process_weights_after_loading(layer)


# ---- the checkpoint layout ---------------------------------------------------------------

def test_save_pretrained_layout(smollm_int4_dir, smollm):
    from safetensors import safe_open

    config = json.loads((smollm_int4_dir / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fourbit", "group_size": 32, "symmetric": False,
                                             "modules_to_not_convert": ["lm_head"], "backend": "auto",
                                             "format_version": 2}
    with safe_open(str(smollm_int4_dir / "model.safetensors"), framework="pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
        k = f.get_tensor("model.layers.0.self_attn.k_proj.qweight")
        v = f.get_tensor("model.layers.0.self_attn.v_proj.qweight")
        s = f.get_tensor("model.layers.0.self_attn.v_proj.scales")
    fused = smollm.layers[0].self_attn.qkv_proj
    assert torch.equal(torch.cat([q, k, v]), fused.qweight) and s.dtype == fused.scales.dtype


def test_transformers_reads_save_pretrained(smollm_int4_dir, smollm):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    import fourbit.integrations.hf  # noqa: F401 (registers quant_method "fourbit" with transformers)

    model = AutoModelForCausalLM.from_pretrained(smollm_int4_dir, dtype=torch.float32)
    assert isinstance(model.model.layers[0].self_attn.q_proj, fourbit.Int4Linear)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, smollm(ids), rtol=0, atol=1e-4)
