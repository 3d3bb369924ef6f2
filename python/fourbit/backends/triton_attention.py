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

from . import devices, interpreted

# Decode splits a sequence into partitions of about this many tokens (more than half, at most
# this rounded to whole key tiles) where the grid has splits enough, fewer longer ones where not...
MIN_PARTITION = 256
# ... and uses as many as it takes to give the GPU this many programs per SM.
PROGRAMS_PER_SM = 2


def _min_partition(device: torch.device) -> int:
    # The interpreter's key tiles are 16 tokens: partitions of two of them let the tests
    # spread short sequences over several partitions.
    return MIN_PARTITION if device.type == "cuda" else 32


def _sm_count(device: torch.device) -> int:
    # The interpreter has no SMs; 4 makes the tests exercise several partitions.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


# Tile candidates, best first, as (BLOCK_M, BLOCK_N, num_warps, num_stages): the first that
# fits the GPU's shared memory is taken. Wide tiles take 8 warps past head_dim 64 so the fp32
# accumulator [BLOCK_M, head_dim] stays in registers; fp32 inputs (exact fp32 products on
# CUDA cores) take small tiles. `make kernel-check` compiles the choice for every head_dim,
# dtype and supported GPU and fails on any that overflows shared memory or spills.
_CANDIDATES = {
    (2, False): [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 1)],
    (2, True): [(64, 64, 8, 3), (32, 64, 4, 2), (32, 32, 4, 2), (16, 16, 4, 1)],
    (4, False): [(32, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 1)],
    (4, True): [(16, 32, 8, 2), (16, 16, 8, 1), (16, 16, 4, 1)],
}


def attention_shared_bytes(block_m: int, block_n: int, num_stages: int, head_dim: int, dtype_bytes: int) -> int:
    """An upper bound on the shared memory of a paged attention tile (proved against the
    compiled kernels by `make kernel-check`): K and V tiles per pipeline stage, the query
    block, and the probabilities on their way into the second dot."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    return (max(1, num_stages) * 2 * block_n * block_d * dtype_bytes + block_m * block_d * dtype_bytes
            + block_m * block_n * 4)


def attention_tiles(kind: str, head_dim: int, dtype: torch.dtype, props: devices.DeviceProps,
                    group: int = 1) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for kind "prefill" or "decode" at head_dim
    and dtype on a GPU `props`. BLOCK_M is the query rows of a prefill tile; decode's rows
    are the GQA group's heads (BLOCK_G, at least 16). Never a tile that does not fit."""
    if kind not in ("prefill", "decode"):
        raise ValueError(f"unknown attention kind {kind!r}; choose 'prefill' or 'decode'")
    size = torch.empty((), dtype=dtype).element_size()
    block_d = max(16, triton.next_power_of_2(head_dim))
    rows = max(16, triton.next_power_of_2(group)) if kind == "decode" else None
    for block_m, block_n, warps, stages in _CANDIDATES[(size, block_d > 64)]:
        block_m = rows or block_m
        if attention_shared_bytes(block_m, block_n, stages, head_dim, size) <= props.max_shared_mem:
            return block_m, block_n, warps, stages
    raise RuntimeError(f"no paged attention tile for head_dim {head_dim} in {dtype} fits "
                       f"{props.max_shared_mem} bytes of shared memory")


def _tiles(kind: str, q: torch.Tensor, group: int = 1) -> tuple[int, int, int, int]:
    """The launch's tiles. Small in the interpreter, where each program runs in Python and
    the tests want several tiles per sequence."""
    if interpreted():
        return (max(16, triton.next_power_of_2(group)) if kind == "decode" else 16), 16, 4, 1
    return attention_tiles(kind, q.shape[-1], q.dtype, devices.current(q.device), group)


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


def decode_partition(batch: int, kv_heads: int, capacity: int, block_n: int, sms: int,
                     min_partition: int = MIN_PARTITION) -> int:
    """The grid's tokens per decode partition, from the page table's capacity (known on the
    host): enough partitions that batch x kv_heads x partitions fills the GPU, none shorter
    than min_partition, a whole number of key tiles. The grid has cdiv(capacity, it) splits;
    each sequence then takes its own partition of at most this many tokens (decode_split)."""
    splits = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, batch * kv_heads), triton.cdiv(capacity, min_partition)))
    return triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n


def decode_split(seq_len: int, capacity: int, max_partition: int, num_splits: int, min_partition: int,
                 block_n: int) -> tuple[int, int, int]:
    """What the kernels compute on the device from a sequence's seq_len (decode_split in
    kernels/paged_attention.py, which this mirrors): (seq_len clamped into [0, capacity],
    its tokens per partition, the partitions that hold tokens)."""
    seq_len = min(max(seq_len, 0), capacity)
    want = min(max(triton.cdiv(seq_len, min_partition), 1), num_splits)
    part = min(triton.cdiv(max(triton.cdiv(seq_len, want), 1), block_n) * block_n, max_partition)
    return seq_len, part, max(triton.cdiv(seq_len, part), 1)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float, partition: int | None = None):
    """Decode (ops.paged_attention). The grid is sized from the table width; each program
    plans its sequence's partitions from seq_lens on the device (no host read). partition
    forces the grid's tokens per split, the most any sequence's partition may hold (tests)."""
    batch, heads, head_dim = q.shape
    kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    capacity = block_tables.shape[1] * page
    block_g, block_n, num_warps, num_stages = _tiles("decode", q, group)
    min_partition = _min_partition(q.device)
    partition = partition or decode_partition(batch, kv_heads, capacity, block_n, _sm_count(q.device), min_partition)
    splits = triton.cdiv(capacity, partition)
    out = torch.empty(q.shape, device=q.device, dtype=_store_dtype(q.dtype))
    # One partition: the kernel writes the final output. Several: fp32 partials, then the merge.
    part = out.unsqueeze(2) if splits == 1 else torch.empty((batch, heads, splits, head_dim), device=q.device,
                                                           dtype=torch.float32)
    lse = torch.empty((batch, heads, splits), device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _kernels.paged_decode_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part, lse,
        scale, partition, min_partition, k_cache.shape[0], block_tables.shape[1],
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE=page, BLOCK_N=block_n, FP32_DOT=_fp32_dot(q.dtype), num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        _kernels.paged_decode_merge_kernel[(batch, heads)](
            part, lse, out, seq_lens,
            splits, capacity, partition, min_partition,
            part.stride(0), part.stride(1), part.stride(2),
            lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits), BLOCK_N=block_n)
    return out.to(q.dtype)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len: int,
                            scale: float):
    """Prefill (ops.paged_prefill_attention). max_query_len, the most new tokens of any
    sequence (known on the host when the batch is planned), sizes the grid."""
    total_q, heads, head_dim = q.shape
    batch = block_tables.shape[0]
    kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    block_m, block_n, num_warps, num_stages = _tiles("prefill", q)
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
        BLOCK_M=block_m, BLOCK_N=block_n, FP32_DOT=_fp32_dot(q.dtype), num_warps=num_warps, num_stages=num_stages)
    return out.to(q.dtype)
