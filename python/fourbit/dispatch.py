"""The one place that chooses a backend (and a kernel within it) for each op.

`backend="auto"` asks these functions; a forced backend skips them (ops.py checks that it
can run). Each threshold cites what it rests on; where no measurement exists yet it says so.
"""

from __future__ import annotations

import dataclasses

import torch

from .backends import unavailable

# The Triton int4 paths by rows of x (kernels/int4_matmul.py). No GPU has measured them yet:
# these are starting points from the roofline (shared/docs/ANCHORS.md) that bench/bench_int4.py's
# per-path sweep (providers fourbit-triton-gemv/-gemm/-dense) exists to confirm or move.
# - GEMV up to GEMV_MAX_M rows: one program per row of x re-reads the weights from L2 per
#   row, fine while M is a handful; beyond, the tensor-core GEMM with BLOCK_M = 16 is cheaper.
# - Dense from DENSE_MIN_M rows: on an H100 fp16 turns compute-bound near M = 76, and
#   expanding a 4096 x 4096 layer to fp16 costs about as much as a 256-row cuBLAS GEMM, so only
#   well past that point does cuBLAS's full-rate GEMM pay for the expansion.
# Both costs compared scale with N * K alike, so N and K move neither threshold.
GEMV_MAX_M = 4
DENSE_MIN_M = 512

# The CPU int4 paths by activation dtype and rows of x: from CPU_DENSE_MIN_M[dtype] rows the
# "cpu" backend dequantizes the weight to x's dtype for the call (format.dequantize; nothing
# cached) and runs torch's dense matmul, below it the C++ kernel. Measured on the Intel Xeon
# with AVX-512 BF16 / AMX of bench/results/cpu-xeon-int4.md, 4096 x 4096, group 128, one
# thread on a loaded machine (bench/results/cpu-decode.md notes the load): the per-call
# dequantization costs ~150 ms, so dense wins only where the kernel's time grows past it.
#   bf16: kernel 106 / 371 ms at M = 256 / 1024, dequantize + bf16 matmul 210 / 216 ms.
#   fp16: 102 / 474 against 237 / 438 ms (within the noise at 1024: kept on the kernel).
#   fp32: the kernel wins or ties at every M measured (up to 1024: 488 against 546 ms).
# Between M = 4 and 1024 in bf16 torch's matmul on an already dense bf16 weight is faster
# than the kernel (2.7 against 3.9 ms at M = 4, 49 against 371 ms at M = 1024), but only with
# a dense copy of the weight kept: 2 bytes per weight, 3.8x the int4 layer, which "auto"
# does not make. Both costs scale with N * K, so the threshold holds across shapes.
CPU_DENSE_MIN_M = {torch.bfloat16: 1024}

# Up to CPU_INT_MAX_M[dtype] rows of x "auto" runs "cpu-int" on the CPU: the integer-product
# kernel on fixed-point activations, one scale per block of 32 (reference.fixed_point_digits:
# 24 bits for fp32 x, 16 for bf16 / fp16, finer than x's own rounding of the block's largest
# element; SmolLM2's perplexity with every int4 layer on it: 14.6927, as W4A16's). Against
# the W4A16 kernel on the 2-core AVX-512 VNNI Xeon of bench/results/cpu-xeon-int4.md, weights
# from cache, us (fp32 x: three digits; bf16: two):
#                         M = 1        2           4            8            16
#   3072 x 576 g32  fp32  42 vs 54   66 vs 81   124 vs 108   209 vs 172
#                   bf16  40 vs 58   60 vs 86   113 vs 140   189 vs 175
#   4096 x 4096 g128 fp32 338 vs 422  467 vs 657  827 vs 1341  1538 vs 1944  2900 vs 2531
#                   bf16  279 vs 460  402 vs 618  679 vs 1346  1153 vs 1952  2318 vs 2554
# (at 54a5524; centring the weight at q = 8, for accuracy on one-signed x, added an integer
# subtraction per lane: 8-28% more time at M = 2-4 in 3 alternating processes on another
# session's Xeon, M = 1 within its noise). Past a few rows the W4A16 kernel's blocked GEMM,
# which reuses each dequantized weight over more rows of x, wins on the narrow layers first.
CPU_INT_MAX_M = {torch.float32: 2, torch.bfloat16: 4, torch.float16: 4}


def cpu_int_takes(group_len: int, k: int) -> bool:
    """Whether "cpu-int" (and "cpu-a8") take this group length for K columns: 32, 64, a
    multiple of 128, or one group per row (csrc/cpu/routes.cpp refuses the others)."""
    return group_len in (32, 64) or group_len % 128 == 0 or group_len >= k


