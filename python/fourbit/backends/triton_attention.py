"""The "triton" backend of the paged KV cache ops: launchers for kernels/paged_attention.py.

Inputs arrive checked by ops.py (shapes, dtypes, devices, contiguous caches), their index
values validated once per step in a PagedBatch (kv_cache.py). Launchers pick tile sizes and
grids from host-side sizes only (the table width, the batch's max_query_len), allocate
outputs and launch; they never read a tensor's values back to the host, so every op here is
safe to capture in a CUDA graph and costs no synchronization per layer.
"""

from __future__ import annotations

import torch
import triton

from fourbit.kernels import paged_attention as _kernels

from . import interpreted

# Decode splits a sequence into partitions of at least this many tokens...
MIN_PARTITION = 256
# ... and uses as many as it takes to give the GPU this many programs per SM.
PROGRAMS_PER_SM = 2


def _sm_count(device: torch.device) -> int:
    # The interpreter has no SMs; 4 makes the tests exercise several partitions.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _tiles() -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): query rows (prefill) and keys per tile. Small in the interpreter,
    where each program runs in Python and the tests want several tiles per sequence."""
    return (16, 16) if interpreted() else (64, 64)


def _fp32_dot(dtype: torch.dtype) -> bool:
    # fp32 inputs multiply in exact fp32 (not tf32). Triton's interpreter mishandles bf16
    # tl.dot (triton 3.9 on the CPU), so there bf16 tiles are multiplied in fp32 too.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreted())


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    # The interpreter truncates fp32 -> bf16 stores instead of rounding: there kernels write
    # fp32 and torch rounds. On a GPU kernels store the output dtype directly.
    return torch.float32 if dtype == torch.bfloat16 and interpreted() else dtype


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k, v [T, Hkv, D] contiguous -> rows slot_mapping[t] of the contiguous caches (ops.write_kv)."""
    hd = k.shape[1] * k.shape[2]
    _kernels.write_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping, k_cache.shape[0] * k_cache.shape[1], k.stride(0), v.stride(0),
        HD=hd, BLOCK=triton.next_power_of_2(hd))


def decode_partition(batch: int, kv_heads: int, capacity: int, block_n: int, sms: int) -> int:
    """Tokens per decode partition: enough partitions that batch x kv_heads x partitions
    fills the GPU, none shorter than MIN_PARTITION, a whole number of key tiles. Computed
    from the page table's capacity (known on the host), not from seq_lens (on the device)."""
    splits = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, batch * kv_heads), triton.cdiv(capacity, MIN_PARTITION)))
    return triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float, partition: int | None = None):
    """Decode (ops.paged_attention). partition forces the tokens per split (tests)."""
    batch, heads, head_dim = q.shape
    kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    capacity = block_tables.shape[1] * page
    _, block_n = _tiles()
    partition = partition or decode_partition(batch, kv_heads, capacity, block_n, _sm_count(q.device))
    splits = triton.cdiv(capacity, partition)
    out = torch.empty(q.shape, device=q.device, dtype=_store_dtype(q.dtype))
    # One partition: the kernel writes the final output. Several: fp32 partials, then the merge.
    part = out.unsqueeze(2) if splits == 1 else torch.empty((batch, heads, splits, head_dim), device=q.device,
                                                           dtype=torch.float32)
    lse = torch.empty((batch, heads, splits), device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _kernels.paged_decode_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part, lse,
        scale, partition, k_cache.shape[0], block_tables.shape[1],
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE=page, BLOCK_N=block_n, FP32_DOT=_fp32_dot(q.dtype), num_warps=4)
    if splits > 1:
        _kernels.paged_decode_merge_kernel[(batch, heads)](
            part, lse, out, splits,
            part.stride(0), part.stride(1), part.stride(2),
            lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits))
    return out.to(q.dtype)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len: int,
                            scale: float):
    """Prefill (ops.paged_prefill_attention). max_query_len, the most new tokens of any
    sequence (known on the host when the batch is planned), sizes the grid."""
    total_q, heads, head_dim = q.shape
    batch = block_tables.shape[0]
    kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    block_m, block_n = _tiles()
    longest = max(1, max_query_len)
    out = torch.empty(q.shape, device=q.device, dtype=_store_dtype(q.dtype))
    _kernels.paged_prefill_kernel[(batch, triton.cdiv(longest, block_m), heads)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        scale, k_cache.shape[0], block_tables.shape[1], total_q,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PAGE=page,
        BLOCK_M=block_m, BLOCK_N=block_n, FP32_DOT=_fp32_dot(q.dtype), num_warps=4)
    return out.to(q.dtype)
