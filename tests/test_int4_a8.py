"""The "cpu-a8" backend of int4_mm (W4A8: the int4 weight against activations quantized to
int8 per block of 32 columns) and "cpu-int" (the same kernel on fixed-point activations, two
or three int8 digits each by x's dtype): their spec (reference.int4_mm_a8, digits 1 / 2 / 3)
against plain arithmetic and the rounding bound it promises, the C++ kernel on every instruction set this
CPU has against that spec, its error against the W4A16 result, non-finite inputs, Int4Linear /
torch.compile, and bad input."""

import os

import pytest
import torch

import fourbit
from fourbit import reference
from fourbit.backends import _C, available_backends
from fourbit.format import GROUP_SIZES
from fourbit.nn import Int4Linear
from helpers import TinyLM, random_int4_weight

HAS_KERNEL = "cpu-a8" in available_backends("cpu")
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="fourbit._C has no int4_a8_mm_cpu (not built)")


def _isas() -> list[str]:
    """The instruction sets the W4A8 kernel runs here (FOURBIT_CPU_ISA forces each; "avx512"
    runs its VNNI path only where the CPU has VNNI, else AVX2, so it counts only then)."""
    found = []
    for isa in ("portable", "avx2", "avx512") if HAS_KERNEL else ():
        os.environ["FOURBIT_CPU_ISA"] = isa
        try:
            ran = _C.int4_a8_mm_cpu_isa()
        except RuntimeError:
            continue
        finally:
            del os.environ["FOURBIT_CPU_ISA"]
        if ran.startswith(isa):
            found.append(isa)
    return found


ISAS = _isas()
BACKENDS = ("cpu-a8", "cpu-int")


def digits_of(backend: str, dtype: torch.dtype) -> int:
    """int8 digits per activation: 1 for "cpu-a8"; for "cpu-int" 3 (24-bit) on fp32 x, else 2."""
    return 1 if backend == "cpu-a8" else 3 if dtype == torch.float32 else 2


