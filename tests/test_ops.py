import pytest
import torch

import fourbit
from conftest import backend_cases, need
from fourbit import ops
from fourbit.format import GROUP_SIZES, dequantize
from helpers import DTYPES, assert_matmul_accuracy, random_int4_weight

# Every (device, backend) pair with an int4 kernel; Triton on the CPU runs in test_triton.py
# (its interpreter is too slow for these shapes).
CASES = backend_cases("int4_mm", interpreter=False)
# (N, K): Llama-2-7B layer shapes scaled down 16x along N, and awkward ones.
SHAPES = {"qkv/16": (768, 4096), "down/16": (256, 11008), "N1000-K576": (1000, 576), "K1000": (96, 1000),
          "N37-K1000": (37, 1000)}
ROWS = [1, 2, 3, 7, 16, 33]


def linear_or_refusal(x, weight, bias=None, backend="auto"):
    """int4_linear(x, weight, bias); None where the backend promises to refuse x's dtype
    (the CUDA kernel takes fp16/bf16 only: fp32 must raise its TypeError, checked here)."""
    if backend == "cuda" and x.dtype == torch.float32:
        with pytest.raises(TypeError, match="float16 or bfloat16"):
            fourbit.int4_linear(x, weight, bias, backend=backend)
        return None
    return fourbit.int4_linear(x, weight, bias, backend=backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("m", ROWS)
def test_int4_linear_matches_reference(m, shape, dtype, backend, device):
    need(device, backend)
    n, k = shape
    weight, dense = random_int4_weight(n, k, 128, False, dtype, device)
    x = torch.randn(m, k, device=device).to(dtype)
    out = linear_or_refusal(x, weight, backend=backend)
    if out is not None:
        assert_matmul_accuracy(out, x, dense)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("symmetric", [False, True], ids=["offset", "symmetric"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_every_group_size_and_mode(group_size, symmetric, dtype, backend, device):
    need(device, backend)
    n, k = 200, 1000  # K not a multiple of any group size: padded groups
    weight, dense = random_int4_weight(n, k, group_size, symmetric, dtype, device)
    x = torch.randn(5, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    out = linear_or_refusal(x, weight, bias, backend)
    if out is not None:
        assert_matmul_accuracy(out, x, dense, bias)


@pytest.mark.parametrize("device,backend", CASES)
def test_batch_dims_noncontiguous_and_mixed_dtypes(backend, device):
    need(device, backend)
    weight, dense = random_int4_weight(64, 256, 64, False, torch.bfloat16, device)  # bf16 scales
    x = torch.randn(3, 256, 4, device=device).transpose(1, 2)  # [B, T, K], non-contiguous, fp32
    if backend == "cuda":  # fp16/bf16 only: the mix is fp16 x with bf16 scales
        x = x.half()
    assert not x.is_contiguous()
    out = fourbit.int4_linear(x, weight, backend=backend)
    assert out.shape == (3, 4, 64)
    assert_matmul_accuracy(out.reshape(-1, 64), x.reshape(-1, 256), dense)


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_batch(backend, device):
    need(device, backend)
    weight, _ = random_int4_weight(32, 128, 32, True, torch.float16, device)
    out = fourbit.int4_linear(torch.randn(0, 7, 128, device=device).half(), weight, backend=backend)
    assert out.shape == (0, 7, 32) and out.dtype == torch.float16


def test_auto_picks_the_cpu_kernel_and_runs_it(monkeypatch):
    """On the CPU "auto" must choose a C++ kernel when it is built (measured faster than
    torch's fp32 matmul, dispatch.py), for every M and dtype: the fixed-point one for few rows
    (dispatch.CPU_INT_MAX_M[dtype]), the W4A16 one past them; and int4_linear must really run what
    was chosen: the op is handed the backend choose_int4_kernel returned."""
    if ops._C is None:
        assert fourbit.choose_backend(torch.device("cpu"), torch.float32, 1, 4096, 4096) == "torch"
        return
    for dtype in DTYPES.values():
        for m, want in ((1, "cpu-int"), (16, "cpu"), (1024, "cpu")):
            assert fourbit.choose_backend(torch.device("cpu"), dtype, m, 4096, 4096) == want
    assert fourbit.choose_backend(torch.device("meta"), torch.float32, 1, 64, 64) == "torch"
    chosen = []
    monkeypatch.setattr(ops, "_int4_mm", lambda *args: chosen.append(args[-1]) or torch.zeros(args[0].shape[0], 32))
    weight, _ = random_int4_weight(32, 256, 128, False, torch.float32)
    fourbit.int4_linear(torch.randn(1, 256), weight)
    fourbit.int4_linear(torch.randn(16, 256), weight)
    assert chosen == ["cpu-int", "cpu"]


def test_errors_name_the_problem():
    weight, _ = random_int4_weight(32, 256, 128, False, torch.float32)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        fourbit.int4_linear(torch.randint(0, 3, (2, 256)), weight)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        fourbit.int4_linear(torch.randn(2, 256, dtype=torch.float64), weight)
    with pytest.raises(ValueError, match="K = 256"):
        fourbit.int4_linear(torch.randn(2, 255), weight)
    with pytest.raises(ValueError, match="is on meta"):
        fourbit.int4_linear(torch.randn(2, 256, device="meta"), weight)
    with pytest.raises(ValueError, match="bias must have shape"):
        fourbit.int4_linear(torch.randn(2, 256), weight, torch.randn(31))
    with pytest.raises(TypeError, match="Int4Weight"):
        fourbit.int4_linear(torch.randn(2, 256), torch.randn(32, 256))
    with pytest.raises(ValueError, match="unknown backend"):
        fourbit.int4_linear(torch.randn(2, 256), weight, backend="tpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        fourbit.int4_linear(torch.randn(2, 256), weight, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run here"):
        fourbit.int4_linear(torch.randn(2, 256, device="meta"), weight.to("meta"), backend="cpu")


CPU_ISAS = ["portable", "avx2", "avx512"]


def force_cpu_isa(isa: str, monkeypatch) -> None:
    """Make the CPU kernel run its `isa` path (FOURBIT_CPU_ISA) for this test; skip if the
    CPU lacks it."""
    if ops._C is None:
        pytest.skip("needs fourbit._C")
    monkeypatch.setenv("FOURBIT_CPU_ISA", isa)
    try:
        assert ops._C.int4_mm_cpu_isa() == isa
    except RuntimeError as error:
        assert "does not support" in str(error)
        pytest.skip(f"this CPU has no {isa}")


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_kernel_every_instruction_set(isa, monkeypatch):
    """FOURBIT_CPU_ISA forces a path; each the CPU has must match the reference."""
    force_cpu_isa(isa, monkeypatch)
    for m, (n, k), group_size in [(1, (37, 1000), -1), (1, (64, 576), 32), (3, (40, 520), 64), (9, (33, 1000), 256)]:
        weight, dense = random_int4_weight(n, k, group_size, False, torch.float32)
        x = torch.randn(m, k)
        bias = torch.randn(n)
        assert_matmul_accuracy(fourbit.int4_linear(x, weight, bias, backend="cpu"), x, dense, bias)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_kernel_reads_16_bit_scales_as_their_fp32_widening(isa, monkeypatch):
    """The dot-product schedule (M <= 3) widens fp16 / bf16 scales and offsets one pass of
    weight rows at a time, inside the kernel: widening is exact, so the result is bit for bit
    the kernel's result on the same scales given as fp32, for scales and offsets of either
    dtype (fp32 offsets beside 16-bit scales: exact imports), partial passes (N = 37) and a
    word tail (K = 1000); and it matches the fp64 reference."""
    force_cpu_isa(isa, monkeypatch)
    for m, (n, k), group_size in [(1, (37, 1000), -1), (1, (64, 576), 32), (2, (45, 520), 64), (3, (21, 1024), 128)]:
        weight, _ = random_int4_weight(n, k, group_size, False, torch.float32)
        x = torch.randn(m, k)
        bias = torch.randn(n)
        glen = weight.group_len
        for scale_dtype, offset_dtype in [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]:
            scales, offsets = weight.scales.to(scale_dtype), weight.offsets.to(offset_dtype)
            out = ops._C.int4_mm_cpu(x, weight.qweight, scales, offsets, glen, bias)
            widened = ops._C.int4_mm_cpu(x, weight.qweight, scales.float(), offsets.float(), glen, bias)
            assert torch.equal(out, widened), (m, n, k, group_size, scale_dtype, offset_dtype)
            dense = dequantize(weight.qweight, scales, offsets, glen, k, torch.float64)
            assert_matmul_accuracy(out, x, dense, bias)

@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_kernel_rows_past_the_last_full_register(isa, monkeypatch):
    """Rows whose words end past the last full register: on AVX-512 8 or more such words run
    one half-width (8-word) block, then the rest one word at a time. Every dot-product case
    (M = 1 with two weight rows at a time and an odd one, M = 2, 3) and every group kind
    (32: two groups in the half block; 64: one; one group per row), with and without words
    after the half block, against the fp64 reference."""
    force_cpu_isa(isa, monkeypatch)
    # K_padded / 8 words per row: 72 = 4 x 16 + 8 (SmolLM2's 576), 124 = 7 x 16 + 12, 125, 76.
    for m, (n, k), group_size in [(1, (19, 576), 32), (2, (9, 576), 64), (3, (11, 576), -1), (1, (21, 992), 32),
                                  (2, (17, 1000), -1), (1, (13, 608), 32), (3, (8, 992), 32)]:
        weight, dense = random_int4_weight(n, k, group_size, False, torch.float32)
        x = torch.randn(m, k)
        bias = torch.randn(n)
        assert_matmul_accuracy(fourbit.int4_linear(x, weight, bias, backend="cpu"), x, dense, bias)


def test_cpu_kernel_checks_its_inputs():
    weight, _ = random_int4_weight(32, 256, 128, False, torch.float32)
    x = torch.randn(2, 256)
    cases = [
        ((x.double(), weight.qweight, weight.scales, weight.offsets, 128), "x"),
        ((x, weight.qweight.float(), weight.scales, weight.offsets, 128), "qweight"),
        ((x, weight.qweight, weight.scales[:, :1], weight.offsets, 128), "scales"),
        ((x, weight.qweight, weight.scales, weight.offsets.int(), 128), "offsets"),
        ((x, weight.qweight, weight.scales, weight.offsets[:, :1], 128), "offsets"),
        ((x, weight.qweight, weight.scales, weight.offsets, 100), "group"),
        ((torch.randn(2, 300), weight.qweight, weight.scales, weight.offsets, 128), "K"),
    ]
    for args, word in cases:
        with pytest.raises(RuntimeError, match=f"(?i){word}"):
            ops._C.int4_mm_cpu(*args)


@pytest.mark.skipif(ops._C is None, reason="the op is registered by fourbit._C")
@pytest.mark.parametrize("device,backend", backend_cases("int4_mm"))
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_opcheck(requires_grad, device, backend):
    """Schema, fake and implementation agree on every backend (Triton through its interpreter
    on the CPU); the "cuda" backend takes its own layout (format.prepack_mma_weight). With
    x and bias requiring grad, opcheck also checks the autograd registration and the backward
    under AOT dispatch (torch.compile's) against eager (test_autograd.py checks the values)."""
    need(device, backend)
    weight, _ = random_int4_weight(48, 320, 64, False, torch.bfloat16, device)
    tensors = (weight.qweight, weight.scales, weight.offsets)
    if backend == "cuda":
        tensors = fourbit.format.prepack_mma_weight(*tensors, 320)
    for x, bias in [(torch.randn(3, 320, device=device), None),
                    (torch.randn(1, 320, device=device).bfloat16(), torch.randn(48, device=device).bfloat16())]:
        if backend == "cuda" and x.dtype == torch.float32:
            continue
        for t in (x, bias) if requires_grad else ():
            if t is not None:
                t.requires_grad_()
        args = (x, *tensors, 64, bias, backend)
        torch.library.opcheck(torch.ops.fourbit.int4_mm.default, args)
        # opcheck's autograd checks pass vacuously on an output without autograd history.
        assert (torch.ops.fourbit.int4_mm.default(*args).grad_fn is not None) == requires_grad
