"""int4 weight-only matmul against the dense baseline, per provider, layer shape and M.

    pytest bench/bench_int4.py --benchmark-only --benchmark-json=out.json
    python bench/report.py out.json

Shapes are the linear layers of real models (fourbit.models.llama.CONFIGS). Providers:
"torch" (the dense matmul in the activation dtype: the baseline), "tinygemm" (torch's own
int4 kernel, on its fast path: bf16 activations and scales; on the CPU "tinygemm-fp32" is
the same kernel called with fp32, its slow path, a labelled extra row), fourbit's backends,
"fourbit-auto" (what int4_linear picks), and on a GPU the Triton paths forced one by one (to
place the GEMV / GEMM / dense crossovers). Each result's
extra_info holds µs, the bytes that must move, GB/s, % of the copy bandwidth, TFLOP/s, the
speedup over the baseline measured just before it in the same run, and the environment.
"""

from __future__ import annotations

import pytest
import torch

import fourbit
from fourbit.models.llama import CONFIGS, linear_shapes
from timing import DEVICE, SMOKE, measure_us, record

GROUP = 128


def model_shapes(*names: str) -> dict[str, tuple[int, int]]:
    """{"NxK": (N, K)} of the linear layers of the named models, without repeats."""
    return {f"{n}x{k}": (n, k) for name in names for n, k in linear_shapes(CONFIGS[name]).values()}


if SMOKE:  # CI: the suite must keep working; the smallest case of each provider
    SHAPES, ROWS = {"576x576": (576, 576)}, [1, 16]
    DTYPES = {"fp32": torch.float32} if DEVICE.type == "cpu" else {"fp16": torch.float16}
elif DEVICE.type == "cuda":
    SHAPES = model_shapes("llama-2-7b", "llama-3-8b")
    ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024]
    DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
else:
    # bf16 as well as fp32: with AVX-512 BF16 torch's dense bf16 matmul is about twice its
    # fp32 one, and torch's int4 kernel is fast only with bf16.
    SHAPES = {**model_shapes("smollm2-135m"), "4096x4096": (4096, 4096), "4096x11008": (4096, 11008)}
    ROWS = [1, 2, 4, 8, 16, 64]
    DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

if DEVICE.type == "cuda":
    # fourbit-triton is what "auto" runs inside the Triton backend; the -gemv/-gemm/-dense
    # providers force one path each, over the M where it could win.
    PROVIDERS = ["torch", "tinygemm", "fourbit-auto", "fourbit-triton", "fourbit-cuda", "fourbit-triton-gemv",
                 "fourbit-triton-gemm", "fourbit-triton-dense"]
else:
    # fourbit-cpu-a8: the W4A8 kernel (x quantized to int8 per 32 columns; other numerics,
    # never "auto"), beside the W4A16 one; fourbit-cpu-int: the same kernel on fixed-point x
    # (24-bit for fp32, 16-bit for bf16), what "auto" runs for a few rows.
    PROVIDERS = ["torch", "tinygemm", "tinygemm-fp32", "fourbit-cpu", "fourbit-cpu-a8", "fourbit-cpu-int"]


def fourbit_backend(provider: str) -> tuple[str, str]:
    """(backend, forced Triton path or "") of a fourbit-* provider."""
    name = provider.removeprefix("fourbit-")
    return ("triton", name.removeprefix("triton-")) if name.startswith("triton-") else (name, "")


def measured(provider: str, k: int, m: int, dtype: torch.dtype) -> str | None:
    """Why a (provider, K, M, dtype) case is skipped, or None."""
    if provider.startswith("fourbit-triton-"):
        path = provider.removeprefix("fourbit-triton-")
        if dtype != torch.float16 or not {"gemv": m <= 16, "gemm": True, "dense": m >= 64}[path]:
            return "forced Triton paths are measured in fp16, where they could win"
    if provider.startswith("fourbit-"):
        backend = fourbit_backend(provider)[0]
        if backend != "auto" and backend not in fourbit.available_backends(DEVICE):
            return f"backend {backend!r} is not available here"
    if provider == "tinygemm" and dtype != torch.bfloat16:
        return "torch's int4 kernel is measured on its fast path, bf16 (tinygemm-fp32: its fp32 call)"
    if provider == "tinygemm-fp32" and dtype != torch.float32:
        return "the fp32 call of torch's int4 CPU kernel, an fp32 row only"
    if provider.startswith("tinygemm") and k % GROUP:
        return f"torch's int4 kernel needs K divisible by the group size {GROUP}"
    return None


def make_call(provider: str, x: torch.Tensor, n: int, k: int):
    """(a function running provider once on a fresh weight copy, bytes of that copy)."""
    dtype = x.dtype
    if provider == "torch":
        w = torch.randn(n, k, device=DEVICE, dtype=dtype)
        return (lambda: x @ w.T), w.numel() * w.element_size()
    if provider.startswith("tinygemm"):
        if DEVICE.type == "cuda":
            q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE)
            packed = torch.ops.aten._convert_weight_to_int4pack(q, 8)
            sz = torch.randn(k // GROUP, n, 2, dtype=torch.bfloat16, device=DEVICE)
            fn = lambda: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
            sz = torch.randn(k // GROUP, n, 2, dtype=dtype)
            fn = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)
        return fn, packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
    backend, path = fourbit_backend(provider)
    w = fourbit.quantize_weight(torch.randn(n, k, device=DEVICE, dtype=dtype), GROUP)
    nbytes = sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.offsets))
    if path:
        from fourbit.backends import triton_int4
        return (lambda: triton_int4.int4_mm(x, w.qweight, w.scales, w.offsets, w.group_len, path=path)), nbytes
    return (lambda: fourbit.int4_linear(x, w, backend=backend)), nbytes


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_int4_matmul(benchmark, shape, m, dtype, provider):
    reason = measured(provider, shape[1], m, dtype)
    if reason:
        pytest.skip(reason)
    n, k = shape
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    us, weight_bytes = measure_us(benchmark, lambda: make_call(provider, x, n, k))
    moved = weight_bytes + x.numel() * x.element_size() + m * n * x.element_size()
    case = dict(shape=f"{n}x{k}", m=m, dtype=str(dtype).split(".")[-1])
    record(benchmark, "int4_matmul", provider, us, moved, case, flops=2 * m * n * k, weight_bytes=weight_bytes,
           n=n, k=k, auto_backend=fourbit.choose_backend(DEVICE, dtype, m, n, k))
