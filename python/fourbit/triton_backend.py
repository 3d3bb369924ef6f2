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

# The three paths by rows of x (kernels/int4_matmul.py). Not yet measured on a GPU: these
# are starting points from the roofline (ANCHORS.md) that bench/bench_int4.py's per-path
# sweep (providers fourbit-triton-gemv/-gemm/-dense) exists to confirm or move.
# - GEMV up to GEMV_MAX_M: one program per row of x re-reads the weights from L2 per row,
#   fine while M is a handful; beyond, the tensor-core GEMM with BLOCK_M = 16 is cheaper.
# - Dense from DENSE_MIN_M: on an H100 fp16 turns compute-bound near M = 76, and expanding a
#   4096x4096 layer to fp16 costs about as much as a 256-row cuBLAS GEMM, so only well past
#   that point does cuBLAS's full-rate GEMM pay for the expansion.
GEMV_MAX_M = 4
DENSE_MIN_M = 512
PATHS = ("gemv", "gemm", "dense")


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


def choose_path(m: int) -> str:
    return "gemv" if m <= GEMV_MAX_M else "gemm" if m < DENSE_MIN_M else "dense"


def dequantize(qweight, scales, offsets, group_len: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, k] in dtype, expanded on the device by int4_dequantize_kernel."""
    n = qweight.shape[0]
    # Triton's interpreter truncates fp32 -> bf16 instead of rounding to nearest (triton 3.9
    # on the CPU): there the kernel writes fp32 and torch rounds. On a GPU it rounds itself.
    kernel_dtype = torch.float32 if dtype == torch.bfloat16 and interpreted() else dtype
    w = torch.empty((n, k), device=qweight.device, dtype=kernel_dtype)
    block_n, block_k = 16, 128
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _kernels.int4_dequantize_kernel[grid](qweight, scales, offsets, w, n, k, qweight.stride(0), scales.stride(0),
                                          w.stride(0), GROUP_LEN=group_len, BLOCK_N=block_n, BLOCK_K=block_k)
    return w.to(dtype)


def int4_mm(x, qweight, scales, offsets, group_len: int, bias=None, path: str | None = None):
    """x fp32/bf16/fp16 [M, K] @ int4 weight [N, K] -> [M, N] in x's dtype (see ops.int4_mm).

    path forces "gemv", "gemm" or "dense" (benchmarks measure each); None picks by M.
    """
    m, k = x.shape
    n = qweight.shape[0]
    path = path or choose_path(m)
    if x.stride(-1) != 1:
        x = x.contiguous()
    scales, offsets = scales.contiguous(), offsets.contiguous()
    if path == "dense":
        # fp32 activations keep fp32 products (torch's default matmul precision is "highest").
        w = dequantize(qweight, scales, offsets, group_len, k, x.dtype)
        return x @ w.T if bias is None else torch.addmm(bias.to(x.dtype), x, w.T)
    out = torch.zeros((m, n), device=x.device, dtype=torch.float32)  # split-K accumulates here
    args = (x, qweight, scales, offsets, out, m, n, k, x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0))
    if path == "gemv":
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], m)
        _kernels.int4_gemv_kernel[grid](*args, GROUP_LEN=group_len)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        # fp32 activations take exact fp32 products (not tf32). Triton's interpreter
        # mishandles bf16 (tl.dot gives garbage and fp32 -> bf16 truncates, triton 3.9 on the
        # CPU), so there bf16 tiles are multiplied in fp32 too; on a GPU bf16 runs on tensor cores.
        fp32_dot = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreted())
        _kernels.int4_gemm_kernel[grid](*args, triton.next_power_of_2(m), GROUP_LEN=group_len, FP32_DOT=fp32_dot)
    if bias is not None:
        out += bias
    return out.to(x.dtype)
