"""Triton kernels for the paged KV cache: cache writes, decode and prefill attention.

Layout (python/fourbit/kv_cache.py): K and V pages [num_blocks, PAGE, Hkv, D] (NHD);
block_tables int32 [B, max_blocks]; token t of sequence b is at page
block_tables[b, t // PAGE], row t % PAGE; slot_mapping int64 [T] = page * PAGE + row.

Every index read from a tensor (slot, page, query row) is clamped or masked against the size
of what it indexes, so wrong tables give wrong numbers but never a read or write outside the
cache, q or out. The values are checked once per step, when its PagedBatch is built
(python/fourbit/kv_cache.py); the kernels do not rely on it.

- write_kv_kernel: one program per token copies its [Hkv, D] keys and values to its slot.
- paged_decode_kernel: flash-decoding. Program (b, kv head, split) handles one partition
  of sequence b's tokens for all GQA query heads of that kv head at once, so the query
  block [heads of the group, D] meets each key tile in one tl.dot (tensor cores) and each
  K/V tile is read once for the whole group. It writes the partition's normalized output
  and its log-sum-exp; paged_decode_merge_kernel combines the partitions. The grid's splits
  come from the table width (host-side, so one captured launch serves every step); each
  sequence's own partition comes from its seq_len on the device (decode_split).
- paged_prefill_kernel: program (b, block of BLOCK_M new tokens, query head) runs the
  online softmax over the key tiles up to the block's last position (causal).
"""

import triton
import triton.language as tl


@triton.jit
def write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    num_slots,
    stride_kt, stride_vt,
    HD: tl.constexpr, BLOCK: tl.constexpr,
):
    # k[t], v[t] are contiguous [Hkv, D] rows and so is each slot of the contiguous cache
    # ([num_blocks * PAGE, Hkv * D] viewed flat): one contiguous copy of HD elements.
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if (slot >= 0) & (slot < num_slots):
        offs = tl.arange(0, BLOCK)
        mask = offs < HD
        dst = slot.to(tl.int64) * HD + offs
        tl.store(kc_ptr + dst, tl.load(k_ptr + t * stride_kt + offs, mask=mask), mask=mask)
        tl.store(vc_ptr + dst, tl.load(v_ptr + t * stride_vt + offs, mask=mask), mask=mask)


