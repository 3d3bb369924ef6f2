"""The executable specification of every fourbit op, in plain PyTorch.

It is the "torch" backend (the CPU fallback, and correct on any device) and the oracle
every kernel is tested against. Nothing here is tuned for speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .format import dequantize


def int4_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
            group_len: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out = x @ dequantize(W).T + bias, accumulated in fp32, returned in x's dtype.

    Args:
        x: fp32, bf16 or fp16 [M, K].
        qweight: int32 [N, K_padded / 8], canonical packing (format.py).
        scales, offsets: [N, K_padded / group_len] in a compute dtype.
        group_len: input channels per group (K_padded for one group per row).
        bias: optional float [N].
    Returns:
        [M, N] in x's dtype.
    """
    w = dequantize(qweight, scales, offsets, group_len, x.shape[-1], torch.float32)
    out = x.to(torch.float32) @ w.T
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


# ---- Paged KV cache (layout: kv_cache.py) ----

def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache[slot // block_size, slot % block_size] = k[t] (and v) for every slot >= 0.

    Args:
        k, v: [T, num_kv_heads, head_dim], any float dtype (cast to the cache's).
        k_cache, v_cache: contiguous [num_blocks, block_size, num_kv_heads, head_dim].
        slot_mapping: int64 [T]; slot = page * block_size + row, -1 skips the token.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def _gather_pages(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence: [length, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    pages = block_table[: -(-length // block_size)].long()
    return cache[pages].flatten(0, 1)[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, first_pos: int) -> torch.Tensor:
    """Causal attention of queries at positions first_pos, first_pos + 1, ... over keys 0..L-1.

    q [T, Hq, D]; k, v [L, Hkv, D] with Hq a multiple of Hkv (query head h reads kv head
    h // (Hq / Hkv)). Computed in fp32 by torch's SDPA; returns [T, Hq, D] in q's dtype.
    """
    # [1, heads, tokens, D]: SDPA's fused CPU and GPU kernels want a batch dimension.
    q4, k4, v4 = (t.float().transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if first_pos + q.shape[0] == k.shape[0] and q.shape[0] == 1:  # decode: every key is visible
        mask = None
    else:
        pos = first_pos + torch.arange(q.shape[0], device=q.device)
        mask = torch.arange(k.shape[0], device=q.device)[None, :] <= pos[:, None]          # [T, L]
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1).to(q.dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode: query b (the newest token of sequence b) attends to its seq_lens[b] cached tokens.

    Args:
        q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D];
        block_tables: int32 [B, max_blocks]; seq_lens: int32 [B], each >= 1.
    Returns:
        [B, Hq, D] in q's dtype.
    """
    out = torch.empty_like(q)
    for b, length in enumerate(seq_lens.tolist()):
        k = _gather_pages(k_cache, block_tables[b], length)
        v = _gather_pages(v_cache, block_tables[b], length)
        out[b] = _attend(q[b:b + 1], k, v, scale, length - 1)[0]
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Prefill / chunked prefill over the paged cache.

    The new tokens of sequence b are q[query_start_loc[b]:query_start_loc[b + 1]], the last
    of its seq_lens[b] tokens (already written to the cache); each attends causally to every
    cached token up to its own position.

    Args:
        q: [total_q, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D];
        block_tables: int32 [B, max_blocks]; seq_lens: int32 [B]; query_start_loc: int32 [B + 1].
    Returns:
        [total_q, Hq, D] in q's dtype.
    """
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        k = _gather_pages(k_cache, block_tables[b], length)
        v = _gather_pages(v_cache, block_tables[b], length)
        out[lo:hi] = _attend(q[lo:hi], k, v, scale, length - (hi - lo))
    return out
