"""The "cpu" backend of int8_mm: the C++ kernel of csrc/cpu/int8_mm*.cpp (AVX-512, AVX2 or
portable, picked at run time by the CPU's instruction set; FOURBIT_CPU_ISA forces one)."""

from __future__ import annotations

from . import _C


def int8_mm(x, qweight, scales, group_len: int, bias=None):
    """x fp32/bf16/fp16 [M, K] @ (int8 q [N, K] * scales [N, K / group_len]).T -> [M, N] in
    x's dtype (ops.int8_mm). The kernel checks its inputs itself (TORCH_CHECK)."""
    return _C.int8_mm_cpu(x, qweight, scales, group_len, bias)
