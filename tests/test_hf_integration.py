"""fourbit.integrations.hf: the "fourbit" quantizer inside transformers' own from_pretrained,
save_pretrained, generate and torch.compile, on tiny random Qwen2, GPT-2 (Conv1D layers) and
Mistral models, and on SmolLM2-135M against fourbit's own loader."""

import copy
import importlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import fourbit
from helpers import sqnr_db

transformers = pytest.importorskip("transformers")
hf = importlib.import_module("fourbit.integrations.hf")  # registers quant_method "fourbit"

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402
from transformers.quantizers.auto import (  # noqa: E402
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoQuantizationConfig,
)

ARCHS = ("qwen2", "gpt2", "mistral")


def tiny_config(arch: str, hidden: int = 64):
    """A 2-layer random config of arch (Qwen2 ties its embeddings; Mistral does not; GPT-2's
    projections are Conv1D)."""
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=256, n_embd=hidden, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=1)
    cls = {"qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[arch]
    return cls(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               tie_word_embeddings=arch == "qwen2", bos_token_id=0, eos_token_id=1)


def float_dir(tmp_path_factory, arch: str, hidden: int = 64):
    """A Hugging Face directory of a random float32 model of arch, and the model (eval)."""
    model = AutoModelForCausalLM.from_config(tiny_config(arch, hidden), dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp(f"{arch}-{hidden}")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module", params=ARCHS)
def random_model(request, tmp_path_factory):
    return (request.param, *float_dir(tmp_path_factory, request.param))


def linear_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, Conv1D)}


def int4_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, fourbit.Int4Linear)}


def load(path, group_size=64, **options):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                quantization_config=hf.FourbitConfig(group_size=group_size, **options))


def as_nk(module) -> torch.Tensor:
    """A float layer's weight as [out_features, in_features] (Conv1D stores it [in, out])."""
    return (module.weight.t() if isinstance(module, Conv1D) else module.weight).detach()


# ---- the config and its registration ----

def test_config_round_trips_through_dict_and_json():
    config = hf.FourbitConfig(group_size=64, symmetric=True, modules_to_not_convert=["lm_head", "mlp.down_proj"],
                              backend="torch")
    d = config.to_dict()
    assert d == {"quant_method": "fourbit", "group_size": 64, "symmetric": True, "backend": "torch",
                 "modules_to_not_convert": ["lm_head", "mlp.down_proj"], "format_version": 2}
    assert hf.FourbitConfig.from_dict(d).to_dict() == d
    again = AutoQuantizationConfig.from_dict(json.loads(config.to_json_string()))
    assert type(again) is hf.FourbitConfig and again.to_dict() == d
    assert hf.FourbitConfig().to_dict() == {"quant_method": "fourbit", "group_size": 128, "symmetric": False,
                                            "backend": "auto", "modules_to_not_convert": ["lm_head"],
                                            "format_version": 2}


@pytest.mark.parametrize("options,error,match", [
    (dict(group_size=100), ValueError, "group_size must be one of"),
    (dict(symmetric="yes"), TypeError, "symmetric must be True or False"),
    (dict(backend="nope"), ValueError, "nope"),
    (dict(quant_method="gptq"), ValueError, "quant_method 'fourbit', got 'gptq'"),
    (dict(format_version=99), ValueError, "format version 99"),
    (dict(modules_to_not_convert=[3]), TypeError, "modules_to_not_convert must be"),
    (dict(bits=4), TypeError, r"unknown FourbitConfig option\(s\) \['bits'\]"),
], ids=["group_size", "symmetric", "backend", "quant_method", "format_version", "skip", "unknown"])
def test_config_rejects_bad_values(options, error, match):
    with pytest.raises(error, match=match):
        hf.FourbitConfig(**options)


def test_registration_is_idempotent(monkeypatch):
    hf.register()
    hf.register()
    reloaded = importlib.reload(hf)  # a second execution of the module registers its new classes
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["fourbit"] is reloaded.FourbitConfig
    assert AUTO_QUANTIZER_MAPPING["fourbit"] is reloaded.FourbitHfQuantizer
    other = type("FourbitConfig", (transformers.utils.quantization_config.QuantizationConfigMixin,), {})
    monkeypatch.setitem(AUTO_QUANTIZATION_CONFIG_MAPPING, "fourbit", other)
    with pytest.raises(RuntimeError, match="already has a quantization method 'fourbit'"):
        hf.register()


