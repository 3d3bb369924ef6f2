"""The CPU int4 paths "auto" picks: up to CPU_INT_MAX_M rows the fixed-point kernel
("cpu-int") where it takes the group length, else the W4A16 C++ kernel (dispatch.cpu_int4_path),
and for bf16 from CPU_DENSE_MIN_M rows the dense path (dequantize for the call, torch's
matmul); the dense path computes the op (against the fp32 reference) and "auto" really runs it."""

import pytest
import torch

import fourbit
from fourbit import dispatch, ops
from fourbit.backends import cpu_int4
from fourbit.reference import int4_mm as reference_int4_mm
from helpers import relative_error

pytestmark = pytest.mark.skipif(ops._C is None, reason="the C++ extension is not built")
CPU = torch.device("cpu")


def test_auto_picks_dense_only_for_bf16_at_large_m():
    dense_from = dispatch.CPU_DENSE_MIN_M[torch.bfloat16]
    assert dispatch.choose_int4_kernel(CPU, torch.bfloat16, dense_from, 4096, 4096) == \
        dispatch.Int4Kernel("cpu", "dense")
    for m in (dispatch.CPU_INT_MAX_M[torch.bfloat16] + 1, 16, 64, 512, dense_from - 1):
        assert dispatch.choose_int4_kernel(CPU, torch.bfloat16, m, 4096, 4096) == dispatch.Int4Kernel("cpu", "kernel")
    for dtype in (torch.float32, torch.float16):
        for m in (dispatch.CPU_INT_MAX_M[dtype] + 1, 64, dense_from, 8 * dense_from):
            assert dispatch.choose_int4_kernel(CPU, dtype, m, 4096, 4096).path == "kernel"
    assert dispatch.choose_backend(CPU, torch.bfloat16, dense_from, 4096, 4096) == "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_auto_picks_the_fixed_point_kernel_for_few_rows(dtype):
    """Up to CPU_INT_MAX_M[dtype] rows "cpu-int", for every group length it takes (any of
    format.GROUP_SIZES, or unknown: None); a group length it refuses keeps the W4A16 kernel."""
    if "cpu-int" not in fourbit.available_backends("cpu"):
        pytest.skip("fourbit._C has no int4_a8_mm_cpu")
    for m in (1, dispatch.CPU_INT_MAX_M[dtype]):
        for group_len in (None, 32, 64, 128, 256, 4096):
            assert dispatch.choose_int4_kernel(CPU, dtype, m, 4096, 4096, group_len) == dispatch.Int4Kernel("cpu-int")
        assert dispatch.choose_backend(CPU, dtype, m, 192, 192, 96) == "cpu"  # two groups of 96
    assert dispatch.choose_backend(CPU, dtype, dispatch.CPU_INT_MAX_M[dtype] + 1, 4096, 4096) == "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_the_dense_path_computes_the_op(dtype, bias):
    """Against the fp32 reference: within twice plain PyTorch's error in the same dtype (the
    dense matmul on the dequantized weight rounded to dtype), K = 576 padded to groups of 128."""
    n, k, m = 1000, 576, 33
    weight = fourbit.quantize_weight(torch.randn(n, k), 128, dtype=dtype)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    want = reference_int4_mm(x.float(), weight.qweight, weight.scales, weight.offsets, weight.group_len,
                             None if b is None else b.float())
    got = cpu_int4.int4_mm(x, weight.qweight, weight.scales, weight.offsets, weight.group_len, b, path="dense")
    assert got.dtype == dtype and got.shape == (m, n)
    plain = torch.nn.functional.linear(x, weight.dequantize(dtype), b)  # plain PyTorch in dtype
    assert relative_error(got, want) <= 2 * max(relative_error(plain, want), 1e-6)

def test_auto_runs_the_dense_path_at_large_m():
    """int4_linear on bf16 x of CPU_DENSE_MIN_M rows gives the dense path's result, bit for bit;
    one row fewer, the kernel's (csrc/cpu/routes.cpp takes that call itself, below the rows
    ops.py tells it)."""
    weight = fourbit.quantize_weight(torch.randn(64, 256).to(torch.bfloat16), 128)
    w = (weight.qweight, weight.scales, weight.offsets, weight.group_len)
    m = dispatch.CPU_DENSE_MIN_M[torch.bfloat16]
    x = torch.randn(m, 256).to(torch.bfloat16)
    dense, kernel = cpu_int4.int4_mm(x, *w, None, path="dense"), ops._C.int4_mm_cpu(x, *w, None)
    assert not torch.equal(dense, kernel)  # the two paths round differently, so the check can tell them apart
    assert torch.equal(fourbit.int4_linear(x, weight), dense)
    assert torch.equal(fourbit.int4_linear(x[1:], weight), kernel[1:])
