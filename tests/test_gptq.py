"""GPTQ and AWQ-style scaling (fourbit.quantizers): the GPTQ update against a dense reference
solve, blocked == unblocked, act-order through the kernels, integer zero points, calibrated
quantize_ on a tiny Llama against round to nearest, and the promised errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fourbit
from fourbit.cli import main
from fourbit.export import integer_zero_points
from fourbit.format import unpack_int4
from fourbit.models.llama import LlamaConfig
from fourbit.models.loader import build_model
from fourbit.models.random_weights import RandomCheckpoint
from fourbit.quantizers import calibration_ids, gptq_quantize, rtn_quantize
from fourbit.quantizers.gptq import grid, round_to_grid, search_grid


def correlated_inputs(tokens: int, k: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Activations with correlated channels of very different sizes (as a layer's inputs are)."""
    g = torch.Generator().manual_seed(seed)
    rank = max(2, k // 8)
    x = torch.randn(tokens, rank, generator=g, dtype=dtype) @ torch.randn(rank, k, generator=g, dtype=dtype)
    x = x + 0.3 * torch.randn(tokens, k, generator=g, dtype=dtype)
    return x * torch.logspace(-1, 1, k, dtype=dtype)[torch.randperm(k, generator=g)]


def problem(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = correlated_inputs(4 * k, k, seed)
    return w, 2 * x.T @ x


def reference_gptq(w, h, group_size, symmetric, act_order, percdamp=0.01, grid_search=False):
    """GPTQ written out plainly: channels in order, each rounded on its group's grid (chosen
    when the group starts, from the current weights), then every channel not yet rounded
    re-solved exactly (a dense solve of the quadratic with the rounded ones fixed). With
    act_order "static" the grids are those of the original weights' channel-order groups and
    the codes are in channel order. grid_search: each grid by search_grid, weighted by the
    undamped diag(H). Returns (q codes [N, K] in visiting order, or channel order for
    "static"; the quantized weight [N, K] in channel order)."""
    n, k = w.shape
    energy = h.diagonal().clone()
    h = h.clone()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    glen = -(-k // 8) * 8 if group_size == -1 else group_size

    def group_grid(weights, channels):
        if grid_search:
            return search_grid(weights, symmetric, torch.float32, energy[channels])
        return grid(weights, symmetric, torch.float32)
    fixed_grids = [group_grid(w[:, start:start + glen], torch.arange(start, min(start + glen, k)))
                   for start in range(0, k, glen)]
    v, codes = w.clone(), torch.zeros(n, k, dtype=torch.uint8)
    for idx in range(k):
        j = order[idx]
        if act_order == "static":
            s, z = fixed_grids[int(j) // glen]
        elif idx % glen == 0:
            s, z = group_grid(v[:, order[idx:idx + glen]], order[idx:idx + glen])
        q = round_to_grid(v[:, j], s, z)
        codes[:, j if act_order == "static" else idx] = q.to(torch.uint8)
        v[:, j] = (q - z) * s
        fixed, free = order[: idx + 1], order[idx + 1:]
        if len(free):  # d = v - w; minimize d H d^T over d_free: d_free = -H_ff^-1 H_f,fixed d_fixed
            d_fixed = v[:, fixed] - w[:, fixed]
            d_free = -torch.linalg.solve(h[free][:, free], h[free][:, fixed] @ d_fixed.T).T
            v[:, free] = w[:, free] + d_free
    return codes, v


def quadratic_error(w, v, h):
    d = (w - v).double()
    return float(torch.einsum("nk,kl,nl->", d, h.double(), d))


ACT_ORDERS = pytest.mark.parametrize("act_order", [False, True, "static"], ids=["in-order", "act-order", "static"])


@pytest.mark.parametrize("grid_search", [False, True], ids=["minmax", "search"])
@ACT_ORDERS
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [32, -1], ids=lambda g: f"g{g}")
def test_gptq_matches_dense_reference_solve(group_size, symmetric, act_order, grid_search):
    w, h = problem(5, 96, seed=1)
    weight = gptq_quantize(w, h, group_size, symmetric, act_order, block_size=16, grid_search=grid_search)
    codes, v = reference_gptq(w, h, group_size, symmetric, act_order, grid_search=grid_search)
    assert torch.equal(unpack_int4(weight.qweight)[:, :96], codes)
    assert torch.allclose(weight.dequantize(torch.float64), v, rtol=0, atol=1e-6)
    if act_order is True:
        assert torch.equal(weight.perm.long(), torch.argsort((h.diagonal()), descending=True, stable=True))
    else:
        assert weight.perm is None


def test_static_act_order_keeps_round_to_nearest_grids():
    """"static" rounds on the grids round to nearest picks (so no perm is needed), yet its
    error feedback in activation order beats round to nearest and in-order GPTQ on them."""
    w, h = problem(16, 256, seed=7)
    w, h = w.float(), h.float()
    static = gptq_quantize(w, h, 64, False, "static")
    rtn = rtn_quantize(w, 64, False)
    assert torch.equal(static.scales, rtn.scales) and torch.equal(static.offsets, rtn.offsets)
    assert not torch.equal(static.qweight, rtn.qweight)
    error = quadratic_error(w, static.dequantize(torch.float64), h)
    assert error < 0.7 * quadratic_error(w, rtn.dequantize(torch.float64), h)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_search_grid_never_rounds_worse_than_min_max(symmetric):
    """Per row, the searched grid's importance-weighted rounding error is at most min/max's
    (the full range is one of the candidates) and lower on most rows of Gaussian weights."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(200, 64, generator=g)
    importance = torch.rand(64, generator=g) ** 4
    s0, z0 = grid(w, symmetric, torch.float32)
    s1, z1 = search_grid(w, symmetric, torch.float32, importance)

    def error(s, z):
        return ((w - (round_to_grid(w, s[:, None], z[:, None]) - z[:, None]) * s[:, None]) ** 2 * importance).sum(1)
    assert torch.all(error(s1, z1) <= error(s0, z0))
    assert (error(s1, z1) < error(s0, z0)).float().mean() > 0.5
    assert torch.all(s1 <= s0)


@ACT_ORDERS
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1], ids=lambda g: f"g{g}")
def test_blocked_equals_unblocked(group_size, symmetric, act_order):
    w, h = problem(4, 300, seed=2)  # K = 300: no multiple of any group size (padding)
    one_block = gptq_quantize(w, h, group_size, symmetric, act_order, block_size=512, grid_search=True)
    for block_size in (16,):
        blocked = gptq_quantize(w, h, group_size, symmetric, act_order, block_size=block_size, grid_search=True)
        assert torch.equal(blocked.qweight, one_block.qweight)
        assert torch.equal(blocked.scales, one_block.scales) and torch.equal(blocked.offsets, one_block.offsets)
        assert torch.allclose(blocked.dequantize(torch.float64), one_block.dequantize(torch.float64), atol=1e-12)


def test_gptq_lowers_the_quadratic_error_below_rtn():
    """One row, no grouping: GPTQ's weight has a smaller (w - v) H (w - v)^T than rounding to
    nearest on the same grid, on every seed."""
    for seed in range(5):
        w, h = problem(1, 128, seed=seed)
        gptq = gptq_quantize(w, h, -1, False).dequantize(torch.float64)
        rtn = rtn_quantize(w.float(), -1, False).dequantize(torch.float64)
        assert quadratic_error(w, gptq, h) < 0.7 * quadratic_error(w, rtn, h)


def test_dead_channels_are_zeroed():
    w, h = problem(3, 64, seed=3)
    h[5, :] = h[:, 5] = 0
    weight = gptq_quantize(w, h, 32, False)
    assert torch.all(weight.dequantize()[:, 5] == 0)
    assert torch.isfinite(weight.dequantize()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_asymmetric_offsets_are_integer_zero_points(dtype):
    """m = -z * s exactly, so the weight exports to compressed-tensors (and GPTQ) with no loss."""
    w, h = problem(8, 128, seed=4)
    weight = gptq_quantize(w.float(), h.float(), 64, False, dtype=dtype)
    assert weight.scales.dtype == dtype
    z, why, where = integer_zero_points(weight, dtype)
    assert z is not None, (why, where)
    q = unpack_int4(weight.qweight).view(8, -1, 64).double()
    exact = ((q - z.double().unsqueeze(-1)) * weight.scales.double().unsqueeze(-1)).view(8, -1)
    assert torch.equal(weight.dequantize(torch.float64), exact)  # (q - z) s, computed in fp32, is exact


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_act_order_layer_runs_on_the_kernels(backend):
    """An act-order GPTQ layer's Int4Linear forward equals x @ W_q.T, with W_q the weight
    dequantized in channel order."""
    w, h = problem(48, 256, seed=5)
    weight = gptq_quantize(w.float(), h.float(), 64, False, act_order=True)
    assert weight.perm is not None and not torch.equal(weight.perm, torch.arange(256, dtype=torch.int32))
    layer = fourbit.Int4Linear(256, 48, bias=False, group_size=64, dtype=torch.float32, backend=backend)
    layer.load_weight(weight)
    assert layer.act_order
    x = correlated_inputs(7, 256, seed=6, dtype=torch.float32)
    expected = x.double() @ weight.dequantize(torch.float64).T
    assert torch.allclose(layer(x).double(), expected, rtol=1e-5, atol=1e-4 * float(expected.abs().max()))


# ---- quantize_ with calibration, on a tiny Llama ----------------------------------------------

TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, tie_word_embeddings=True)


def tiny_llama(seed: int = 0):
    """A tiny random Llama whose embeddings are low-rank plus noise, with a few loud channels:
    correlated layer inputs, as in trained models."""
    model = build_model(RandomCheckpoint(TINY, seed=seed), "cpu", torch.float32, quantize=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = torch.randn(256, 8, generator=g) @ torch.randn(8, 64, generator=g)
        emb += 0.1 * torch.randn(256, 64, generator=g)
        emb[:, :4] *= 10
        model.embed_tokens.weight.copy_(emb)
    return model


def output_error(config, calibration, seed=0) -> float:
    reference = tiny_llama(seed)
    model = fourbit.quantize_(tiny_llama(seed), config, calibration=calibration)
    fresh = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(seed + 50))
    with torch.no_grad():
        y = reference(fresh)
        return float((model(fresh) - y).norm() / y.norm())


def test_calibrated_quantize_lowers_output_error():
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    rtn = output_error(fourbit.Int4WeightOnlyConfig(group_size=32), None)
    for options in (dict(method="gptq"), dict(method="gptq", act_order=True)):
        config = fourbit.Int4WeightOnlyConfig(group_size=32, **options)
        assert output_error(config, ids) < 0.5 * rtn, options
    awq_rtn = output_error(fourbit.Int4WeightOnlyConfig(group_size=32, method="awq", awq_rounding="rtn"), ids)
    assert awq_rtn < rtn


def test_calibrated_layers_are_int4_linear_with_their_order():
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    model = fourbit.quantize_(tiny_llama(), method="gptq", act_order=True, group_size=32, calibration=ids)
    layers = [m for m in model.modules() if isinstance(m, fourbit.Int4Linear)]
    assert len(layers) == 4 * TINY.num_layers and all(m.act_order and m.group_size == 32 for m in layers)
    assert isinstance(model.lm_head, torch.nn.Linear)  # skipped (and tied)


def test_text_calibration_through_a_tokenizer_and_load_model(tmp_path):
    class Bytes:
        def encode(self, text):
            return list(text.encode())[:: 1]
    ids = calibration_ids(["hello world " * 100, "more text"], Bytes(), vocab_size=256, seq_len=64, num_seqs=4)
    assert ids.shape == (4, 64) and ids.dtype == torch.int64
    assert calibration_ids("short", Bytes()).shape == (1, 5)
    fourbit.save_model(tiny_llama(), tmp_path)
    model = fourbit.load_model(tmp_path, device="cpu", quantize=dict(method="gptq", group_size=32),
                               calibration=ids)
    assert sum(isinstance(m, fourbit.Int4Linear) for m in model.modules()) == 4 * TINY.num_layers


# ---- the promised errors ----------------------------------------------------------------------

@pytest.mark.parametrize("options, error, named", [
    (dict(act_order=True), ValueError, "act_order applies to GPTQ"),
    (dict(method="awq", awq_rounding="rtn", act_order=True), ValueError, "act_order applies to GPTQ"),
    (dict(act_order=1, method="gptq"), TypeError, "act_order must be True, False or one of"),
    (dict(act_order="weight", method="gptq"), TypeError, "act_order must be True, False or one of"),
    (dict(grid_search=1, method="gptq"), TypeError, "grid_search must be True or False"),
    (dict(percdamp=-0.1), ValueError, "percdamp must be a number in"),
    (dict(percdamp=True), ValueError, "percdamp"),
    (dict(percdamp=float("nan")), ValueError, "percdamp"),
    (dict(awq_rounding="hqq"), ValueError, "unknown awq_rounding 'hqq'"),
    (dict(method="sparsegpt"), ValueError, "unknown method 'sparsegpt'"),
], ids=["act-order-rtn", "act-order-awq-rtn", "act-order-type", "act-order-name", "grid-search", "percdamp",
        "percdamp-bool", "percdamp-nan",
        "awq-rounding", "method"])
def test_config_rejects_impossible_values(options, error, named):
    with pytest.raises(error, match=named):
        fourbit.Int4WeightOnlyConfig(**options)
    with pytest.raises(error, match=named):
        fourbit.Int4WeightOnlyConfig.from_dict(options)


def test_config_round_trips_its_new_fields():
    config = fourbit.Int4WeightOnlyConfig(method="gptq", act_order="static", percdamp=0.05, grid_search=False)
    assert fourbit.Int4WeightOnlyConfig.from_dict({f.name: getattr(config, f.name)
                                                   for f in dataclasses.fields(config)}) == config


def test_calibration_errors_name_the_problem(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="'gptq' needs calibration data"):
        fourbit.quantize_(model, method="gptq")
    with pytest.raises(ValueError, match="method 'rtn' uses none"):
        fourbit.quantize_(model, calibration=torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="needs a tokenizer"):
        fourbit.quantize_(model, method="gptq", calibration=["some text"])
    with pytest.raises(TypeError, match="must be integers"):
        fourbit.quantize_(model, method="gptq", calibration=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[S, T\]"):
        fourbit.quantize_(model, method="gptq", calibration=torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="token id 256, outside the model's vocabulary"):
        fourbit.quantize_(model, method="awq", calibration=torch.full((1, 4), 256))
    with pytest.raises(TypeError, match="calibration must be token ids"):
        fourbit.quantize_(model, method="gptq", calibration=3)
    assert all(type(m) is torch.nn.Linear for m in model.modules() if "proj" in type(m).__name__.lower())
    fourbit.save_model(model, tmp_path)
    with pytest.raises(ValueError, match="'awq' needs calibration data"):
        fourbit.load_model(tmp_path, device="cpu", quantize=dict(method="awq"))
    with pytest.raises(ValueError, match="calibration data is for the calibrated methods"):
        fourbit.load_model(tmp_path, device="cpu", calibration=torch.zeros(1, 4, dtype=torch.int64))


def test_gptq_quantize_errors():
    w, h = problem(2, 64)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        gptq_quantize(w, h, block_size=100)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantize(w, h[:32, :32])
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(w, h, group_size=48)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, -h, percdamp=0.0)
    with pytest.raises(ValueError, match="act_order must be False, True, 'group' or 'static'"):
        gptq_quantize(w, h, act_order="weight")


def test_cli_act_order_needs_gptq(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "smollm2-135m", "unused-out", "--act-order"])
    assert "--act-order" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "smollm2-135m", "unused-out", "--method", "sparsegpt"])
