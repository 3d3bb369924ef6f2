import copy

import pytest
import torch
from torch import nn

import fourbit
from conftest import backend_cases, need
from fourbit.format import GROUP_SIZES
from helpers import DTYPES, TinyLM, assert_matmul_accuracy, sqnr_db


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_from_linear_matches_its_dequantized_weight(group_size, dtype):
    linear = nn.Linear(576, 200, bias=True).to(dtype)
    q = fourbit.Int4Linear.from_linear(linear, group_size=group_size)
    assert (q.in_features, q.out_features, q.group_size) == (576, 200, group_size)
    assert q.scales.dtype == dtype and q.bias.dtype == dtype
    x = torch.randn(2, 3, 576).to(dtype)
    out = q(x)
    assert out.shape == (2, 3, 200)
    assert_matmul_accuracy(out.reshape(6, 200), x.reshape(6, 576), q.weight.dequantize().double(),
                           linear.bias.detach())


def test_int4linear_backend_attribute_and_repr():
    q = fourbit.Int4Linear.from_linear(nn.Linear(256, 64), backend="torch")
    assert q.backend == "torch" and "group_size=128" in repr(q)
    x = torch.randn(4, 256)
    ref = q(x)
    q.backend = "auto"
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown backend"):
        fourbit.Int4Linear(256, 64, backend="gpu")
    with pytest.raises(ValueError, match="K = 256"):
        q(torch.randn(4, 128))


def test_from_linear_refuses_meta_weights():
    with pytest.raises(ValueError, match="meta"):
        fourbit.Int4Linear.from_linear(nn.Linear(64, 64, device="meta"))


def test_quantize_replaces_linears_except_skipped_and_keeps_outputs_close():
    model = TinyLM().eval()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(ids)
        fourbit.quantize_(model, group_size=32)
        out = model(ids)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    int4 = {n for n, m in model.named_modules() if isinstance(m, fourbit.Int4Linear)}
    assert linears == {"lm_head"} and len(int4) == 14
    # RTN int4 at group 32 keeps a per-weight SQNR of about 22 dB on Gaussian weights (a
    # step of range/15 with error variance step^2/12). The residual stream also carries the
    # unquantized embedding, so the logits measured 32-33 dB over several seeds. 25 dB keeps
    # a margin below that; a wrong layout or scale gives 0 dB or less.
    assert sqnr_db(ref, out) > 25


def test_quantize_skip_patterns():
    model = TinyLM()
    fourbit.quantize_(model, skip=("lm_head", "layers.0.*", "*_proj"))
    assert not any(isinstance(m, fourbit.Int4Linear) for m in model.modules())
    model = TinyLM()
    fourbit.quantize_(model, skip="down_proj")
    assert isinstance(model.layers[1].up_proj, fourbit.Int4Linear)
    assert isinstance(model.layers[1].down_proj, nn.Linear) and isinstance(model.lm_head, fourbit.Int4Linear)


def test_quantize_leaves_multihead_attention_out_proj_alone():
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
    x = torch.randn(2, 5, 64)
    fourbit.quantize_(layer, group_size=32)
    assert isinstance(layer.linear1, fourbit.Int4Linear)
    assert type(layer.self_attn.out_proj) is not fourbit.Int4Linear
    assert layer(x).shape == (2, 5, 64)


def test_torch_compile_fullgraph():
    model = TinyLM(layers=1).eval()
    fourbit.quantize_(model, group_size=64)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        eager = model(ids)
        compiled = torch.compile(model, fullgraph=True)(ids)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_tune_runs_each_distinct_layer_shape_once_per_row_count():
    model = TinyLM(layers=2)
    fourbit.quantize_(model, group_size=64)
    # q/k/v/o share (128 -> 128), gate/up (128 -> 352), down (352 -> 128); lm_head stays float.
    assert fourbit.tune(model, rows=(1, 5)) == 3 * 2