# ---- quantizing while loading ----

def test_from_pretrained_quantizes_every_linear_layer(random_model):
    """Every nn.Linear / Conv1D but lm_head becomes an Int4Linear holding exactly fourbit's
    RTN quantization (quantize_weight) of the float weight; biases stay float and frozen."""
    arch, path, ref = random_model
    model = load(path)
    targets = {n: m for n, m in linear_layers(ref).items() if n != "lm_head"}
    assert len(targets) == (8 if arch == "gpt2" else 14)
    assert set(int4_layers(model)) == set(targets)
    assert set(linear_layers(model)) == {"lm_head"}
    for name, layer in int4_layers(model).items():
        expected = fourbit.quantize_weight(as_nk(targets[name]), group_size=64)
        for tensor in ("qweight", "scales", "offsets"):
            assert torch.equal(getattr(layer.weight, tensor), getattr(expected, tensor)), (name, tensor)
        if targets[name].bias is not None:
            assert torch.equal(layer.bias, targets[name].bias) and not layer.bias.requires_grad
    assert model.is_quantized and model.config.quantization_config.group_size == 64


def test_weights_are_quantized_as_they_stream_in(random_model, monkeypatch):
    """When a layer is quantized, no float weight of a layer to be quantized exists off the
    meta device (its own weight arrives as the argument): the float model is never built."""
    arch, path, ref = random_model
    seen = []
    quantize_layer = hf.FourbitHfQuantizer.quantize_layer

    def spy(self, model, name, w):
        floats = [n for n, m in linear_layers(model).items() if n in self.targets and m.weight.device.type != "meta"]
        seen.append((name, w.device.type, floats, len(int4_layers(model))))
        return quantize_layer(self, model, name, w)

    monkeypatch.setattr(hf.FourbitHfQuantizer, "quantize_layer", spy)
    load(path)
    assert len(seen) == (8 if arch == "gpt2" else 14)
    assert [count for *_, count in seen] == list(range(len(seen)))
    assert all(device == "cpu" and floats == [] for _, device, floats, _ in seen)


