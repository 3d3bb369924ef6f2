"""The Triton backend against the independent reference: through the interpreter on the
CPU (TRITON_INTERPRET=1, set in conftest.py before triton is imported), natively on CUDA.
Shapes are small on the CPU so the interpreter finishes in a few minutes."""

import pytest
import torch

import fourbit
from conftest import DEVICES
from fourbit import dispatch
from fourbit.backends import triton_import_error, triton_int4
from fourbit.format import GROUP_SIZES
from helpers import DTYPES, assert_matmul_accuracy, random_int4_weight

pytestmark = pytest.mark.skipif(triton_import_error() is not None, reason="triton is not installed")

# (N, K): awkward shapes; M on both sides of the GEMV / GEMM crossover.
SHAPES = {"N1000-K576": (1000, 576), "N40-K1000": (40, 1000), "N96-K256": (96, 256)}
ROWS = [1, 2, 3, 7, 17, 33]


def need(device):
    reason = fourbit.backends.unavailable("triton", torch.device(device))
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("m", ROWS)
def test_triton_matches_reference(m, shape, dtype, device):
    need(device)
    n, k = shape
    weight, dense = random_int4_weight(n, k, 128, False, dtype, device)
    x = torch.randn(m, k, device=device).to(dtype)
    assert_matmul_accuracy(fourbit.int4_linear(x, weight, backend="triton"), x, dense)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", triton_int4.PATHS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("symmetric", [False, True], ids=["offset", "symmetric"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_triton_group_sizes_and_modes(group_size, symmetric, dtype, path, device):
    """Each of the three paths (GEMV, GEMM, dequantize + dense matmul), forced, on every
    group size and mode; the M of each is one "auto" would send elsewhere, too."""
    need(device)
    n, k = 72, 520
    m = {"gemv": 3, "gemm": 9, "dense": 6}[path]
    weight, dense = random_int4_weight(n, k, group_size, symmetric, dtype, device)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    out = triton_int4.int4_mm(x, weight.qweight, weight.scales, weight.offsets, weight.group_len, bias, path=path)
    assert_matmul_accuracy(out, x, dense, bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_triton_dequantize_matches_the_format(group_size, dtype, device):
    need(device)
    weight, dense = random_int4_weight(40, 1000, group_size, False, dtype, device)
    w = triton_int4.dequantize(weight.qweight, weight.scales, weight.offsets, weight.group_len, 1000, dtype)
    assert w.dtype == dtype and w.shape == (40, 1000)
    # q * s + m in fp32, rounded once to dtype. The terms can cancel, so the bound scales
    # with their size, 15 |s| + |m| per group: half an ulp of dtype, plus fp32 roundings.
    glen = weight.group_len
    size = (15 * weight.scales.double().abs() + weight.offsets.double().abs()).repeat_interleave(glen, 1)[:, :1000]
    tol = size * (torch.finfo(dtype).eps / 2 + 2 * torch.finfo(torch.float32).eps)
    assert ((w.double() - dense.double()).abs() <= tol).all()


def test_auto_paths_by_rows(monkeypatch):
    """The Triton path "auto" takes at each M follows the thresholds in dispatch.py, on
    both sides of each, and the int4 op really launches that path (checked by recording
    the path the launcher is handed)."""
    g, d = dispatch.GEMV_MAX_M, dispatch.DENSE_MIN_M
    rows = (1, g, g + 1, d - 1, d)
    assert [dispatch.triton_int4_path(m) for m in rows] == ["gemv", "gemv", "gemm", "gemm", "dense"]
    cuda = torch.device("cuda")
    monkeypatch.setattr(dispatch, "unavailable", lambda backend, device, op="int4_mm": None)
    assert [dispatch.choose_int4_kernel(cuda, torch.float16, m, 64, 64) for m in rows] == \
        [dispatch.Int4Kernel("triton", p) for p in ("gemv", "gemv", "gemm", "gemm", "dense")]
    launched = []
    monkeypatch.setattr(triton_int4, "int4_mm", lambda *args: launched.append(args[-1]))
    from fourbit import ops
    for m in (1, g + 1):
        ops._int4_mm_impl(torch.zeros(m, 8), None, None, None, 8, None, "triton")
    assert launched == ["gemv", "gemm"]


@pytest.mark.parametrize("device", DEVICES)
def test_triton_noncontiguous_batch_and_empty(device):
    need(device)
    weight, dense = random_int4_weight(48, 256, 64, False, torch.float16, device)
    x = torch.randn(2, 256, 3, device=device).half().transpose(1, 2)
    out = fourbit.int4_linear(x, weight, backend="triton")
    assert out.shape == (2, 3, 48)
    assert_matmul_accuracy(out.reshape(6, 48), x.reshape(6, 256), dense)
    assert fourbit.int4_linear(x[:0], weight, backend="triton").shape == (0, 3, 48)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256])
def test_triton_llama_shapes_on_cuda(m):
    need("cuda")
    for n, k in [(4096, 4096), (4096, 11008), (1024, 4096)]:
        weight, dense = random_int4_weight(n, k, 128, False, torch.float16, "cuda")
        x = torch.randn(m, k, device="cuda").half()
        assert_matmul_accuracy(fourbit.int4_linear(x, weight, backend="triton"), x, dense)


@pytest.mark.cuda
def test_auto_uses_triton_on_cuda():
    assert fourbit.choose_backend(torch.device("cuda"), torch.float16, 1, 4096, 4096) == "triton"