@triton.jit
def _load_kv_tile(k_ptr, v_ptr, bt_row_ptr, offs_t, t_mask, kvh, offs_d, d_mask, num_blocks,
                  stride_page, stride_row, stride_head, PAGE: tl.constexpr):
    # K and V [BLOCK_N, BLOCK_D] of tokens offs_t of one sequence. The page table entries of
    # the tile are read once (one per token; duplicates coalesce) and clamped into the cache.
    page = tl.load(bt_row_ptr + offs_t // PAGE, mask=t_mask, other=0)
    page = tl.minimum(tl.maximum(page, 0), num_blocks - 1).to(tl.int64)
    row = offs_t % PAGE
    offs = page[:, None] * stride_page + row[:, None] * stride_row + kvh * stride_head + offs_d[None, :]
    mask = t_mask[:, None] & d_mask[None, :]
    return tl.load(k_ptr + offs, mask=mask, other=0.0), tl.load(v_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _online_softmax_step(q, k, v, visible, qk_scale, m_i, l_i, acc, FP32_DOT: tl.constexpr):
    # One key tile of flash attention for query rows q [R, BLOCK_D]: scores (base 2, with
    # log2(e) folded into qk_scale), the running max m_i and sum l_i, and the accumulator
    # rescaled to the new max. Rows that see no key yet keep m = -inf; subtracting 0 there
    # keeps exp2 at 0 instead of NaN.
    if FP32_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(visible, s * qk_scale, float("-inf"))                                # [R, BLOCK_N]
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FP32_DOT:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def decode_split(seq_len, capacity, max_partition, num_splits, min_partition, BLOCK_N: tl.constexpr):
    """Sequence b's flash-decoding plan from its seq_len, the same in the decode and the merge
    kernel (mirrored by backends/triton_attention.py decode_split): (seq_len clamped into
    [0, capacity], tokens per partition, partitions that hold tokens). As many partitions as
    seq_len has min_partition tokens, between 1 and the grid's num_splits; each a whole
    number of BLOCK_N tiles and at most max_partition tokens (the launcher's capacity-sized
    partition: no program runs longer than a capacity-sized split would)."""
    seq_len = tl.minimum(tl.maximum(seq_len, 0), capacity)
    want = tl.minimum(tl.maximum(tl.cdiv(seq_len, min_partition), 1), num_splits)
    part = tl.minimum(tl.cdiv(tl.maximum(tl.cdiv(seq_len, want), 1), BLOCK_N) * BLOCK_N, max_partition)
    return seq_len, part, tl.maximum(tl.cdiv(seq_len, part), 1)


@triton.jit
def paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, out_ptr, lse_ptr,
    scale, max_partition, min_partition, num_blocks, max_blocks,
    stride_qb, stride_qh,
    stride_page, stride_row, stride_head,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len, partition, used = decode_split(tl.load(sl_ptr + b), max_blocks * PAGE, max_partition,
                                            tl.num_programs(2), min_partition, BLOCK_N)
    # Splits past the sequence's used ones write nothing: the merge reads only `used` of them.
    if split < used:
        start = split * partition
        end = tl.minimum(start + partition, seq_len)

        offs_g = tl.arange(0, BLOCK_G)
        heads = kvh * GROUP + offs_g
        g_mask = offs_g < GROUP
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        # exp2 with log2(e) folded into the scale: one multiply per score.
        qk_scale = scale * 1.4426950408889634

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for t0 in range(start, end, BLOCK_N):
            offs_t = t0 + tl.arange(0, BLOCK_N)
            t_mask = offs_t < end
            k, v = _load_kv_tile(k_ptr, v_ptr, bt_ptr + b * stride_btb, offs_t, t_mask, kvh, offs_d, d_mask,
                                 num_blocks, stride_page, stride_row, stride_head, PAGE)
            m_i, l_i, acc = _online_softmax_step(q, k, v, t_mask[None, :], qk_scale, m_i, l_i, acc, FP32_DOT)

        # Only a sequence of length 0 has an empty used split (its one): l = 0 there, the
        # output 0 and the log-sum-exp -inf, which the merge weighs 0.
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))    # base 2
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit
def paged_decode_merge_kernel(
    part_ptr, lse_ptr, out_ptr, sl_ptr,
    num_splits, capacity, max_partition, min_partition,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # out = sum_s 2^(lse_s - lse) out_s, lse = log2 sum_s 2^lse_s: the exact softmax over the
    # whole sequence from the results of its used partitions (decode_split, as the decode
    # kernel planned them; the others were never written).
    b = tl.program_id(0)
    h = tl.program_id(1)
    _, _, used = decode_split(tl.load(sl_ptr + b), capacity, max_partition, num_splits, min_partition, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < used
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    # Every partition empty (a sequence of length 0): weights 2^-inf = 0, output 0, not NaN.
    w = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    w = w / tl.maximum(tl.sum(w, axis=0), 1e-30)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    part = tl.load(part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                   mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(part * w[:, None], axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, qsl_ptr, out_ptr,
    scale, num_blocks, max_blocks, total_q,
    stride_qt, stride_qh,
    stride_page, stride_row, stride_head,
    stride_btb,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    m_block = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    num_new = tl.load(qsl_ptr + b + 1) - q_start
    if m_block * BLOCK_M < num_new:
        seq_len = tl.minimum(tl.load(sl_ptr + b), max_blocks * PAGE)
        context = seq_len - num_new                          # tokens cached before the new ones
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        # Rows of q this block reads and writes: within the sequence's new tokens and, whatever
        # query_start_loc holds, within q's total_q rows (never outside q or out).
        rows = q_start + offs_m
        m_mask = (offs_m < num_new) & (rows >= 0) & (rows < total_q)
        pos = context + offs_m                               # each query's position in the sequence
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        q = tl.load(q_ptr + rows[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        qk_scale = scale * 1.4426950408889634
        kvh = h // GROUP

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # Keys past the block's last query are never visible: stop there (causal).
        hi = tl.minimum(seq_len, context + (m_block + 1) * BLOCK_M)
        for t0 in range(0, hi, BLOCK_N):
            offs_t = t0 + tl.arange(0, BLOCK_N)
            t_mask = offs_t < hi
            k, v = _load_kv_tile(k_ptr, v_ptr, bt_ptr + b * stride_btb, offs_t, t_mask, kvh, offs_d, d_mask,
                                 num_blocks, stride_page, stride_row, stride_head, PAGE)
            visible = t_mask[None, :] & (offs_t[None, :] <= pos[:, None])
            m_i, l_i, acc = _online_softmax_step(q, k, v, visible, qk_scale, m_i, l_i, acc, FP32_DOT)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