def half_step(x: torch.Tensor, digits: int = 1) -> torch.Tensor:
    """[M, K] fp64: how far each x may be from xq d: half of d = max|x| / 127 per block of 32
    (round to nearest), for more digits half of d / 256^(digits - 1), plus for those the fp32
    rounding of t = x / d (an ulp of 127, 2^-17 d); computed here from x, not from the spec."""
    m, k = x.shape
    k32 = -(-k // 32) * 32
    xp = torch.zeros(m, k32, dtype=torch.float64)
    xp[:, :k] = x.double()
    d = (xp.view(m, -1, 32).abs().amax(-1) / 127).repeat_interleave(32, 1)[:, :k]
    return d / 2 if digits == 1 else d * (0.5 / 256 ** (digits - 1) + 2.0**-17)


def centred_offsets(weight) -> torch.Tensor:
    """The weight's offsets per column [N, K] once the weight is centred at q = 8: dense =
    (q - 8) s + m' with m' = m + 8 s (in fp32, as the kernel widens and adds them)."""
    n, k = weight.shape
    centred = weight.offsets.float() + 8 * weight.scales.float()
    return centred.double().repeat_interleave(weight.group_len, 1)[:, :k]


def a8_bound(x: torch.Tensor, dense: torch.Tensor, centred: torch.Tensor, digits: int = 1) -> torch.Tensor:
    """[M, N]: the most W4A8 (more digits: fixed point) may differ from x @ dense.T: each x within
    half_step of xq d, times |(q - 8) s| = |dense - m'| summed (the offset term takes the exact
    x); computed here from x and the fp64 dense weight, not from the spec."""
    return half_step(x, digits) @ (dense - centred).abs().T


# ---- the spec ----

def test_activation_quantization_is_absmax_per_block():
    x = torch.randn(3, 100) * torch.tensor([1.0, 30.0, 1e-3]).unsqueeze(1)
    x[1, 40:64] = 0  # a block that is all zero past its first 8 columns
    x[2, 64:96] = 0  # an all-zero block
    xq, d = reference.quantize_activations_int8(x)
    assert xq.shape == (3, 128) and xq.dtype == torch.int8 and d.shape == (3, 4)
    assert (xq[:, 100:] == 0).all()
    blocks = torch.zeros(3, 128)
    blocks[:, :100] = x
    amax = blocks.view(3, 4, 32).abs().amax(-1)
    torch.testing.assert_close(d, amax / 127, rtol=0, atol=0)
    assert (xq.view(3, 4, 32).abs().amax(-1)[amax > 0] == 127).all()  # the largest maps to +-127
    assert d[2, 2] == 0 and (xq[2, 64:96] == 0).all()
    err = (xq.float() * d.repeat_interleave(32, 1) - blocks).abs()
    assert (err <= d.repeat_interleave(32, 1) / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("digits", [2, 3])
def test_fixed_point_quantization_is_the_int8_one_refined(digits):
    """digits 2 / 3: xq = round(unit x / d) with the one-digit d and unit = 256^(digits - 1),
    scale d / unit; x within half_step of xq d, far closer than one digit gets."""
    x = torch.randn(4, 200) * torch.tensor([1.0, 30.0, 1e-3, 1e4]).unsqueeze(1)
    x[3, :32] = 0
    x[3, 5] = 1e6  # one large value in a block: the others keep 16 / 24 bits of its scale
    unit = 256 ** (digits - 1)
    one, d1 = reference.quantize_activations_int8(x)
    fine, d = reference.quantize_activations_int8(x, digits=digits)
    assert fine.dtype == (torch.int16 if digits == 2 else torch.int32) and fine.shape == one.shape
    torch.testing.assert_close(d, d1 / unit, rtol=0, atol=0)
    assert fine.abs().max() == 127 * unit and ((fine.long() - unit * one.long()).abs() <= unit // 2).all()
    blocks = torch.zeros(4, 224)
    blocks[:, :200] = x
    err = (fine.double() * d.double().repeat_interleave(32, 1) - blocks.double()).abs()[:, :200]
    err1 = (one.double() * d1.double().repeat_interleave(32, 1) - blocks.double()).abs()[:, :200]
    assert (err <= half_step(x, digits)).all()
    assert err.max() < err1.max() / 100
    with pytest.raises(ValueError, match="digits must be 1, 2 or 3"):
        reference.quantize_activations_int8(x, digits=4)
    assert [reference.fixed_point_digits(t) for t in (torch.float32, torch.bfloat16, torch.float16)] == [3, 2, 2]


@pytest.mark.parametrize("digits", [1, 2, 3])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["offset", "symmetric"])
def test_spec_is_the_quantized_product_within_its_rounding_bound(group_size, symmetric, digits):
    """reference.int4_mm_a8 against plain arithmetic: (xq d) @ (w - m').T + x @ m'.T with the
    offsets m' of the weight centred at q = 8, and within a8_bound of the exact x @ w.T."""
    n, k = 40, 300
    weight, dense = random_int4_weight(n, k, group_size, symmetric, torch.float32)
    x = torch.randn(5, k)
    out = reference.int4_mm_a8(x, weight.qweight, weight.scales, weight.offsets, weight.group_len,
                               digits=digits).double()
    xq, d = reference.quantize_activations_int8(x, digits)
    xd = (xq.double() * d.double().repeat_interleave(32, 1))[:, :k]
    o = centred_offsets(weight)
    if symmetric:
        assert (o == 0).all()  # nothing of a symmetric weight rides on the sums of x
    torch.testing.assert_close(out, xd @ (dense - o).T + x.double() @ o.T, rtol=1e-6, atol=1e-5)
    exact = x.double() @ dense.T
    slack = 1e-4 if digits == 1 else 2e-6  # + the fp32 rounding of out
    assert ((out - exact).abs() <= a8_bound(x, dense, o, digits) + slack).all()
    if digits < 3:  # (24-bit x: its error is that of out's fp32 rounding)
        assert (out - exact).abs().max() > slack  # it does quantize x


# ---- the kernel against the spec ----

# (M, N, K, group_size): M around the kernels' row blocks (1..4, 8, 17); N not a multiple of
# their 4 weight rows; K with a partial last chunk (576 = 4.5 x 128, 1000 padded to the group);
# every group length the kernel takes, the whole row (-1) included.
# M = 2048 (a prefill): torch's fp32 division of a large tensor may round an ulp off, which
# the spec must not inherit (it divides in fp64 and rounds once, as the kernel's fp32 division).
CASES = [(1, 64, 576, 32), (2, 37, 576, 64), (3, 50, 1000, 128), (4, 33, 1024, 256), (5, 20, 576, -1),
         (8, 41, 4096, 128), (17, 9, 160, 32), (1, 7, 96, -1), (6, 130, 2048, 64), (2048, 8, 576, 32)]


@needs_kernel
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[f"M{m}-N{n}-K{k}-g{g}" for m, n, k, g in CASES])
def test_kernel_matches_spec(case, dtype, isa, backend, monkeypatch):
    monkeypatch.setenv("FOURBIT_CPU_ISA", isa)
    m, n, k, group_size = case
    digits = digits_of(backend, dtype)
    weight, dense = random_int4_weight(n, k, group_size, False, dtype)
    x = (torch.randn(m, k) * torch.rand(1, k) * 4).to(dtype)  # columns of unequal size, as in a model
    bias = torch.randn(n).to(dtype)
    out = fourbit.int4_linear(x, weight, bias, backend=backend)
    assert out.dtype == dtype and out.shape == (m, n)
    want = reference.int4_mm_a8(x, weight.qweight, weight.scales, weight.offsets, weight.group_len, bias, digits)
    # Both are the same sums in another order: fp32 rounding of terms bounded by |x| |w|, plus
    # the output dtype's rounding.
    scale = x.double().abs() @ dense.abs().T + bias.double().abs()
    eps = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert ((out.double() - want.double()).abs() <= eps * scale + 1e-5).all()
    exact = x.double() @ dense.T + bias.double()
    bound = a8_bound(x, dense, centred_offsets(weight), digits)
    assert ((out.double() - exact).abs() <= bound + eps * scale + 1e-4).all()


@needs_kernel
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("isa", ISAS)
def test_kernel_quantizes_x_as_the_spec_does(isa, backend, monkeypatch):
    """A one-hot weight (w = identity: q = 8 + identity, s = 1, m = -8, so that centred at
    q = 8 nothing rides on the sums of x) reads back xq * d column by column: the kernel's
    quantized x equals the spec's exactly (every digit), ties to even included, at decode and
    prefill M."""
    monkeypatch.setenv("FOURBIT_CPU_ISA", isa)
    k = 576
    qweight = fourbit.format.pack_int4(8 + torch.eye(k, dtype=torch.int32))
    ones, zeros = torch.ones(k, k // 32), -8 * torch.ones(k, k // 32)
    for m in (1, 2048):
        x = torch.randn(m, k) * torch.rand(1, k) * 8
        x[0, :32] = torch.arange(32) - 15.5  # max 15.5: 127 / 15.5 * (j - 15.5) hits halves
        x[0, 32:64] = (torch.arange(32) - 15.5) * (1 + 1 / 64)  # and lower digits at halves
        out = torch.ops.fourbit.int4_mm(x, qweight, ones, zeros, 32, None, backend)
        xq, d = reference.quantize_activations_int8(x, digits_of(backend, x.dtype))
        torch.testing.assert_close(out, xq.float() * d.repeat_interleave(32, 1), rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("digits, low, high", [(1, 1e-4, 1e-2), (2, 2e-7, 1e-4), (3, 0, 1e-6)])
def test_error_against_w4a16_is_small_and_real(digits, low, high):
    """The W4A8 result differs from the W4A16 one (it quantizes x), by the relative error
    documented in the README (well under 1% on Gaussian activations); 16-bit x ("cpu-int" on
    bf16 / fp16) by about 256x less, 24-bit x ("cpu-int" on fp32) by no more than fp32 sums in
    another order do."""
    from fourbit.backends import cpu_int4
    weight, dense = random_int4_weight(512, 4096, 128, False, torch.float16)
    x = torch.randn(4, 4096)
    a8 = cpu_int4.int4_mm_a8(x, weight.qweight, weight.scales, weight.offsets, weight.group_len, digits=digits)
    a16 = fourbit.int4_linear(x, weight, backend="cpu").double()
    rel = float((a8.double() - a16).norm() / a16.norm())
    assert low < rel < high


@needs_kernel
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("isa", ISAS)
def test_rows_fixed_point_cannot_hold_take_the_w4a16_kernel(isa, backend, monkeypatch):
    """A row with NaN, inf, a block past 2^64 or a nonzero block below 2^-64 (fp32 scales and
    sums would overflow or underflow) is the W4A16 kernel's result for that row, bit for bit:
    NaN / inf where x @ W.T has them, huge and tiny rows accurate; the other rows are what
    they are alone. The spec says the same."""
    monkeypatch.setenv("FOURBIT_CPU_ISA", isa)
    weight, dense = random_int4_weight(20, 256, 64, True, torch.float16)
    x = torch.randn(6, 256)
    x[0, 5] = float("nan")
    x[2, 200] = float("inf")
    x[3, 64:96] *= 1e30
    x[4, :32] *= 1e-25
    redo, kept = [0, 2, 3, 4], [1, 5]
    out = fourbit.int4_linear(x, weight, backend=backend)
    w4a16 = fourbit.int4_linear(x[redo], weight, backend="cpu")
    torch.testing.assert_close(out[redo], w4a16, rtol=0, atol=0, equal_nan=True)
    assert out[0].isnan().all() and out[2].isinf().any() and out[kept].isfinite().all()
    torch.testing.assert_close(out[kept], fourbit.int4_linear(x[kept], weight, backend=backend), rtol=0, atol=0)
    exact = x[3:5].double() @ dense.T
    assert float((out[3:5].double() - exact).norm() / exact.norm()) < 1e-5
    want = reference.int4_mm_a8(x, weight.qweight, weight.scales, weight.offsets, weight.group_len,
                                digits=digits_of(backend, x.dtype))
    torch.testing.assert_close(want[redo], reference.int4_mm(x[redo], weight.qweight, weight.scales,
                                                              weight.offsets, weight.group_len),
                               rtol=0, atol=0, equal_nan=True)


@needs_kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_zero_inputs(backend):
    weight, _ = random_int4_weight(16, 128, 32, False, torch.float32)
    assert fourbit.int4_linear(torch.randn(0, 128), weight, backend=backend).shape == (0, 16)
    out = fourbit.int4_linear(torch.zeros(2, 128), weight, torch.ones(16), backend=backend)
    torch.testing.assert_close(out, torch.ones(2, 16))


# ---- in modules ----

@needs_kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_int4_linear_module_eager_and_compiled(backend):
    layer = Int4Linear.from_linear(torch.nn.Linear(256, 96), group_size=32, backend=backend)
    x = torch.randn(3, 7, 256)
    eager = layer(x)
    want = reference.int4_mm_a8(x.reshape(-1, 256), layer.qweight, layer.scales, layer.offsets, 32, layer.bias,
                                digits_of(backend, x.dtype))
    torch.testing.assert_close(eager.reshape(-1, 96), want, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_a_quantized_model_runs_on_it():
    torch.manual_seed(0)
    model = TinyLM()
    fourbit.quantize_(model, fourbit.Int4WeightOnlyConfig(group_size=32, backend="cpu-a8"))
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert layers and all(m.backend == "cpu-a8" for m in layers)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        a8 = model(ids)
        for m in layers:
            m.backend = "cpu"
        a16 = model(ids)
    assert a8.isfinite().all()
    assert 0 < float((a8 - a16).norm() / a16.norm()) < 0.05


# ---- bad input ----

@needs_kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_group_length_is_refused(backend):
    """Int4Weight's group sizes all run; a raw weight of 96-column groups (two per 192-column
    row) is refused by the op and by the kernel, naming what it takes."""
    qweight = torch.randint(-2**31, 2**31 - 1, (8, 24), dtype=torch.int32)
    scales = offsets = torch.ones(8, 2)
    with pytest.raises(ValueError, match=backend + r"' takes group lengths 32, 64, a multiple of 128.*not 96"):
        torch.ops.fourbit.int4_mm(torch.randn(1, 192), qweight, scales, offsets, 96, None, backend)
    with pytest.raises(RuntimeError, match="group_len must be 32, 64, a multiple of 128"):
        _C.int4_a8_mm_cpu(torch.randn(1, 192), qweight, scales, offsets, 96)


@needs_kernel
def test_kernel_checks_its_inputs():
    weight, _ = random_int4_weight(32, 256, 128, False, torch.float32)
    x = torch.randn(2, 256)
    cases = [
        ((x.double(), weight.qweight, weight.scales, weight.offsets, 128), "x must be"),
        ((x, weight.qweight.float(), weight.scales, weight.offsets, 128), "qweight"),
        ((x, weight.qweight, weight.scales[:, :1], weight.offsets, 128), "scales"),
        ((x, weight.qweight, weight.scales, weight.offsets.int(), 128), "offsets"),
        ((x, weight.qweight, weight.scales, weight.offsets, 64), "scales"),
        ((torch.randn(2, 300), weight.qweight, weight.scales, weight.offsets, 128), "K"),
        ((x[0], weight.qweight, weight.scales, weight.offsets, 128), "2-D"),
    ]
    for args, word in cases:
        with pytest.raises(RuntimeError, match=word):
            _C.int4_a8_mm_cpu(*args)
    with pytest.raises(RuntimeError, match="digits must be 1 .*, 2 or 3 .* or 0"):
        _C.int4_a8_mm_cpu(x, weight.qweight, weight.scales, weight.offsets, 128, None, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_off_the_cpu_is_refused(backend):
    weight, _ = random_int4_weight(8, 128, 32, False, torch.float32)
    with pytest.raises(RuntimeError, match=f"backend '{backend}' cannot run here"):
        fourbit.int4_linear(torch.randn(1, 128, device="meta"), weight.to("meta"), backend=backend)


def test_auto_never_picks_it():
    """Its numerics are not the reference's: "auto" keeps the W4A16 kernel on the CPU."""
    from fourbit import dispatch
    for m in (1, 4, 16, 1024):
        assert dispatch.choose_backend(torch.device("cpu"), torch.float32, m, 4096, 4096) != "cpu-a8"