def test_modules_to_not_convert_stay_float(tmp_path_factory):
    path, _ = float_dir(tmp_path_factory, "mistral")
    model = load(path, modules_to_not_convert=["lm_head", "mlp.down_proj", "model.layers.1.self_attn"])
    assert set(linear_layers(model)) == {"lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                                         *(f"model.layers.1.self_attn.{p}_proj" for p in "qkvo")}
    assert len(int4_layers(model)) == 14 - 2 - 4


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_an_empty_skip_list_quantizes_lm_head_unless_it_is_tied(arch, tmp_path_factory):
    path, _ = float_dir(tmp_path_factory, arch)
    model = load(path, modules_to_not_convert=[])
    tied = arch == "qwen2"
    assert set(linear_layers(model)) == ({"lm_head"} if tied else set())
    assert len(int4_layers(model)) == (14 if tied else 15)
    ids = torch.randint(0, 256, (1, 4))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_a_bias_that_arrives_after_its_weight_replaces_a_zero_placeholder():
    """The checkpoint order is transformers' to choose: a layer quantized before its bias
    loaded holds zeros there until the bias is set on the Int4Linear."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 32))
    quantizer = hf.FourbitHfQuantizer(hf.FourbitConfig(group_size=32), pre_quantized=False)
    quantizer.targets = {"0"}
    w = torch.randn(32, 64)
    layer = quantizer.quantize_layer(model, "0", w)
    assert model[0] is layer and torch.equal(layer.bias, torch.zeros(32))
    layer.bias = nn.Parameter(torch.randn(32), requires_grad=False)  # what transformers does next
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ layer.weight.dequantize().T + layer.bias)


def test_a_weight_int4_cannot_hold_fails_the_load_naming_it(tmp_path, caplog):
    model = AutoModelForCausalLM.from_config(tiny_config("mistral"), dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="conversion of the weights"):
        load(tmp_path)
    # transformers' load report (a warning) names the tensor and carries fourbit's error
    assert "model.layers.1.mlp.up_proj.weight" in caplog.text
    assert "w contains NaN or inf (w[3, 5] = inf)" in caplog.text


def test_disk_offload_is_refused(random_model):
    _, path, _ = random_model
    with pytest.raises(ValueError, match="cannot be offloaded to disk"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=hf.FourbitConfig(group_size=64),
                                             device_map={"": "disk"})


# ---- save_pretrained and the pre-quantized path ----

def test_save_pretrained_round_trips_bit_exactly(random_model, tmp_path):
    arch, path, _ = random_model
    model = load(path)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == model.config.quantization_config.to_dict()
    assert config["quantization_config"]["quant_method"] == "fourbit"
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    for name in int4_layers(model):
        assert {f"{name}.qweight", f"{name}.scales", f"{name}.offsets"} <= keys and f"{name}.weight" not in keys

    again = AutoModelForCausalLM.from_pretrained(tmp_path)  # no quantization_config: the checkpoint's
    assert set(int4_layers(again)) == set(int4_layers(model))
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_pre_quantized_layers_keep_perm_and_their_dtypes(tmp_path_factory, tmp_path):
    """An act-order layer (perm) with fp32 offsets beside fp16 scales (an exact import's form)
    survives save_pretrained / from_pretrained exactly, in a bf16 model."""
    path, _ = float_dir(tmp_path_factory, "qwen2")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                 quantization_config=hf.FourbitConfig(group_size=32))
    layer = model.model.layers[1].mlp.down_proj
    w = layer.weight
    weight = fourbit.Int4Weight(w.qweight, w.scales.half(), w.offsets.float(), 32, w.shape,
                                perm=torch.randperm(w.shape[1], dtype=torch.int32))
    layer.load_weight(weight)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    loaded = again.model.layers[1].mlp.down_proj
    assert loaded.act_order and torch.equal(loaded.perm, weight.perm)
    assert loaded.scales.dtype == torch.float16 and loaded.offsets.dtype == torch.float32
    assert all(torch.equal(getattr(loaded, t), getattr(weight, t)) for t in ("qweight", "scales", "offsets"))
    assert not again.model.layers[0].mlp.down_proj.act_order
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_dequantize_gives_float_layers_of_the_int4_weights(tmp_path_factory):
    path, _ = float_dir(tmp_path_factory, "gpt2")
    model = load(path)
    weights = {n: m.weight.dequantize() for n, m in int4_layers(model).items()}
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        before = model(ids).logits
        model.dequantize()
        after = model(ids).logits
    assert not int4_layers(model) and not hasattr(model.config, "quantization_config")
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in weights.items())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


# ---- generate, torch.compile, adapters ----

def test_generate_matches_a_greedy_loop(random_model):
    """HF generate (with its KV cache) on the quantized model gives the tokens of a plain
    greedy loop over full forwards."""
    _, path, _ = random_model
    model = load(path)
    model.generation_config.eos_token_id = None
    ids = torch.randint(2, 256, (1, 5))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        loop = ids
        for _ in range(6):
            loop = torch.cat([loop, model(loop).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, loop)


def test_torch_compile_forward(tmp_path_factory):
    path, _ = float_dir(tmp_path_factory, "qwen2")
    model = load(path)
    ids = torch.randint(0, 256, (2, 6))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


class LoRA(nn.Module):
    """A frozen base layer plus a trainable low-rank update B A x."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, rank: int = 4):
        super().__init__()
        self.base = base
        self.a = nn.Linear(in_features, rank, bias=False)
        self.b = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.b.weight, std=0.02)  # nonzero, so that a gets a gradient too

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


def test_adapter_gradient_flows_through_int4_layers(tmp_path_factory):
    """Adapters on layer 0's q_proj, trained through every later frozen Int4Linear (int4_mm is
    differentiable in x), get the gradients of the same model with the dequantized weights
    as nn.Linear; the int4 layers get none."""
    path, _ = float_dir(tmp_path_factory, "qwen2")
    model = load(path)
    reference = copy.deepcopy(model).dequantize()
    ids = torch.randint(0, 256, (2, 6))
    grads = []
    for m in (model, reference):
        m.requires_grad_(False)
        attention = m.model.layers[0].self_attn
        torch.manual_seed(0)
        attention.q_proj = LoRA(attention.q_proj, 64, 64)
        m(ids, labels=ids).loss.backward()
        grads.append((attention.q_proj.a.weight.grad, attention.q_proj.b.weight.grad))
    (a, b), (a_ref, b_ref) = grads
    assert a.abs().sum() > 0 and b.abs().sum() > 0
    torch.testing.assert_close(a, a_ref, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(b, b_ref, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for layer in int4_layers(model).values() for p in layer.parameters())


# ---- quality ----

# Expected SQNR of RTN int4 with min/max groups of 128 on Gaussian weights (HF's random init).
# A b-bit uniform quantizer on a full-scale sinusoid gives 6.02 b + 1.76 = 25.8 dB at b = 4.
# Here the step is the group's range over 15 levels, and the range of 128 Gaussian samples
# is about 2 * 2.6 sigma, where a sinusoid of that range has power (2.6 sigma)^2 / 2: the
# signal loses 10 log10(2.6^2 / 2) = 5.3 dB, and 15 steps instead of 16 another 0.6 dB,
# so SQNR = 10 log10(12 * 15^2 / 5.2^2) = 20.0 dB per weight, and per layer output (the
# errors are independent of x). WEIGHT_SQNR_DB keeps 1 dB for the spread between layers.
# The logits carry the errors of two blocks, each an attention (v and o quantized in series:
# 2 x 1% relative error power, q and k only move the softmax a little) and an MLP (gate, up and
# down: 3 x 1%). If those blocks made all of the logits, the powers would add to 2 x 5% = 10%:
# 10 dB, LOGITS_SQNR_DB. The unquantized embeddings on the residual stream only raise it
# (measured 14-18 dB over seeds for these configs); a wrong layout or scale gives 0 dB or less.
WEIGHT_SQNR_DB = 19.0
LOGITS_SQNR_DB = 10.0


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_sqnr_at_group_128(arch, tmp_path_factory):
    path, ref = float_dir(tmp_path_factory, arch, hidden=128)
    model = load(path, group_size=128)
    floats = linear_layers(ref)
    for name, layer in int4_layers(model).items():
        assert sqnr_db(as_nk(floats[name]), layer.weight.dequantize()) > WEIGHT_SQNR_DB, name
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert sqnr_db(ref(ids).logits, model(ids).logits) > LOGITS_SQNR_DB


@pytest.fixture(scope="module")
def smollm_float_dir(smollm_hf, tmp_path_factory):
    """SmolLM2-135M as a float32 Hugging Face directory (the GGUF's Q4_1 weights, dequantized
    by transformers), written without touching the shared peer model."""
    path = tmp_path_factory.mktemp("smollm2-float")
    config = copy.deepcopy(smollm_hf.config)
    del config.quantization_config  # the GGUF's: this directory is plain float
    config.save_pretrained(path)
    tensors = {k: v.contiguous() for k, v in smollm_hf.state_dict().items()
               if not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.mark.slow
def test_smollm2_greedy_matches_fourbit_load_model(smollm_float_dir, smollm_path):
    """The same float weights quantized by transformers with FourbitConfig and by fourbit's
    own loader: bit-identical int4 layers (both use quantize_weight; RTN treats rows
    independently, so fourbit's fused qkv and gate_up rows are the HF layers' rows stacked),
    and the same greedy continuation."""
    config = fourbit.Int4WeightOnlyConfig(group_size=128)
    ours = fourbit.load_model(smollm_float_dir, device="cpu", dtype=torch.float32, quantize=config)
    theirs = AutoModelForCausalLM.from_pretrained(smollm_float_dir, dtype=torch.float32,
                                                  quantization_config=hf.FourbitConfig(group_size=128))
    assert len(int4_layers(theirs)) == 7 * ours.config.num_layers
    for i, layer in enumerate(ours.layers):
        peer = theirs.model.layers[i]
        pairs = {layer.self_attn.qkv_proj: [peer.self_attn.q_proj, peer.self_attn.k_proj, peer.self_attn.v_proj],
                 layer.self_attn.o_proj: [peer.self_attn.o_proj],
                 layer.mlp.gate_up_proj: [peer.mlp.gate_proj, peer.mlp.up_proj],
                 layer.mlp.down_proj: [peer.mlp.down_proj]}
        for fused, parts in pairs.items():
            for tensor in ("qweight", "scales", "offsets"):
                assert torch.equal(getattr(fused, tensor), torch.cat([getattr(p, tensor) for p in parts])), (i, tensor)
    prompt = fourbit.load_tokenizer(smollm_path).encode("The capital of France is")
    expected = fourbit.generate(ours, [prompt], max_new_tokens=8)[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              eos_token_id=None)
    assert out[0, len(prompt):].tolist() == expected