@dataclasses.dataclass(frozen=True)
class Int4Kernel:
    """What runs an int4_mm call: a backend, and for "triton" its path ("gemv", "gemm", "dense")."""
    backend: str
    path: str | None = None


def triton_int4_path(m: int) -> str:
    """The Triton int4 kernel for M rows of x (thresholds above)."""
    return "gemv" if m <= GEMV_MAX_M else "gemm" if m < DENSE_MIN_M else "dense"


def cpu_int4_path(dtype: torch.dtype, m: int) -> str:
    """The "cpu" backend's int4 path for M rows of x in dtype: "kernel" or "dense" (above)."""
    return "dense" if m >= CPU_DENSE_MIN_M.get(dtype, float("inf")) else "kernel"


def choose_int4_kernel(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int,
                       group_len: int | None = None) -> Int4Kernel:
    """The kernel "auto" runs int4_mm with, for x of dtype [m, k] and a weight [n, k] of
    group_len columns per group (None: one of format.GROUP_SIZES) on device.

    CPU: up to CPU_INT_MAX_M[dtype] rows "cpu-int" (fixed-point activations, above) where it
        takes the group length; else the "cpu" backend whenever it is built, on its path by
        dtype and M (cpu_int4_path): the C++ kernel, which beat torch's fp32 dense matmul at
        M = 1, 16 and 64 over seven layer shapes (bench/results/cpu.md, weights rotated past
        the cache), except for bf16 from 1024 rows, where dequantizing per call and torch's
        bf16 matmul beat it (CPU_DENSE_MIN_M). In bf16 from M = 4 torch's matmul on a dense
        bf16 weight it keeps is faster still (bench/results/cpu-xeon-int4.md); "auto" keeps
        no such copy.
    CUDA, Ampere or newer with Triton: the Triton path by M (triton_int4_path). The CUDA
        tensor-core kernel ("cuda", fp16/bf16 only) is chosen only once a GPU run has
        measured it faster than Triton on the same shapes: none has.
    Elsewhere (no kernel for the device, or an empty product): the reference.
    """
    device = torch.device(device)
    if m == 0 or n == 0 or k == 0:
        return Int4Kernel("torch")
    if device.type == "cpu" and unavailable("cpu", device) is None:
        if (m <= CPU_INT_MAX_M.get(dtype, 0) and (group_len is None or cpu_int_takes(group_len, k))
                and unavailable("cpu-int", device) is None):
            return Int4Kernel("cpu-int")
        return Int4Kernel("cpu", cpu_int4_path(dtype, m))
    if device.type == "cuda" and unavailable("triton", device) is None:
        return Int4Kernel("triton", triton_int4_path(m))
    return Int4Kernel("torch")


def choose_backend(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int,
                   group_len: int | None = None) -> str:
    """The backend "auto" runs int4_mm with (choose_int4_kernel(...).backend)."""
    return choose_int4_kernel(device, dtype, m, n, k, group_len).backend


def choose_int8_backend(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int) -> str:
    """The backend "auto" runs int8_mm with: on the CPU the C++ kernel whenever it is built
    (every dtype and M: it reads a quarter of the fp32 weight's bytes, and past 16 rows it
    multiplies dequantized panels at the fp32 GEMM rate, bench/results/cpu-int8.md); elsewhere,
    or for an empty product, the reference (no GPU int8 kernel yet)."""
    device = torch.device(device)
    if m and n and k and device.type == "cpu" and unavailable("cpu", device, "int8_mm") is None:
        return "cpu"
    return "torch"


def choose_attention_backend(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """What "auto" runs write_kv and the paged attention ops with.

    On a GPU where Triton runs: the Triton kernels, every dtype. The CUDA decode kernel is
    forced-only until a GPU run has measured it against Triton (none has). On the CPU: the
    C++ kernels ("cpu") whenever they are built. Measured against the reference on this
    project's 2-core AVX-512 Xeon (bench/results/cpu-attention.md: decode, D = 128, block 16,
    Llama-2-7B and Llama-3-8B heads, B 1-4, context 512-4096, fp32 and bf16), the kernel was
    faster in every case, 1.4x to 14x (the reference gathers every page into a copy and runs
    SDPA over it); its prefill likewise avoids the reference's gathered copy and padded
    [B, max_query_len] layout. Otherwise the reference.
    """
    device = torch.device(device)
    if device.type == "cuda" and unavailable("triton", device, "paged_attention") is None:
        return "triton"
    if device.type == "cpu" and unavailable("cpu", device, "paged_attention") is None:
        return "cpu"
    return "torch"
