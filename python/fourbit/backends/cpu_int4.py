"""The "cpu" backend of int4_mm: the C++ kernel of csrc/cpu/ (AVX-512, AVX2 or portable,
picked at run time by the CPU's instruction set; FOURBIT_CPU_ISA forces one)."""

from __future__ import annotations

from . import _C


def int4_mm(x, qweight, scales, offsets, group_len: int, bias=None):
    """x fp32/bf16/fp16 [M, K] @ canonical int4 weight [N, K] -> [M, N] in x's dtype (ops.int4_mm).
    The kernel checks its inputs itself (TORCH_CHECK) and takes any strides of x."""
    return _C.int4_mm_cpu(x, qweight, scales, offsets, group_len, bias)
