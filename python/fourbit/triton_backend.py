"""The "triton" backend of fourbit.int4_mm: launchers for kernels/int4_matmul.py.

Launchers check, allocate and launch; the kernels and their autotune configs live in
kernels/. On a CPU machine the kernels run through Triton's interpreter when
TRITON_INTERPRET=1 is set before triton is imported (that is how CI tests them).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    from fourbit.kernels import int4_matmul as _kernels
    _IMPORT_ERROR = None
except ImportError as error:  # triton is optional
    triton = _kernels = None
    _IMPORT_ERROR = error

# Rows up to which the split-K GEMV beats the tensor-core GEMM (bench/results/).
GEMV_MAX_M = 4


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on device, or None."""
    if _IMPORT_ERROR is not None:
        return f"triton is not importable ({_IMPORT_ERROR})"
    if device.type == "cuda":
        return None if torch.cuda.get_device_capability(device) >= (8, 0) else "it needs an Ampere or newer GPU"
    if device.type == "cpu" and interpreted():
        return None
    return f"it runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1), the inputs are on {device}"


def int4_mm(x, qweight, scales, offsets, group_len: int, bias=None):
    """x fp32/bf16/fp16 [M, K] @ int4 weight [N, K] -> [M, N] in x's dtype (see ops.int4_mm)."""
    m, k = x.shape
    n = qweight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    scales, offsets = scales.contiguous(), offsets.contiguous()
    out = torch.zeros((m, n), device=x.device, dtype=torch.float32)  # split-K accumulates here
    args = (x, qweight, scales, offsets, out, m, n, k, x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0))
    if m <= GEMV_MAX_M:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], m)
        _kernels.int4_gemv_kernel[grid](*args, GROUP_LEN=group_len)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        # fp32 activations take exact fp32 products (not tf32). Triton's interpreter
        # mishandles bf16 tl.dot (garbage results, seen with triton 3.9 on the CPU), so
        # there bf16 tiles are multiplied in fp32 too; on a GPU bf16 runs on tensor cores.
        fp32_dot = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreted())
        _kernels.int4_gemm_kernel[grid](*args, triton.next_power_of_2(m), GROUP_LEN=group_len, FP32_DOT=fp32_dot)
    if bias is not None:
        out += bias
    return out.to(x.dtype)
