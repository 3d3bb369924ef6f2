"""The "cpu" and "cpu-a8" backends of int4_mm: the C++ kernels of csrc/cpu/ (AVX-512, AVX2 or
portable, picked at run time by the CPU's instruction set; FOURBIT_CPU_ISA forces one).

"cpu" (W4A16): int4_mm_cpu, and for large M in bf16 a dense path (dequantize for the call,
torch's matmul; dispatch.cpu_int4_path). "cpu-a8" (W4A8): int4_a8_mm_cpu, x quantized to int8
per block of 32 columns on the fly and integer dot products (AVX-512 VNNI `vpdpbusd`, AVX2
`vpmaddubsw`), the numerics of reference.int4_mm_a8. "cpu-int": the same kernel with each
activation in fixed point as two or three int8 digits (reference.fixed_point_digits), two or
three times the integer products."""

from __future__ import annotations

import torch

from ..format import dequantize
from . import _C


def int4_mm(x, qweight, scales, offsets, group_len: int, bias=None, path: str = "kernel"):
    """x fp32/bf16/fp16 [M, K] @ canonical int4 weight [N, K] -> [M, N] in x's dtype (ops.int4_mm).

    path "kernel": the C++ kernel, which checks its inputs itself (TORCH_CHECK) and takes any
    strides of x. "dense" (dispatch.cpu_int4_path picks it for large M): the weight
    dequantized to x's dtype for this call only, then torch's matmul (accumulating in fp32).
    """
    if path == "dense":
        w = dequantize(qweight, scales, offsets, group_len, x.shape[1], x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    return _C.int4_mm_cpu(x, qweight, scales, offsets, group_len, bias)


def int4_mm_a8(x, qweight, scales, offsets, group_len: int, bias=None, digits: int = 1):
    """x fp32/bf16/fp16 [M, K] @ canonical int4 weight [N, K] -> [M, N] in x's dtype, with x
    quantized to `digits` int8 digits per block of 32 (1: int8, "cpu-a8"; 2 / 3: 16- / 24-bit
    fixed point; 0: by x's dtype, "cpu-int", reference.fixed_point_digits), the numerics of
    reference.int4_mm_a8. group_len 32, 64, a multiple of 128 or the whole row: the op refuses
    others (ValueError, csrc/cpu/routes.cpp), the kernel too (TORCH_CHECK)."""
    return _C.int4_a8_mm_cpu(x, qweight, scales, offsets, group_len, bias, digits)
