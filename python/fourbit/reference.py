"""The executable specification of every fourbit op, in plain PyTorch.

It is the "torch" backend (the CPU fallback, and correct on any device) and the oracle
every kernel is tested against. Nothing here is tuned for speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .format import dequantize, dequantize_int8


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


# The "cpu-a8" and "cpu-int" backends' numerics (int8 / fixed-point integer activations),
# their spec and test oracle.
A8_BLOCK = 32
# A block of 32 activations fixed point holds: finite, max|x| 0 or within [2^-64, 2^64]
# (csrc/include/fourbit/int4_a8_cpu.h: beyond, fp32 scales and sums would over- or underflow).
A8_RANGE = (2.0**-64, 2.0**64)


def quantize_activations_int8(x: torch.Tensor, digits: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x float [M, K] -> (xq int8 [M, K_32], d fp32 [M, K_32 / 32]) with K_32 = K rounded up to
    32: per block of 32 columns d = max|x| / 127 and xq = round(x * (127 / max|x|)) (to
    nearest even), so x ~ xq * d. Zero padding; an all-zero block gets d = 0. A block out of
    A8_RANGE (inf, NaN, or a nonzero max|x| past it) gets d = NaN and zero bytes; int4_mm_a8
    computes its row by int4_mm instead.

    digits 2 or 3 ("cpu-int", fixed_point_digits): with t = x * (127 / max|x|) in fp32 and
    unit = 256^(digits - 1), xq = round(t * unit) (int16 / int32, |xq| <= 127 unit) and
    d / unit: 16- / 24-bit activations, x within max|x| / (254 unit) of xq * d (plus t's fp32
    rounding). The kernel holds each as `digits` int8 digits."""
    if digits not in (1, 2, 3):
        raise ValueError(f"digits must be 1, 2 or 3, got {digits!r}")
    m, k = x.shape
    k32 = -(-k // A8_BLOCK) * A8_BLOCK
    xp = torch.zeros(m, k32, dtype=torch.float32, device=x.device)
    xp[:, :k] = x.to(torch.float32)
    blocks = xp.view(m, -1, A8_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    in_range = (amax == 0) | ((amax >= A8_RANGE[0]) & (amax <= A8_RANGE[1]))
    held = torch.isfinite(blocks).all(-1, keepdim=True) & in_range
    amax = torch.where(held, amax, 0.0)
    # The quotients correctly rounded to fp32, as the kernel's fp32 divisions give them (via
    # fp64: one division then one rounding is exact for these; torch's fp32 tensor division
    # may multiply by a reciprocal instead, off by an ulp).
    inv = torch.where(amax > 0, (127.0 / amax.double()).float(), torch.zeros_like(amax))
    t = torch.where(held, blocks * inv, 0.0)
    d = torch.where(held, (amax.double() / 127.0).float(), float("nan"))
    if digits == 1:
        return t.round().clamp(-127, 127).to(torch.int8).view(m, k32), d.view(m, -1)
    unit = 256 ** (digits - 1)  # t * unit is exact in fp32 (|t| <= 127, unit <= 2^16)
    xq = (t * unit).round().clamp(-127 * unit, 127 * unit).to(torch.int16 if digits == 2 else torch.int32)
    return xq.view(m, k32), (d / unit).view(m, -1)


def fixed_point_digits(dtype: torch.dtype) -> int:
    """The int8 digits per activation of the "cpu-int" backend for x of dtype: 3 (24-bit) for
    fp32, 2 (16-bit) for bf16 / fp16; either way finer than the dtype's own rounding of the
    block's largest element (2^-24, 2^-8 / 2^-11 of it), against a step of max / (127 unit)."""
    return 3 if dtype == torch.float32 else 2


def int4_mm_a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
               group_len: int, bias: torch.Tensor | None = None, digits: int = 1) -> torch.Tensor:
    """int4_mm with x quantized first (quantize_activations_int8, `digits` int8 digits): what the
    "cpu-a8" (digits=1) and "cpu-int" (fixed_point_digits(x.dtype)) backends compute, here in
    fp64. With w = q s + m = (q - 8) s + m', m' = m + 8 s rounded to fp32:

        out = sum_g s[n, g] sum_{k in g} (q[n, k] - 8) (xq d)[m, k] + sum_g m'[n, g] sum_{k in g} x[m, k]

    the offset term from the unquantized x (nothing of a symmetric weight, m' = 0). Rows of x
    with a block out of A8_RANGE are int4_mm's (W4A16) instead. Args and result as int4_mm.
    """
    m, k = x.shape
    kp = 8 * qweight.shape[1]
    xq, d = quantize_activations_int8(x, digits)
    xd = torch.zeros(m, kp, dtype=torch.float64, device=x.device)
    cols = min(kp, xq.shape[1])
    xd[:, :cols] = (xq.double() * d.double().repeat_interleave(A8_BLOCK, 1))[:, :cols]
    q = dequantize(qweight, torch.ones_like(scales), torch.zeros_like(offsets), group_len, kp).double()
    out = xd @ ((q - 8) * scales.double().repeat_interleave(group_len, 1)).T
    centred = (offsets.float() + 8 * scales.float()).double()
    xs = torch.zeros(m, kp, dtype=torch.float64, device=x.device)
    xs[:, :k] = x.double()
    out += xs.view(m, -1, group_len).sum(-1) @ centred.T
    if bias is not None:
        out += bias.double()
    out = out.to(x.dtype)
    redo = d.isnan().any(-1)
    if redo.any():
        out[redo] = int4_mm(x[redo], qweight, scales, offsets, group_len, bias)
    return out


# ---- Paged KV cache (layout: kv_cache.py) ----

def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache[slot // block_size, slot % block_size] = k[t] (and v) for every slot >= 0.

    Args:
        k, v: [T, num_kv_heads, head_dim], any float dtype (cast to the cache's).
        k_cache, v_cache: contiguous [num_blocks, block_size, num_kv_heads, head_dim].
        slot_mapping: int64 [T]; slot = page * block_size + row, -1 skips the token.
    """
    keep = (slot_mapping >= 0) & (slot_mapping < k_cache.shape[0] * k_cache.shape[1])  # others write nowhere
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def _gather_pages(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Every token slot of each sequence's pages: [B, max_blocks * block_size, num_kv_heads, head_dim].
    Pages are clamped into the cache, as the kernels clamp them: bad tables read wrong pages,
    never outside the cache (entries past a sequence's length are masked out anyway)."""
    return cache[block_tables.long().clamp(0, cache.shape[0] - 1)].flatten(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
            guard_non_finite: bool = False) -> torch.Tensor:
    """Attention of q [B, T, Hq, D] over k, v [B, L, Hkv, D] where visible [B, T, L] (Hq a
    multiple of Hkv: query head h reads kv head h // (Hq / Hkv)). Computed in fp32 by torch's
    SDPA; returns [B, T, Hq, D] in q's dtype.

    Keys a query does not see must never touch its result, NaN and inf included; SDPA's
    additive mask alone would let a masked NaN score or value through (-inf + NaN, 0 * NaN).
    When every query of a row sees the same keys (decode), the caller zeroes the others in
    place (_zero_past); otherwise (prefill, causal) guard_non_finite zeroes non-finite keys and
    values before SDPA and sets NaN on the queries that do see one after it."""
    bad = None
    if guard_non_finite:
        bad = ~(torch.isfinite(k) & torch.isfinite(v)).all(-1)                   # [B, L, Hkv]
        k, v = (t.masked_fill(bad[..., None], 0.0) for t in (k, v))
    q4, k4, v4 = (t.float().transpose(1, 2) for t in (q, k, v))            # [B, heads, tokens, D]
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=visible[:, None], scale=scale, enable_gqa=True)
    out = out.transpose(1, 2)
    if bad is not None:
        sees_bad = (visible[..., None] & bad[:, None]).any(2)                     # [B, T, Hkv]
        sees_bad = sees_bad.repeat_interleave(q.shape[2] // k.shape[2], dim=-1)   # [B, T, Hq]
        out = out.masked_fill(sees_bad[..., None], float("nan"))
    return out.to(q.dtype)


def _zero_past(k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the gathered slots k, v [B, L, Hkv, D] at or past each sequence's
    length (stale pages: NaN there must not reach the sequence). Returns which slots are
    real: bool [B, L]."""
    real = torch.arange(k.shape[1], device=k.device)[None, :] < seq_lens[:, None]
    k.masked_fill_(~real[..., None, None], 0.0)
    v.masked_fill_(~real[..., None, None], 0.0)
    return real


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode: query b (the newest token of sequence b) attends to its seq_lens[b] cached tokens.

    Args:
        q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D];
        block_tables: int32 [B, max_blocks]; seq_lens: int32 [B], each >= 1.
    Returns:
        [B, Hq, D] in q's dtype.
    """
    k, v = _gather_pages(k_cache, block_tables), _gather_pages(v_cache, block_tables)   # fresh copies
    visible = _zero_past(k, v, seq_lens)[:, None, :]                                  # [B, 1, L]
    out = _attend(q[:, None], k, v, visible, scale)[:, 0]
    return torch.where((seq_lens > 0)[:, None, None], out, 0.0)  # no key to attend to: 0, as the kernels give


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            max_query_len: int, scale: float) -> torch.Tensor:
    """Prefill / chunked prefill over the paged cache.

    The new tokens of sequence b are q[query_start_loc[b]:query_start_loc[b + 1]], the last
    of its seq_lens[b] tokens (already written to the cache); each attends causally to every
    cached token up to its own position.

    Args:
        q: [total_q, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D];
        block_tables: int32 [B, max_blocks]; seq_lens: int32 [B]; query_start_loc: int32 [B + 1];
        max_query_len: at least the most new tokens of any sequence.
    Returns:
        [total_q, Hq, D] in q's dtype.
    """
    # Row r of sequence b's new tokens is token query_start_loc[b] + r of q and sits at
    # position seq_lens[b] - new[b] + r of the sequence. Queries are laid out [B, max_query_len]
    # (rows past a sequence's new tokens are padding, computed and dropped).
    total_q, device = q.shape[0], q.device
    starts, new = query_start_loc[:-1].long(), (query_start_loc[1:] - query_start_loc[:-1]).long()
    rows = torch.arange(max_query_len, device=device)
    token = starts[:, None] + rows                                                 # [B, max_query_len]
    inside = (rows[None, :] < new[:, None]) & (token >= 0) & (token < total_q)   # never outside q
    position = (seq_lens - new)[:, None] + rows
    k, v = _gather_pages(k_cache, block_tables), _gather_pages(v_cache, block_tables)
    visible = torch.arange(k.shape[1], device=device)[None, None, :] <= position[:, :, None]       # [B, T, L]
    out = _attend(q[token.clamp(0, max(total_q - 1, 0))], k, v, visible, scale, guard_non_finite=True)
    # Scatter the real rows back to their tokens; padding rows go to a spare row past the end
    # (an index, not a boolean mask: no data-dependent shape, so no host synchronization).
    target = torch.where(inside, token, total_q)
    result = q.new_empty((total_q + 1, *q.shape[1:]))
    result.index_copy_(0, target.flatten(), out.flatten(0, 1))
    return result[:total_q]


# ---- int8 weight-only matmul (format.py, "The int8 weight-only format") ----

def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_len: int,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """out = x @ (q * s).T + bias, the weight dequantized to fp32 (exact for 16-bit scales)
    and the product accumulated in fp32, returned in x's dtype.

    Args:
        x: fp32, bf16 or fp16 [M, K].
        qweight: int8 [N, K].
        scales: [N, K / group_len] in a compute dtype; s[n, g] scales columns
            g * group_len .. (g + 1) * group_len - 1 of row n.
        group_len: K (one scale per row) or a multiple of 32 dividing K.
        bias: optional float [N].
    Returns:
        [M, N] in x's dtype.
    """
    out = x.to(torch.float32) @ dequantize_int8(qweight, scales, group_len).T
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)
