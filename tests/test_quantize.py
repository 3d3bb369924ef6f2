import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fourbit
from fourbit.format import GROUP_SIZES
from helpers import DTYPES


def assert_within_half_a_step(w: torch.Tensor, qw: fourbit.Int4Weight):
    """Every weight dequantizes to within s/2 of the original. The slack is the fp32
    evaluation of q*s+m (a few ulps of the values involved), not a looser bound."""
    k = w.shape[1]
    s = qw.scales.float().repeat_interleave(qw.group_len, dim=1)[:, :k]
    m = qw.offsets.float().repeat_interleave(qw.group_len, dim=1)[:, :k]
    err = (qw.dequantize() - w.float()).abs()
    slack = 4 * torch.finfo(torch.float32).eps * (w.float().abs() + m.abs() + 15 * s)
    assert (err <= s / 2 + slack).all(), f"worst error {float((err / s).max()):.4f} steps"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("symmetric", [False, True], ids=["offset", "symmetric"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_quantization_error_is_at_most_half_a_step(group_size, symmetric, dtype):
    w = (torch.randn(48, 1000) * torch.rand(48, 1) * 3).to(dtype)  # rows of different scale
    qw = fourbit.quantize_weight(w, group_size, symmetric)
    assert qw.scales.dtype == dtype and qw.shape == (48, 1000) and qw.symmetric == symmetric
    assert_within_half_a_step(w, qw)
    if symmetric:
        assert torch.equal(qw.offsets, -8 * qw.scales)


@given(n=st.integers(1, 6), k=st.integers(1, 300), group=st.sampled_from(GROUP_SIZES),
       symmetric=st.booleans(), dtype=st.sampled_from(list(DTYPES.values())),
       magnitude=st.sampled_from([1e-3, 1.0, 300.0]), constant_row=st.booleans(), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=80, deadline=None)
def test_quantization_property(n, k, group, symmetric, dtype, magnitude, constant_row, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * magnitude
    if constant_row:
        w[0] = w[0, 0]  # a group with max == min: the offset alone must represent it
    w = w.to(dtype)
    qw = fourbit.quantize_weight(w, group, symmetric)
    assert_within_half_a_step(w, qw)
    q = fourbit.unpack_int4(qw.qweight)
    assert int(q.max()) <= 15 and (q[:, k:] == 0).all()  # padding is canonical zeros


def test_quantize_rejects_bad_weights():
    with pytest.raises(TypeError, match="dtype"):
        fourbit.quantize_weight(torch.randint(0, 4, (8, 64)))
    with pytest.raises(ValueError, match="NaN or inf"):
        fourbit.quantize_weight(torch.tensor([[1.0, float("nan")] * 16]))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        fourbit.quantize_weight(torch.randn(64))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_quantize_names_the_first_nan_or_inf(bad, dtype):
    w = torch.randn(4, 64).to(dtype)
    w[2, 37] = bad
    with pytest.raises(ValueError, match=rf"NaN or inf \(w\[2, 37\] = {bad}\)"):
        fourbit.quantize_weight(w, 32)


# Weights whose int4 form would overflow its dtype: (w dtype, scale/offset dtype, magnitude).
# Row 1's group 1 (columns 32..63 at group_size 32) spans [-big, big].
OVERFLOWS = {"fp32-3e38": (torch.float32, torch.float32, 3e38),
             "bf16-3e38": (torch.bfloat16, torch.bfloat16, 3e38),
             "fp32-1e5-to-fp16": (torch.float32, torch.float16, 1e5)}


@pytest.mark.parametrize("symmetric", [False, True], ids=["offset", "symmetric"])
@pytest.mark.parametrize("case", OVERFLOWS)
def test_quantize_rejects_ranges_the_dtype_cannot_hold(case, symmetric):
    """A group whose int4 weights would be inf or NaN in the compute dtype is an error
    naming the group, never an Int4Weight that dequantizes to NaN."""
    w_dtype, dtype, big = OVERFLOWS[case]
    w = torch.randn(4, 128)
    w[1, 40], w[1, 50] = big, -big
    with pytest.raises(ValueError, match=rf"row 1, group 1 spans .*{dtype}.*wider dtype"):
        fourbit.quantize_weight(w.to(w_dtype), 32, symmetric, dtype=dtype)


@pytest.mark.parametrize("symmetric", [False, True], ids=["offset", "symmetric"])
@pytest.mark.parametrize("w_dtype, dtype, big", [
    (torch.float32, torch.float32, 1e38),     # span 2e38; symmetric q * s reaches 15/7.5 absmax = 2e38
    (torch.bfloat16, torch.bfloat16, 1e38),
    (torch.float32, torch.bfloat16, 1e5),     # the fp16 case's weights fit bf16 and fp32 scales
    (torch.float32, torch.float32, 1e5),
    (torch.float16, torch.float16, 3e4),      # symmetric: 8 s = 32000 fits fp16
], ids=["fp32-1e38", "bf16-1e38", "fp32-1e5-to-bf16", "fp32-1e5", "fp16-3e4"])
def test_quantize_keeps_large_ranges_that_fit(w_dtype, dtype, big, symmetric):
    """Large but representable ranges still quantize to within half a step, with finite weights."""
    w = (torch.rand(4, 128) * 2 - 1) * (big / 2)
    w[1, 40], w[1, 50] = big, -big
    w = w.to(w_dtype)
    qw = fourbit.quantize_weight(w, 32, symmetric, dtype=dtype)
    assert torch.isfinite(qw.dequantize(dtype)).all()
    assert_within_half_a_step(w, qw)


def test_quantize_float16_bound_is_where_the_weights_overflow():
    """fp16 weights near 65504: the offset form holds them (m = min, m + 15 s just over max),
    the symmetric one cannot (its offset -8 s = -8/7.5 absmax is past -65504)."""
    w = torch.randn(4, 64).to(torch.float16)
    w[0, 3], w[0, 4] = 65000, -65000
    qw = fourbit.quantize_weight(w, 32)
    assert torch.isfinite(qw.dequantize(torch.float16)).all()
    assert_within_half_a_step(w, qw)
    with pytest.raises(ValueError, match="row 0, group 0 spans"):
        fourbit.quantize_weight(w, 32, symmetric=True)


# ---- Int4WeightOnlyConfig ----

def test_config_defaults_and_normal_forms():
    config = fourbit.Int4WeightOnlyConfig()
    assert (config.group_size, config.symmetric, config.backend, config.skip, config.filter, config.method) == \
        (128, False, "auto", ("lm_head",), None, "rtn")
    assert fourbit.Int4WeightOnlyConfig(skip="down_proj").skip == ("down_proj",)
    assert fourbit.Int4WeightOnlyConfig(skip=None).skip == ()
    assert fourbit.Int4WeightOnlyConfig.from_dict({"group_size": 64, "skip": ["a", "b"]}) == \
        fourbit.Int4WeightOnlyConfig(group_size=64, skip=("a", "b"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.group_size = 64


@pytest.mark.parametrize("options, error, named", [
    (dict(group_size=100), ValueError, "got 100"),
    (dict(group_size=True), ValueError, "got True"),
    (dict(symmetric="yes"), TypeError, "symmetric.*'yes'"),
    (dict(backend="tpu"), ValueError, "unknown backend 'tpu'"),
    (dict(skip=["lm_head", 3]), TypeError, r"skip.*\['lm_head', 3\]"),
    (dict(filter="lm_head"), TypeError, "filter.*'lm_head'"),
    (dict(method="hqq"), ValueError, "unknown method 'hqq'"),
], ids=["group_size", "group_size-bool", "symmetric", "backend", "skip", "filter", "method"])
def test_config_rejects_impossible_values_naming_them(options, error, named):
    with pytest.raises(error, match=named):
        fourbit.Int4WeightOnlyConfig(**options)
    with pytest.raises(error, match=named):
        fourbit.Int4WeightOnlyConfig.from_dict(options)


def test_config_from_dict_names_unknown_keys_and_suggests_the_field():
    with pytest.raises(TypeError, match=r"\['group_sise'\].*did you mean 'group_size'"):
        fourbit.Int4WeightOnlyConfig.from_dict({"group_sise": 32})
    with pytest.raises(TypeError, match=r"\['bits', 'skp'\].*'skp': did you mean 'skip'"):
        fourbit.Int4WeightOnlyConfig.from_dict({"bits": 4, "skp": (), "group_size": 32})


def test_config_decides_which_layers_are_quantized():
    linear = nn.Linear(64, 32)
    config = fourbit.Int4WeightOnlyConfig(skip=("lm_head", "layers.0.*"),
                                          filter=lambda name, module: module.out_features == 32)
    assert config.quantizes("layers.1.q_proj", linear)
    assert not config.quantizes("lm_head", linear)  # the whole name matches a pattern
    assert not config.quantizes("model.lm_head", linear)  # its last component does
    assert not config.quantizes("layers.0.q_proj", linear)
    assert not config.quantizes("layers.1.down_proj", nn.Linear(64, 16))  # the filter says no
    assert not config.quantizes("layers.1.norm", nn.LayerNorm(64))
    # Subclasses of nn.Linear are left alone (MultiheadAttention reads out_proj.weight itself).
    assert not config.quantizes("attn.out_proj", nn.modules.linear.NonDynamicallyQuantizableLinear(64, 64))
