"""Paged decode attention against torch's SDPA on the same K/V stored contiguously.

    pytest bench/bench_attention.py --benchmark-only --benchmark-json=out.json

One query token per sequence over `context` cached tokens, block size 16, pages shuffled.
Decode attention is memory-bound: the bytes that must move are the K and V of every
sequence (2 x B x context x kv_heads x head_dim x dtype size), so GB/s against the copy
bandwidth measured in the same run says how close a kernel is to the limit. "sdpa" is the
baseline: torch.nn.functional.scaled_dot_product_attention over contiguous [B, H, L, D]
K/V (what a server without paging would run). On the CPU the providers are SDPA, fourbit's
C++ kernel ("fourbit-cpu") and the reference ("fourbit-torch"), in fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fourbit
from timing import DEVICE, SMOKE, measure_us, record

BLOCK = 16
HEAD_DIM = 128
if SMOKE:
    BATCHES, CONTEXTS, HEADS, DTYPES = [1], [64], {"8q-2kv": (8, 2)}, [torch.float32]
elif DEVICE.type == "cuda":
    BATCHES, CONTEXTS, DTYPES = [1, 8, 32, 128], [512, 4096, 32768], [torch.float16]
    HEADS = {"llama-2-7b": (32, 32), "llama-3-8b": (32, 8)}
else:  # a few cases that a 2-core machine runs in minutes
    BATCHES, CONTEXTS, DTYPES = [1, 4], [512, 4096], [torch.float32, torch.bfloat16]
    HEADS = {"llama-2-7b": (32, 32), "llama-3-8b": (32, 8)}
PROVIDERS = ["sdpa", "fourbit-auto", "fourbit-triton", "fourbit-cuda"] if DEVICE.type == "cuda" else \
    ["sdpa", "fourbit-cpu", "fourbit-torch"]
# K and V of one case must fit beside their contiguous copy and the rotation copies.
MAX_KV_BYTES = 16 << 30


def kv_bytes(batch, context, kv_heads, dtype) -> int:
    return 2 * batch * context * kv_heads * HEAD_DIM * torch.finfo(dtype).bits // 8


def make_call(provider: str, batch: int, context: int, heads: int, kv_heads: int, dtype: torch.dtype):
    """(a function running one decode step on a fresh cache, bytes of K and V)."""
    q = torch.randn(batch, heads, HEAD_DIM, device=DEVICE, dtype=dtype)
    nbytes = kv_bytes(batch, context, kv_heads, dtype)
    if provider == "sdpa":
        k = torch.randn(batch, kv_heads, context, HEAD_DIM, device=DEVICE, dtype=dtype)
        v = torch.randn_like(k)
        qs = q.unsqueeze(2)
        return (lambda: F.scaled_dot_product_attention(qs, k, v, enable_gqa=True)), nbytes
    blocks = batch * context // BLOCK
    k_cache = torch.randn(blocks, BLOCK, kv_heads, HEAD_DIM, device=DEVICE, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(blocks, device=DEVICE).to(torch.int32).view(batch, context // BLOCK)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    backend = provider.split("-", 1)[1]
    # Planned once, as a model plans a step once for all its layers; the timed call is one layer's.
    batch = fourbit.PagedBatch.from_tensors(slot_mapping=torch.full((batch,), -1, device=DEVICE),
                                            block_tables=block_tables, seq_lens=seq_lens, num_blocks=blocks,
                                            block_size=BLOCK)
    return (lambda: fourbit.paged_attention(q, k_cache, v_cache, batch, backend=backend)), nbytes


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_paged_decode(benchmark, batch, context, heads, dtype, provider):
    num_heads, kv_heads = heads
    if kv_bytes(batch, context, kv_heads, dtype) > MAX_KV_BYTES:
        pytest.skip("K/V too large for one case beside its contiguous copy")
    backend = provider.split("-", 1)[1] if provider.startswith("fourbit-") else None
    if backend not in (None, "auto") and backend not in fourbit.available_backends(DEVICE, "paged_attention"):
        pytest.skip(f"backend {backend!r} is not available here")
    us, nbytes = measure_us(benchmark, lambda: make_call(provider, batch, context, num_heads, kv_heads, dtype))
    record(benchmark, "paged_attention", provider, us, nbytes,
           dict(batch=batch, context=context, heads=f"{num_heads}q-{kv_heads}kv", dtype=str(dtype).split(".")[-1]),
           baseline="sdpa", head_dim=HEAD_DIM, block_size=BLOCK)
