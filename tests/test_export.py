"""fourbit.save_model(..., format="compressed-tensors"): the pack-quantized Hugging Face layout,
checked two ways: read back by fourbit's own compressed-tensors reader (bit-exact weights, equal
logits), and unpacked here from the documented layout (independent of fourbit's packing code):

    weight_packed      int32 [N, ceil(K/8)]: nibble i (bits 4i..4i+3) of word j is column 8j + i,
                       the signed code x in [-8, 7] stored as x + 8
    weight_scale       [N, groups]; weight_zero_point int32 [ceil(N/8), groups] packed along N
                       the same way (asymmetric only); weight_shape [2]; weight_g_idx int32 [K]
    w[n, k] = (x[n, k] - zero[n, g]) * scale[n, g],  g = g_idx[k] or k // group_size

transformers itself loading the export is tests/peers/check_export.py (the peer venv).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import fourbit
from fourbit.export import save_compressed_tensors
from fourbit.format import Int4Weight, concat_rows

transformers = pytest.importorskip("transformers")

ROLES = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "self_attn.o_proj": ("self_attn.o_proj",), "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
         "mlp.down_proj": ("mlp.down_proj",)}


def tiny_llama_dir(directory, num_layers: int = 2):
    """A tiny random Llama as a Hugging Face directory (K = 64 and 160: 160 is no multiple of 64)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("float"))


def ids():
    return torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(3))


def int4_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, fourbit.Int4Linear)}


