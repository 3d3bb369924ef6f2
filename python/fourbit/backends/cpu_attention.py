"""The "cpu" backend of the paged KV cache ops: the C++ kernels of csrc/cpu/paged_attention*.cpp
(AVX-512, AVX2 or portable, picked at run time like int4_mm's; FOURBIT_CPU_ISA forces one).

Inputs arrive checked by ops.py (shapes, dtypes, devices, contiguous caches), their index
values validated once per step in a PagedBatch (kv_cache.py). The kernels check what they
rely on themselves (TORCH_CHECK, naming the tensor) and clamp every page and length they
read, so a trusted batch with bad tables gives wrong numbers, never a read or write outside
a tensor. Work is spread over torch's threads (torch.get_num_threads()): decode over
sequences x kv heads, split over the keys when those are fewer than the threads (merged by
log-sum-exp); prefill over blocks of query tokens x kv heads.
"""

from __future__ import annotations

from . import _C


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Copy each token's keys and values into its cache slot (ops.write_kv), in place.

    Args:
        k, v: [T, Hkv, D] in the cache's dtype, each token's [Hkv, D] row contiguous.
        k_cache, v_cache: contiguous [num_blocks, block_size, Hkv, D] (NHD pages), fp32, bf16 or fp16.
        slot_mapping: int64 [T], page * block_size + row; -1 (or any slot outside the cache) skips.
    """
    _C.write_kv_cpu(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float):
    """Decode (ops.paged_attention).

    Args:
        q: [B, Hq, D] in the cache's dtype, unit stride along D; Hq a multiple of Hkv.
        k_cache, v_cache: contiguous [num_blocks, block_size, Hkv, D], fp32, bf16 or fp16.
        block_tables: int32 [B, max_blocks]; seq_lens: int32 [B] (0 gives a zero output).
        scale: the softmax scale.
    Returns:
        [B, Hq, D] in q's dtype (fp32 accumulation).
    """
    return _C.paged_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len: int,
                            scale: float):
    """Prefill and chunked prefill (ops.paged_prefill_attention), causal over the cached tokens.

    Args:
        q: [total_q, Hq, D] in the cache's dtype, unit stride along D.
        k_cache, v_cache: contiguous [num_blocks, block_size, Hkv, D], fp32, bf16 or fp16.
        block_tables: int32 [B, max_blocks]; seq_lens: int32 [B];
        query_start_loc: int32 [B + 1], sequence b's new tokens are q rows
            query_start_loc[b] .. query_start_loc[b + 1] - 1, the last of its seq_lens[b] tokens.
        max_query_len: the most new tokens of any sequence (rows past it are not computed).
        scale: the softmax scale.
    Returns:
        [total_q, Hq, D] in q's dtype (fp32 accumulation).
    """
    return _C.paged_prefill_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                          max_query_len, scale)
