import pytest
import torch

import fourbit
from fourbit import ops
from fourbit.format import GROUP_SIZES
from conftest import DEVICES
from helpers import DTYPES, assert_matmul_accuracy, random_int4_weight

BACKENDS = ["torch", "cpu", "triton", "cuda"]
# (N, K): Llama-2-7B layer shapes scaled down 16x along N, and awkward ones.
SHAPES = {"qkv/16": (768, 4096), "down/16": (256, 11008), "N1000-K576": (1000, 576), "K1000": (96, 1000),
          "N37-K1000": (37, 1000)}
ROWS = [1, 2, 3, 7, 16, 33]


def need(backend: str, device: str):
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton's interpreter is too slow for these shapes; test_triton.py covers it")
    if backend not in fourbit.available_backends(device):
        pytest.skip(f"backend {backend!r} does not run on {device} in this build")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("m", ROWS)
def test_int4_linear_matches_reference(m, shape, dtype, backend, device):
    need(backend, device)
    n, k = shape
    weight, dense = random_int4_weight(n, k, 128, False, dtype, device)
    x = torch.randn(m, k, device=device).to(dtype)
    out = fourbit.int4_linear(x, weight, backend=backend)
    assert_matmul_accuracy(out, x, dense)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("symmetric", [False, True], ids=["offset", "symmetric"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_every_group_size_and_mode(group_size, symmetric, dtype, backend, device):
    need(backend, device)
    n, k = 200, 1000  # K not a multiple of any group size: padded groups
    weight, dense = random_int4_weight(n, k, group_size, symmetric, dtype, device)
    x = torch.randn(5, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    assert_matmul_accuracy(fourbit.int4_linear(x, weight, bias, backend=backend), x, dense, bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_dims_noncontiguous_and_mixed_dtypes(backend, device):
    need(backend, device)
    weight, dense = random_int4_weight(64, 256, 64, False, torch.bfloat16, device)  # bf16 scales
    x = torch.randn(3, 256, 4, device=device).transpose(1, 2)  # [B, T, K], non-contiguous, fp32
    assert not x.is_contiguous()
    out = fourbit.int4_linear(x, weight, backend=backend)
    assert out.shape == (3, 4, 64)
    assert_matmul_accuracy(out.reshape(-1, 64), x.reshape(-1, 256), dense)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, device):
    need(backend, device)
    weight, _ = random_int4_weight(32, 128, 32, True, torch.float16, device)
    out = fourbit.int4_linear(torch.randn(0, 7, 128, device=device).half(), weight, backend=backend)
    assert out.shape == (0, 7, 32) and out.dtype == torch.float16


def test_auto_picks_an_available_backend():
    for m in (1, 16, 1024):
        chosen = fourbit.choose_backend(torch.device("cpu"), torch.float32, m, 4096, 4096)
        assert chosen in fourbit.available_backends("cpu")
    if ops._C is not None:
        assert fourbit.choose_backend(torch.device("cpu"), torch.float32, 1, 4096, 4096) == "cpu"


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


@pytest.mark.skipif(ops._C is None, reason="needs fourbit._C")
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_cpu_kernel_every_instruction_set(isa, monkeypatch):
    """FOURBIT_CPU_ISA forces a path; each the CPU has must match the reference."""
    monkeypatch.setenv("FOURBIT_CPU_ISA", isa)
    try:
        assert ops._C.int4_mm_cpu_isa() == isa
    except RuntimeError as error:
        assert "does not support" in str(error)
        pytest.skip(f"this CPU has no {isa}")
    for m, (n, k), group_size in [(1, (37, 1000), -1), (1, (64, 576), 32), (3, (40, 520), 64), (9, (33, 1000), 256)]:
        weight, dense = random_int4_weight(n, k, group_size, False, torch.float32)
        x = torch.randn(m, k)
        bias = torch.randn(n)
        assert_matmul_accuracy(fourbit.int4_linear(x, weight, bias, backend="cpu"), x, dense, bias)


@pytest.mark.skipif(ops._C is None, reason="needs fourbit._C")
def test_cpu_kernel_checks_its_inputs():
    weight, _ = random_int4_weight(32, 256, 128, False, torch.float32)
    x = torch.randn(2, 256)
    cases = [
        ((x.double(), weight.qweight, weight.scales, weight.offsets, 128), "x"),
        ((x, weight.qweight.float(), weight.scales, weight.offsets, 128), "qweight"),
        ((x, weight.qweight, weight.scales[:, :1], weight.offsets, 128), "scales"),
        ((x, weight.qweight, weight.scales, weight.offsets.half(), 128), "offsets"),
        ((x, weight.qweight, weight.scales, weight.offsets, 100), "group"),
        ((torch.randn(2, 300), weight.qweight, weight.scales, weight.offsets, 128), "K"),
    ]
    for args, word in cases:
        with pytest.raises(RuntimeError, match=f"(?i){word}"):
            ops._C.int4_mm_cpu(*args)


@pytest.mark.skipif(ops._C is None, reason="the op is registered by fourbit._C")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck(backend):
    weight, _ = random_int4_weight(48, 320, 64, False, torch.bfloat16)
    for x, bias in [(torch.randn(3, 320), None), (torch.randn(1, 320).bfloat16(), torch.randn(48).bfloat16())]:
        torch.library.opcheck(torch.ops.fourbit.int4_mm.default,
                              (x, weight.qweight, weight.scales, weight.offsets, 64, bias, backend))