@pytest.mark.parametrize("device,backend", [c for c in backend_cases() if c.values[1] == "triton"])
def test_torch_compile_fullgraph_with_the_triton_backend(device, backend):
    need(device, backend)
    model = TinyLM(layers=1, dim=64, hidden=96, vocab=64).eval().to(device)
    fourbit.quantize_(model, group_size=32, backend="triton")
    ids = torch.randint(0, 64, (1, 5), device=device)
    with torch.no_grad():
        eager = model(ids)
        compiled = torch.compile(model, fullgraph=True)(ids)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def _int4_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, fourbit.Int4Linear)}


def test_quantize_config_keywords_and_dict_give_bit_identical_layers():
    """The config form, the old keywords and a dict of the fields are one path: the same
    layers replaced, bit for bit the same buffers, the same backend."""
    base = TinyLM(bias=True)
    options = dict(group_size=32, symmetric=True, skip="down_proj", backend="torch")
    by_config = fourbit.quantize_(copy.deepcopy(base), fourbit.Int4WeightOnlyConfig(**options))
    by_keywords = fourbit.quantize_(copy.deepcopy(base), **options)
    by_dict = fourbit.quantize_(copy.deepcopy(base), options)
    layers = _int4_layers(by_config)
    assert len(layers) == 2 * 6 + 1 and "lm_head" in layers and "layers.0.down_proj" not in layers
    assert {(m.group_size, m.symmetric, m.backend) for m in layers.values()} == {(32, True, "torch")}
    for other in (by_keywords, by_dict):
        assert _int4_layers(other).keys() == layers.keys()
        ours, theirs = by_config.state_dict(), other.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert {m.backend for m in _int4_layers(other).values()} == {"torch"}


def test_quantize_default_config_matches_the_old_defaults():
    a, b = TinyLM(), TinyLM()
    b.load_state_dict(a.state_dict())
    fourbit.quantize_(a)
    fourbit.quantize_(b, fourbit.Int4WeightOnlyConfig(group_size=128, symmetric=False, skip=("lm_head",)))
    assert _int4_layers(a).keys() == _int4_layers(b).keys() and "lm_head" not in _int4_layers(a)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_quantize_honors_the_filter_together_with_skip():
    seen = []

    def only_mlp(name, module):
        seen.append(name)
        return name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj") or name == "lm_head"

    model = fourbit.quantize_(TinyLM(), fourbit.Int4WeightOnlyConfig(skip="down_proj", filter=only_mlp))
    # skip="down_proj" replaces the default ("lm_head",), and the filter accepts lm_head.
    mlp = {f"layers.{i}.{p}" for i in range(2) for p in ("gate_proj", "up_proj")}
    assert set(_int4_layers(model)) == mlp | {"lm_head"}
    assert "layers.0.q_proj" in seen and "layers.0.down_proj" not in seen  # skip is decided first
    assert fourbit.nn.linear_targets(TinyLM(), fourbit.Int4WeightOnlyConfig(filter=only_mlp)) == \
        [f"layers.{i}.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]


def test_quantize_errors_name_the_problem():
    model = TinyLM(layers=1)
    with pytest.raises(TypeError, match=r"not both.*\['group_size'\]"):
        fourbit.quantize_(model, fourbit.Int4WeightOnlyConfig(), group_size=32)
    with pytest.raises(TypeError, match="'group_sise'.*did you mean 'group_size'"):
        fourbit.quantize_(model, group_sise=32)
    with pytest.raises(TypeError, match="'group_sise'"):
        fourbit.quantize_(model, {"group_sise": 32})
    with pytest.raises(ValueError, match="got 100"):
        fourbit.quantize_(model, group_size=100)
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        fourbit.quantize_(model, backend="tpu")
    with pytest.raises(ValueError, match="method 'gptq' needs calibration data"):
        fourbit.quantize_(model, method="gptq")
    with pytest.raises(TypeError, match="Int4WeightOnlyConfig.*got 64"):
        fourbit.quantize_(model, 64)  # the old positional group_size: now a keyword
    assert not _int4_layers(model)  # nothing changed on the way to an error