def unpack_nibbles(words: torch.Tensor, count: int) -> torch.Tensor:
    """int32 [R, W] -> int64 [R, count]: value i of row r is bits 4(i%8).. of word i//8."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8) * 4
    return ((w.unsqueeze(-1) >> shifts) & 0xF).reshape(words.shape[0], -1)[:, :count]


def documented_dequantize(tensors: dict, name: str, weights: dict) -> torch.Tensor:
    """fp32 [N, K] by the layout in the module docstring."""
    n, k = tensors[f"{name}.weight_shape"].tolist()
    x = unpack_nibbles(tensors[f"{name}.weight_packed"], k) - 8
    scale = tensors[f"{name}.weight_scale"].to(torch.float32)
    if weights["symmetric"]:
        zero = torch.zeros(scale.shape, dtype=torch.int64)
    else:
        zero = unpack_nibbles(tensors[f"{name}.weight_zero_point"].t(), n).t() - 8
    if f"{name}.weight_g_idx" in tensors:
        g = tensors[f"{name}.weight_g_idx"].to(torch.int64)
    else:
        g = torch.zeros(k, dtype=torch.int64) if weights["strategy"] == "channel" else \
            torch.arange(k) // weights["group_size"]
    return (x - zero[:, g]).to(torch.float32) * scale[:, g]


def scheme_of(config: dict, name: str) -> dict:
    groups = config["quantization_config"]["config_groups"]
    for group in groups.values():
        if group["targets"] == ["Linear"] or name in group["targets"]:
            return group["weights"]
    raise AssertionError(f"no config group targets {name}")


def check_layout(model, directory):
    """Every exported int4 layer's tensors, unpacked here, equal Int4Linear.weight.dequantize()
    exactly; every other linear layer is in `ignore` with its exact float weight. Returns the
    number of fourbit layers exported as int4."""
    config = json.loads((directory / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    tensors = load_file(str(directory / "model.safetensors"))
    checked = 0
    for i in range(model.config.num_layers):
        for module, parts in ROLES.items():
            layer = model.get_submodule(f"layers.{i}.{module}")
            names = [f"model.layers.{i}.{p}" for p in parts]
            expected = layer.weight.dequantize() if isinstance(layer, fourbit.Int4Linear) else layer.weight.float()
            if set(names) <= set(quant["ignore"]):  # float: a float layer, or an int4 one's dense fallback
                assert torch.equal(torch.cat([tensors[f"{n}.weight"] for n in names]).float(), expected)
            else:
                assert isinstance(layer, fourbit.Int4Linear) and not set(names) & set(quant["ignore"])
                w = torch.cat([documented_dequantize(tensors, n, scheme_of(config, n)) for n in names])
                assert torch.equal(w, expected)
                checked += 1
    return checked


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        assert torch.equal(a(ids()), b(ids()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group_size", [32, 64, -1], ids=["g32", "g64", "channel"])
def test_symmetric_export_round_trips_exactly(float_dir, tmp_path, group_size, dtype):
    model = fourbit.load_model(float_dir, device="cpu", dtype=dtype,
                               quantize=fourbit.Int4WeightOnlyConfig(group_size=group_size, symmetric=True))
    fourbit.save_model(model, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    quant = config["quantization_config"]
    (group,) = quant["config_groups"].values()
    assert group["targets"] == ["Linear"] and quant["ignore"] == ["lm_head"]
    assert group["weights"]["num_bits"] == 4 and group["weights"]["symmetric"] is True
    assert (group["weights"]["strategy"], group["weights"]["group_size"]) == \
        (("channel", None) if group_size == -1 else ("group", group_size))
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert "model.layers.1.mlp.down_proj.weight_packed" in tensors
    assert not any(k.endswith(("weight_zero_point", "weight_g_idx")) for k in tensors)
    assert tensors["model.layers.0.self_attn.k_proj.weight_scale"].dtype == dtype
    assert check_layout(model, tmp_path / "ct") == 8
    again = fourbit.load_model(tmp_path / "ct", device="cpu", dtype=dtype)
    assert set(int4_layers(again)) == set(int4_layers(model))
    assert_same_model(again, model)


def integer_zero_model(float_dir, group_size, dtype=torch.float16):
    """A model whose int4 layers have integer zero points (what GPTQ / AWQ imports hold): the
    symmetric codes and scales, random z in [0, 15], offsets -z * s exact in fp32."""
    model = fourbit.load_model(float_dir, device="cpu", dtype=dtype,
                               quantize=fourbit.Int4WeightOnlyConfig(group_size=group_size, symmetric=True))
    generator = torch.Generator().manual_seed(5)
    for layer in int4_layers(model).values():
        w = layer.weight
        z = torch.randint(0, 16, w.scales.shape, generator=generator).float()
        layer.load_weight(Int4Weight(w.qweight, w.scales, -(z * w.scales.float()), w.group_size, w.shape, False))
    return model


@pytest.mark.parametrize("group_size", [32, -1], ids=["g32", "channel"])
def test_integer_zero_points_export_exactly(float_dir, tmp_path, group_size):
    model = integer_zero_model(float_dir, group_size)
    fourbit.save_model(model, tmp_path / "ct", format="compressed-tensors")
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    zp = tensors["model.layers.0.mlp.gate_proj.weight_zero_point"]
    assert zp.dtype == torch.int32 and tuple(zp.shape) == (160 // 8, 2 if group_size == 32 else 1)
    assert check_layout(model, tmp_path / "ct") == 8
    again = fourbit.load_model(tmp_path / "ct", device="cpu", dtype=torch.float16)
    for name, layer in int4_layers(model).items():
        assert torch.equal(int4_layers(again)[name].weight.dequantize(), layer.weight.dequantize())
    with torch.no_grad():
        assert torch.equal(again(ids()), model(ids()))


def test_asymmetric_rtn_layers_are_refused_by_name(float_dir, tmp_path):
    """fourbit's asymmetric round-to-nearest stores a float minimum: no integer zero point
    reproduces it, so the export names the layers instead of rounding them; nothing is written."""
    model = fourbit.load_model(float_dir, device="cpu", quantize=dict(group_size=32))
    with pytest.raises(ValueError, match=r"14 int4 layers cannot be written as compressed-tensors exactly.*: 14 "
                                         r"with offsets that are not -z \* scale .*a float minimum.*: "
                                         r"model.layers.0.self_attn.q_proj \(row 0, group 0: scale .*\), "
                                         r"model.layers.0.self_attn.k_proj.*dense_fallback=True"):
        fourbit.save_model(model, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct" / "model.safetensors").exists()


def test_dense_fallback_writes_refused_layers_as_float_exactly(float_dir, tmp_path):
    """Layer 1 asymmetric RTN (refused), layer 0 symmetric (kept): the fallback writes layer 1's
    exact dequantization as float, in `ignore`; it loads back as those float weights."""
    model = fourbit.load_model(float_dir, device="cpu", quantize=dict(group_size=32, symmetric=True))
    for name, layer in int4_layers(model).items():
        if name.startswith("layers.1."):
            layer.load_weight(fourbit.quantize_weight(layer.weight.dequantize(), 32, False))
    with pytest.raises(ValueError, match="7 int4 layers"):
        fourbit.save_model(model, tmp_path / "ct", format="compressed-tensors")
    fourbit.save_model(model, tmp_path / "ct", format="compressed-tensors", dense_fallback=True)
    quant = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert sorted(quant["ignore"]) == sorted(["lm_head"] + [f"model.layers.1.{p}" for ps in ROLES.values()
                                                            for p in ps])
    assert check_layout(model, tmp_path / "ct") == 4
    again = fourbit.load_model(tmp_path / "ct", device="cpu")
    assert set(int4_layers(again)) == {n for n in int4_layers(model) if n.startswith("layers.0.")}
    for name, layer in int4_layers(model).items():
        loaded = again.get_submodule(name)
        expected = layer.weight.dequantize()
        assert torch.equal(loaded.weight.dequantize() if name.startswith("layers.0.") else loaded.weight, expected)


def test_act_order_exports_as_g_idx(float_dir, tmp_path):
    """A layer with an act-order perm: weight_packed in input-channel order, weight_g_idx the
    group of each channel, actorder "group"; a perm inside groups needs no g_idx."""
    model = integer_zero_model(float_dir, 32, torch.bfloat16)
    generator = torch.Generator().manual_seed(7)
    mlp = model.layers[0].mlp
    perms = {"gate_up_proj": torch.randperm(64, generator=generator).to(torch.int32),
             "down_proj": (torch.arange(160).view(5, 32).flip(1).reshape(-1)).to(torch.int32)}  # within groups
    for attr, perm in perms.items():
        w = getattr(mlp, attr).weight
        layer = fourbit.Int4Linear(w.shape[1], w.shape[0], False, 32, False, dtype=torch.bfloat16, device="cpu",
                                   act_order=True)
        layer.load_weight(Int4Weight(w.qweight, w.scales, w.offsets, 32, w.shape, False, perm))
        setattr(mlp, attr, layer)
    fourbit.save_model(model, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    g_idx = tensors["model.layers.0.mlp.up_proj.weight_g_idx"]
    assert g_idx.dtype == torch.int32 and torch.equal(g_idx[perms["gate_up_proj"].long()], torch.arange(64) // 32)
    assert "model.layers.0.mlp.down_proj.weight_g_idx" not in tensors
    assert scheme_of(config, "model.layers.0.mlp.gate_proj")["actorder"] == "group"
    assert scheme_of(config, "model.layers.0.mlp.down_proj")["actorder"] is None
    assert check_layout(model, tmp_path / "ct") == 8
    again = fourbit.load_model(tmp_path / "ct", device="cpu", dtype=torch.bfloat16)
    for name, layer in int4_layers(model).items():
        assert torch.equal(int4_layers(again)[name].weight.dequantize(), layer.weight.dequantize()), name
    with torch.no_grad():
        torch.testing.assert_close(again(ids()), model(ids()), rtol=1e-5, atol=1e-5)


def test_lm_head_and_float_layers(float_dir, tmp_path):
    """An int4 lm_head is exported (no ignore entry); a layer kept float is in ignore."""
    model = fourbit.load_model(float_dir, device="cpu", quantize=dict(group_size=64, symmetric=True,
                                                                      skip=("down_proj",)))
    assert isinstance(model.lm_head, fourbit.Int4Linear)
    fourbit.save_model(model, tmp_path / "ct", format="compressed-tensors")
    quant = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert quant["ignore"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert check_layout(model, tmp_path / "ct") == 6
    assert_same_model(fourbit.load_model(tmp_path / "ct", device="cpu"), model)


def test_export_replaces_a_fourbit_checkpoint_and_back(float_dir, tmp_path):
    """Saving one format over the other leaves one consistent checkpoint each time."""
    model = fourbit.load_model(float_dir, device="cpu", quantize=dict(group_size=32, symmetric=True))
    for fmt in ("fourbit", "compressed-tensors", "fourbit"):
        fourbit.save_model(model, tmp_path / "m", format=fmt)
        config = json.loads((tmp_path / "m" / "config.json").read_text())
        assert ("quantization_config" in config) == (fmt == "compressed-tensors")
        assert_same_model(fourbit.load_model(tmp_path / "m", device="cpu"), model)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_export_errors(float_dir, tmp_path):
    model = fourbit.load_model(float_dir, device="cpu", quantize=dict(group_size=32, symmetric=True))
    with pytest.raises(ValueError, match="format must be 'fourbit' or 'compressed-tensors'"):
        fourbit.save_model(model, tmp_path / "x", format="gptq")
    with pytest.raises(ValueError, match="dense_fallback applies to format='compressed-tensors' only"):
        fourbit.save_model(model, tmp_path / "x", dense_fallback=True)
    with pytest.raises(TypeError, match="model must be a fourbit Llama"):
        save_compressed_tensors(torch.nn.Linear(2, 2), tmp_path / "x")
    # fp32 scales that bf16 cannot hold: named, not rounded
    with pytest.raises(ValueError, match="scales not all representable in torch.bfloat16"):
        save_compressed_tensors(model, tmp_path / "x", dtype=torch.bfloat16)
    assert concat_rows  # the fused layers split exactly: checked through check_layout above
