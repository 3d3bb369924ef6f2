"""Interleaved CPU decode timings: SDPA over contiguous K/V, fourbit's C++ kernel and the
reference (bench/results/cpu-attention.md, section 1). Providers run round-robin so that load
from other jobs falls on all of them; prints a Markdown table of min / median µs.

    python bench/cpu_attention_figures.py [threads]
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from fourbit import reference
from fourbit.backends import _C

D, BLOCK = 128, 16
CASES = [(1, 512, 32, 8), (1, 4096, 32, 8), (4, 4096, 32, 8), (1, 4096, 32, 32), (4, 512, 32, 32)]


def case(dtype, batch, context, heads, kv_heads, rounds=15, ref_rounds=3):
    q = torch.randn(batch, heads, D).to(dtype)
    k = torch.randn(batch, kv_heads, context, D).to(dtype)
    v = torch.randn_like(k)
    blocks = batch * context // BLOCK
    k_cache = torch.randn(blocks, BLOCK, kv_heads, D).to(dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(blocks).to(torch.int32).view(batch, context // BLOCK)
    lens = torch.full((batch,), context, dtype=torch.int32)
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True),
           "cpu": lambda: _C.paged_attention_cpu(q, k_cache, v_cache, tables, lens, D ** -0.5),
           "ref": lambda: reference.paged_attention(q, k_cache, v_cache, tables, lens, D ** -0.5)}
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for r in range(rounds):
        for name, fn in fns.items():
            if name == "ref" and r >= ref_rounds:
                continue
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e6)
    low = {n: min(t) for n, t in times.items()}
    mid = {n: statistics.median(t) for n, t in times.items()}
    print(f"| {str(dtype)[6:]} | {heads}q-{kv_heads}kv | {batch} | {context} | {low['sdpa']:.0f} / {mid['sdpa']:.0f} "
          f"| {low['cpu']:.0f} / {mid['cpu']:.0f} | {low['ref']:.0f} | {low['sdpa'] / low['cpu']:.2f}x "
          f"| {low['ref'] / low['cpu']:.1f}x |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}")
    print("| dtype | heads | B | context | SDPA µs min / median | fourbit-cpu µs min / median | reference µs min "
          "| cpu vs SDPA (min) | cpu vs reference (min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dt in (torch.float32, torch.bfloat16):
        for c in CASES:
            case(dt, *c)
