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


@dataclasses.dataclass(frozen=True)
class Int4Kernel:
    """What runs an int4_mm call: a backend, and for "triton" its path ("gemv", "gemm", "dense")."""
    backend: str
    path: str | None = None


def triton_int4_path(m: int) -> str:
    """The Triton int4 kernel for M rows of x (thresholds above)."""
    return "gemv" if m <= GEMV_MAX_M else "gemm" if m < DENSE_MIN_M else "dense"


def choose_int4_kernel(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int) -> Int4Kernel:
    """The kernel "auto" runs int4_mm with, for x of dtype [m, k] and a weight [n, k] on device.

    CPU: the C++ kernel whenever it is built, for every dtype and M: it beat torch's fp32
        dense matmul at M = 1, 16 and 64 over seven layer shapes (bench/results/cpu.md, weights
        rotated past the cache). Not yet compared with torch's int4 kernel on bf16.
    CUDA, Ampere or newer with Triton: the Triton path by M (triton_int4_path). The CUDA
        tensor-core kernel ("cuda", fp16/bf16 only) is chosen only once a GPU run has
        measured it faster than Triton on the same shapes: none has.
    Elsewhere (no kernel for the device, or an empty product): the reference.
    """
    device = torch.device(device)
    if m == 0 or n == 0 or k == 0:
        return Int4Kernel("torch")
    if device.type == "cpu" and unavailable("cpu", device) is None:
        return Int4Kernel("cpu")
    if device.type == "cuda" and unavailable("triton", device) is None:
        return Int4Kernel("triton", triton_int4_path(m))
    return Int4Kernel("torch")


def choose_backend(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int) -> str:
    """The backend "auto" runs int4_mm with (choose_int4_kernel(...).backend)."""
    return choose_int4_kernel(device, dtype, m, n, k).backend


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
