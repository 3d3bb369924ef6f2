"""int4 weight-only matmul against the dense baseline, per provider, shape and M.

    pytest bench/bench_int4.py --benchmark-only --benchmark-json=out.json
    python bench/report.py out.json

Each result's extra_info holds the device time in µs, the bytes that must move, GB/s,
TFLOP/s and the environment; report.py turns them into speedups over the baseline
measured in the same run (CPU: torch fp32 matmul; CUDA: torch matmul in the same dtype).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import fourbit
from timing import copies_to_rotate, copy_bandwidth_gbs, cuda_time_us, environment

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GROUP = 128

# (N, K) of the linear layers of real models.
LLAMA_SHAPES = {
    "4096x4096": (4096, 4096),      # Llama-2-7B / Llama-3-8B q_proj, o_proj
    "12288x4096": (12288, 4096),    # Llama-2-7B fused qkv
    "22016x4096": (22016, 4096),    # Llama-2-7B fused gate_up
    "4096x11008": (4096, 11008),    # Llama-2-7B down_proj
    "28672x4096": (28672, 4096),    # Llama-3-8B fused gate_up
    "4096x14336": (4096, 14336),    # Llama-3-8B down_proj
    "1024x4096": (1024, 4096),      # Llama-3-8B k_proj, v_proj
}
if DEVICE.type == "cuda":
    SHAPES = LLAMA_SHAPES
    ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024]
    DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
    # fourbit-triton is what "auto" runs inside the Triton backend; the -gemv/-gemm/-dense
    # providers force one path each, over the M where it could win, to place the crossovers.
    PROVIDERS = ["torch", "tinygemm", "fourbit-triton", "fourbit-triton-gemv", "fourbit-triton-gemm",
                 "fourbit-triton-dense"]
else:
    SHAPES = {k: LLAMA_SHAPES[k] for k in ("4096x4096", "4096x11008")}
    ROWS = [1, 16, 64]
    DTYPES = {"fp32": torch.float32}
    PROVIDERS = ["torch", "tinygemm", "fourbit-cpu"]


def make_call(provider: str, x: torch.Tensor, n: int, k: int):
    """(a function that runs provider once on weight copy i, bytes of one weight copy)."""
    dtype = x.dtype
    if provider == "torch":
        w = torch.randn(n, k, device=DEVICE, dtype=dtype)
        return (lambda w=w: x @ w.T), w.numel() * w.element_size()
    if provider == "tinygemm":
        if DEVICE.type == "cuda":  # torch's int4 kernel takes bf16 only
            xb = x.to(torch.bfloat16)
            q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE)
            packed = torch.ops.aten._convert_weight_to_int4pack(q, 8)
            sz = torch.randn(k // GROUP, n, 2, dtype=torch.bfloat16, device=DEVICE)
            fn = lambda p=packed: torch.ops.aten._weight_int4pack_mm(xb, p, GROUP, sz)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
            sz = torch.randn(k // GROUP, n, 2, dtype=dtype)
            fn = lambda p=packed: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, GROUP, sz)
        return fn, packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
    backend, _, path = provider.split("-", 1)[1].partition("-")
    weight = fourbit.quantize_weight(torch.randn(n, k, device=DEVICE, dtype=dtype), GROUP)
    nbytes = sum(t.numel() * t.element_size() for t in (weight.qweight, weight.scales, weight.offsets))
    if path:
        from fourbit import triton_backend
        return (lambda w=weight: triton_backend.int4_mm(x, w.qweight, w.scales, w.offsets, w.group_len,
                                                        path=path)), nbytes
    return (lambda w=weight: fourbit.int4_linear(x, w, backend=backend)), nbytes


def measured(provider: str, m: int, dtype: torch.dtype) -> bool:
    """Forced Triton paths only where they could be the best choice, in fp16 only."""
    path = provider.removeprefix("fourbit-triton-") if provider.startswith("fourbit-triton-") else None
    if path is None:
        return True
    return dtype == torch.float16 and {"gemv": m <= 16, "gemm": True, "dense": m >= 64}[path]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_int4_matmul(benchmark, shape, m, dtype, provider):
    if not measured(provider, m, dtype):
        pytest.skip("this path is measured where it could win, in fp16")
    n, k = shape
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    fn, weight_bytes = make_call(provider, x, n, k)
    env = environment(str(DEVICE))
    # Rotate weight copies so each call reads its weights from memory, not from a cache
    # (a 4096x4096 int4 layer fits in the L2 of an H100 and in this CPU's L3).
    calls = [fn] + [make_call(provider, x, n, k)[0] for _ in range(copies_to_rotate(weight_bytes, DEVICE) - 1)]
    if DEVICE.type == "cuda":
        us = cuda_time_us(calls)
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=3, warmup_rounds=1)
        copy_bw = copy_bandwidth_gbs(str(DEVICE))
    else:
        rotation = itertools.cycle(calls)
        benchmark(lambda: next(rotation)())
        us = benchmark.stats.stats.median * 1e6
        copy_bw = float("nan")
    moved = weight_bytes + x.numel() * x.element_size() + m * n * x.element_size()
    benchmark.extra_info.update(
        op="int4_matmul", provider=provider, shape=f"{n}x{k}", n=n, k=k, m=m, dtype=str(dtype).split(".")[-1],
        us=us, gbs=moved / us / 1e3, pct_copy_bw=100 * moved / us / 1e3 / copy_bw, tflops=2 * m * n * k / us / 1e6,
        auto_backend=fourbit.choose_backend(DEVICE, dtype, m, n, k), **env)
