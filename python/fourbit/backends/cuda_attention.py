"""The "cuda" backend of the paged KV cache ops: csrc/cuda/paged_attention.cu.

Inputs arrive checked by ops.py and validated once per step in a PagedBatch (kv_cache.py);
the kernels clamp every index they read, so even unvalidated tables cannot reach outside
the cache. Nothing here reads a tensor back to the host: decode is CUDA-graph safe.
"""

from __future__ import annotations

from . import _C


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k, v [T, Hkv, D] -> rows slot_mapping[t] of the contiguous caches (ops.write_kv)."""
    _C.write_kv_cuda(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float):
    """Decode (ops.paged_attention): q [B, Hq, D] -> [B, Hq, D]."""
    return _C.paged_attention_cuda(q, k_cache, v_cache, block_tables, seq_lens, scale)
