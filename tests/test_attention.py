"""write_kv, paged_attention and paged_prefill_attention against a dense attention computed
here (fp64 math on K/V gathered token by token), for every backend that runs on the device.

One parametrize per axis (GQA ratio, head_dim, block_size, dtype); the other axes keep
small defaults so the Triton interpreter finishes quickly on the CPU."""

import math

import pytest
import torch

import fourbit
from fourbit import ops
from conftest import DEVICES
from helpers import DTYPES, relative_error

BACKENDS = ["torch", "triton", "cuda"]
OP_OF = {"decode": "paged_attention", "prefill": "paged_prefill_attention"}


def need(backend, device, op="paged_attention"):
    if backend not in ops.available_backends(device, op):
        pytest.skip(f"backend {backend!r} does not run {op} on {device} here")


class PagedSetup:
    """A random paged cache holding B sequences in shuffled, scattered pages, with the dense
    K/V of each sequence kept on the side (built token by token, not through the layout)."""

    def __init__(self, seq_lens, kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16, device="cpu",
                 spare_blocks=3):
        self.block_size, self.dtype, self.device = block_size, dtype, device
        blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
        num_blocks = sum(blocks_per_seq) + spare_blocks
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k_cache = torch.randn(shape).to(dtype).to(device)  # unused pages hold noise too
        self.v_cache = torch.randn(shape).to(dtype).to(device)
        pages = torch.randperm(num_blocks).tolist()  # pages in any order
        width = max(blocks_per_seq) + 1  # a spare column: tables wider than needed
        self.block_tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
        self.keys, self.values = [], []
        for b, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
            mine, pages = pages[:nb], pages[nb:]
            self.block_tables[b, :nb] = torch.tensor(mine, dtype=torch.int32)
            self.keys.append(torch.stack([self.k_cache[mine[t // block_size], t % block_size] for t in range(n)]))
            self.values.append(torch.stack([self.v_cache[mine[t // block_size], t % block_size] for t in range(n)]))
        self.block_tables = self.block_tables.to(device)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)


def dense_attention(q, k, v, scale, first_pos, dtype=torch.float64):
    """q [T, Hq, D] at positions first_pos.. over k, v [L, Hkv, D], causal, in `dtype`."""
    group = q.shape[1] // k.shape[1]
    k, v = k.to(dtype).repeat_interleave(group, 1), v.to(dtype).repeat_interleave(group, 1)
    scores = torch.einsum("thd,lhd->htl", q.to(dtype), k) * scale
    visible = torch.arange(k.shape[0])[None, :] <= (first_pos + torch.arange(q.shape[0]))[:, None]
    return torch.einsum("htl,lhd->thd", scores.masked_fill(~visible.to(q.device), float("-inf")).softmax(-1), v)


def assert_attention_accuracy(out, q, setup, first_positions, spans, scale):
    """out must be as close to fp64 attention as the same math in q's dtype is: relative
    error at most twice that, with a floor of a few fp32 roundings."""
    ref = torch.cat([dense_attention(q[lo:hi], setup.keys[b], setup.values[b], scale, first_positions[b])
                     for b, (lo, hi) in enumerate(spans)])
    plain = torch.cat([dense_attention(q[lo:hi], setup.keys[b], setup.values[b], scale, first_positions[b], q.dtype)
                       for b, (lo, hi) in enumerate(spans)])
    assert out.dtype == q.dtype and out.shape == q.shape and torch.isfinite(out).all()
    err, err_plain = relative_error(out, ref), relative_error(plain, ref)
    assert err <= 2 * err_plain + 4 * torch.finfo(torch.float32).eps, f"relative error {err:.3g} vs {err_plain:.3g}"


def run_decode(backend, device, seq_lens=(1, 37, 70), heads=4, kv_heads=2, head_dim=64, block_size=16,
               dtype=torch.float16, scale=None):
    setup = PagedSetup(list(seq_lens), kv_heads, head_dim, block_size, dtype, device)
    q = torch.randn(len(seq_lens), heads, head_dim).to(dtype).to(device)
    out = fourbit.paged_attention(q, setup.k_cache, setup.v_cache, setup.block_tables, setup.seq_lens, scale,
                                  backend=backend)
    spans = [(b, b + 1) for b in range(len(seq_lens))]
    assert_attention_accuracy(out, q, setup, [n - 1 for n in seq_lens], spans, scale or head_dim ** -0.5)


def run_prefill(backend, device, seq_lens=(5, 40, 23), new=(5, 17, 1), heads=4, kv_heads=2, head_dim=64,
                block_size=16, dtype=torch.float16, scale=None):
    """Sequence b holds seq_lens[b] tokens, of which the last new[b] are queries (new[b] ==
    seq_lens[b] is a plain prefill; fewer is chunked prefill over a cached prefix)."""
    setup = PagedSetup(list(seq_lens), kv_heads, head_dim, block_size, dtype, device)
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, head_dim).to(dtype).to(device)
    out = fourbit.paged_prefill_attention(q, setup.k_cache, setup.v_cache, setup.block_tables, setup.seq_lens,
                                          torch.tensor(starts, dtype=torch.int32, device=device), scale,
                                          backend=backend)
    spans = list(zip(starts[:-1], starts[1:]))
    assert_attention_accuracy(out, q, setup, [s - n for s, n in zip(seq_lens, new)], spans,
                              scale or head_dim ** -0.5)


RUN = {"decode": run_decode, "prefill": run_prefill}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8, 16], ids=lambda g: f"gqa{g}")
def test_gqa_ratios(group, kind, backend, device):
    need(backend, device, OP_OF[kind])
    RUN[kind](backend, device, heads=2 * group, kv_heads=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims(head_dim, kind, backend, device):
    need(backend, device, OP_OF[kind])
    RUN[kind](backend, device, head_dim=head_dim)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128])
def test_block_sizes(block_size, kind, backend, device):
    need(backend, device, OP_OF[kind])
    RUN[kind](backend, device, block_size=block_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_dtypes_and_scale(dtype, kind, backend, device):
    need(backend, device, OP_OF[kind])
    RUN[kind](backend, device, dtype=dtype, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_partitions_merge_exactly(device):
    """Flash-decoding's split and log-sum-exp merge, forced to several partition sizes,
    including partitions that lie wholly past a sequence's end."""
    need("triton", device)
    from fourbit import triton_attention
    setup = PagedSetup([3, 90, 200], 2, 64, 16, torch.float32, device)
    q = torch.randn(3, 4, 64, device=device)
    ref = fourbit.paged_attention(q, setup.k_cache, setup.v_cache, setup.block_tables, setup.seq_lens,
                                  backend="torch")
    for partition in (16, 48, 256):
        out = triton_attention.paged_attention(q, setup.k_cache, setup.v_cache, setup.block_tables,
                                               setup.seq_lens, 64 ** -0.5, partition=partition)
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("context", [4096, 32768, 131072])
def test_long_context_decode_on_cuda(context, backend):
    need(backend, "cuda")
    run_decode(backend, "cuda", seq_lens=(context, 17), heads=32, kv_heads=8, head_dim=128)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_long_prefill_on_cuda(backend):
    need(backend, "cuda", "paged_prefill_attention")
    run_prefill(backend, "cuda", seq_lens=(3000, 5000), new=(3000, 1000), heads=32, kv_heads=8, head_dim=128)


# ---- write_kv ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_write_kv_is_bit_exact_and_skips_minus_one(dtype, backend, device):
    need(backend, device, "write_kv")
    num_blocks, block_size, kv_heads, head_dim = 6, 16, 3, 80
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype).to(device)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype).to(device)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size)[:20]
    slots[[3, 11]] = -1
    k = torch.randn(20, kv_heads, head_dim).to(dtype).to(device)
    v = torch.randn(20, kv_heads, head_dim).to(dtype).to(device)
    fourbit.write_kv(k, v, k_cache, v_cache, slots.to(device), backend=backend)
    expect_k, expect_v = before_k.clone(), before_v.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expect_k[slot // block_size, slot % block_size] = k[t]
            expect_v[slot // block_size, slot % block_size] = v[t]
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


# ---- errors and op registration ----

def test_errors_name_the_problem():
    s = PagedSetup([5, 9], 2, 64, 16, torch.float16)
    q = torch.randn(2, 4, 64).half()
    args = (s.k_cache, s.v_cache, s.block_tables, s.seq_lens)
    with pytest.raises(TypeError, match="cache's dtype"):
        fourbit.paged_attention(q.float(), *args)
    with pytest.raises(ValueError, match="multiple of the 2 kv heads"):
        fourbit.paged_attention(torch.randn(2, 3, 64).half(), *args)
    with pytest.raises(ValueError, match="head_dim = 64"):
        fourbit.paged_attention(torch.randn(2, 4, 32).half(), *args)
    with pytest.raises(TypeError, match="block_tables must be a torch.int32"):
        fourbit.paged_attention(q, s.k_cache, s.v_cache, s.block_tables.long(), s.seq_lens)
    with pytest.raises(ValueError, match="seq_lens must have shape"):
        fourbit.paged_attention(q, s.k_cache, s.v_cache, s.block_tables, s.seq_lens[:1])
    with pytest.raises(ValueError, match="seq_lens must lie in"):
        fourbit.paged_attention(q, s.k_cache, s.v_cache, s.block_tables, torch.tensor([5, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="seq_lens must lie in"):
        fourbit.paged_attention(q, s.k_cache, s.v_cache, s.block_tables, torch.tensor([5, 10**6], dtype=torch.int32))
    bad_table = s.block_tables.clone()
    bad_table[1, 0] = 99
    with pytest.raises(ValueError, match="outside"):
        fourbit.paged_attention(q, s.k_cache, s.v_cache, bad_table, s.seq_lens)
    with pytest.raises(ValueError, match="contiguous"):
        fourbit.paged_attention(q, s.k_cache.transpose(0, 1), s.v_cache.transpose(0, 1), s.block_tables, s.seq_lens)
    with pytest.raises(ValueError, match="power of two"):
        fourbit.paged_attention(q, s.k_cache[:, :12].contiguous(), s.v_cache[:, :12].contiguous(),
                                s.block_tables, s.seq_lens)
    with pytest.raises(ValueError, match="query_start_loc must rise"):
        fourbit.paged_prefill_attention(torch.randn(6, 4, 64).half(), *args, torch.tensor([0, 4, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="more new tokens"):
        fourbit.paged_prefill_attention(torch.randn(14, 4, 64).half(), *args, torch.tensor([0, 7, 14], dtype=torch.int32))
    with pytest.raises(ValueError, match="slot_mapping values"):
        fourbit.write_kv(torch.randn(2, 2, 64).half(), torch.randn(2, 2, 64).half(), s.k_cache, s.v_cache,
                         torch.tensor([0, 10**4]))
    with pytest.raises(TypeError, match="slot_mapping must be a torch.int64"):
        fourbit.write_kv(torch.randn(2, 2, 64).half(), torch.randn(2, 2, 64).half(), s.k_cache, s.v_cache,
                         torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="no 'cpu' kernel for paged_attention"):
        fourbit.paged_attention(q, *args, backend="cpu")


def test_index_values_are_checked_again_after_an_in_place_change():
    """Checks run once per tensor (a model reuses a step's tables in every layer), but a
    tensor changed in place since its check is checked again."""
    s = PagedSetup([5, 9], 2, 64, 16, torch.float16)
    q = torch.randn(2, 4, 64).half()
    slots = torch.tensor([0, 1])
    kv = torch.randn(2, 2, 64).half()
    fourbit.paged_attention(q, s.k_cache, s.v_cache, s.block_tables, s.seq_lens)
    fourbit.write_kv(kv, kv, s.k_cache, s.v_cache, slots)
    s.seq_lens[1] = 10**6
    with pytest.raises(ValueError, match="seq_lens must lie in"):
        fourbit.paged_attention(q, s.k_cache, s.v_cache, s.block_tables, s.seq_lens)
    s.seq_lens[1] = 9
    s.block_tables[1, 0] = 99
    with pytest.raises(ValueError, match="outside"):
        fourbit.paged_attention(q, s.k_cache, s.v_cache, s.block_tables, s.seq_lens)
    slots[1] = 10**4
    with pytest.raises(ValueError, match="slot_mapping values"):
        fourbit.write_kv(kv, kv, s.k_cache, s.v_cache, slots)


def test_empty_batch():
    s = PagedSetup([5], 2, 64, 16, torch.float16)
    q = torch.randn(0, 4, 64).half()
    out = fourbit.paged_attention(q, s.k_cache, s.v_cache, s.block_tables[:0], s.seq_lens[:0])
    assert out.shape == (0, 4, 64)


@pytest.mark.skipif(ops._C is None, reason="the ops are registered by fourbit._C")
def test_opcheck():
    s = PagedSetup([5, 20], 2, 64, 8, torch.float32)
    q = torch.randn(2, 4, 64)
    torch.library.opcheck(torch.ops.fourbit.paged_attention.default,
                          (q, s.k_cache, s.v_cache, s.block_tables, s.seq_lens, 0.125, "torch"))
    qp = torch.randn(7, 4, 64)
    torch.library.opcheck(torch.ops.fourbit.paged_prefill_attention.default,
                          (qp, s.k_cache, s.v_cache, s.block_tables, s.seq_lens,
                           torch.tensor([0, 2, 7], dtype=torch.int32), 0.125, "torch"))
    torch.library.opcheck(torch.ops.fourbit.write_kv.default,
                          (torch.randn(3, 2, 64), torch.randn(3, 2, 64), s.k_cache.clone(), s.v_cache.clone(),
                           torch.tensor([0, -1, 9]), "torch"))


# ---- the cache and the ops together ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_kv_cache_serves_prefill_and_decode(backend, device):
    """Sequences in a PagedKVCache (a shared prompt prefix, a fork with copy-on-write):
    write_kv at the cache's slot_mapping, then prefill and decode through its block_tables
    and seq_lens, against dense attention over each sequence's own K/V history."""
    need(backend, device, "write_kv")
    heads, kv_heads, head_dim, block = 4, 2, 64, 8
    cache = fourbit.PagedKVCache(1, 32, block, kv_heads, head_dim, torch.float32, device)
    history = {}  # seq id -> (K, V) of its tokens, built here

    def feed(seq_id, tokens):
        """Append tokens, write their K/V, and attend with their queries (prefill)."""
        slots = cache.append(seq_id, tokens)
        k, v, q = (torch.randn(len(tokens), n, head_dim, device=device) for n in (kv_heads, kv_heads, heads))
        fourbit.write_kv(k, v, *cache.layer(0), slots, backend=backend)
        old_k, old_v = history.get(seq_id, (k[:0], v[:0]))
        history[seq_id] = (torch.cat([old_k, k]), torch.cat([old_v, v]))
        return q

    def check_prefill(seq_ids, queries, backend_used):
        starts = torch.tensor([0] + [len(q) for q in queries], dtype=torch.int32).cumsum(0).to(torch.int32)
        q = torch.cat(queries)
        out = fourbit.paged_prefill_attention(q, *cache.layer(0), cache.block_tables(seq_ids), cache.seq_lens(seq_ids),
                                              starts.to(device), backend=backend_used)
        for b, seq_id in enumerate(seq_ids):
            k, v = history[seq_id]
            ref = dense_attention(queries[b], k, v, head_dim ** -0.5, len(k) - len(queries[b]))
            torch.testing.assert_close(out[starts[b]:starts[b + 1]].double(), ref, rtol=1e-4, atol=1e-5)

    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    assert cache.add_sequence("a", prompt) == 0
    qa = feed("a", prompt)
    assert cache.add_sequence("b", prompt[:17] + [99]) == 16  # two full blocks shared
    history["b"] = tuple(t[:16] for t in history["a"])
    qb = feed("b", [prompt[16], 99])
    prefill = "auto" if backend == "cuda" else backend  # there is no CUDA prefill kernel
    check_prefill(["a", "b"], [qa, qb], prefill)
    cache.fork("a", "c")  # shares a's partly filled last block: c's first append copies it
    history["c"] = history["a"]
    steps = {seq_id: [feed(seq_id, [t]) for t in (40, 41, 42)][-1] for seq_id in ("a", "b", "c")}
    assert cache.blocks("a")[:2] == cache.blocks("b")[:2] == cache.blocks("c")[:2]
    assert cache.blocks("a")[-1] != cache.blocks("c")[-1]
    seq_ids = ["a", "b", "c"]
    q = torch.cat([steps[s] for s in seq_ids])
    out = fourbit.paged_attention(q, *cache.layer(0), cache.block_tables(seq_ids), cache.seq_lens(seq_ids),
                                  backend=backend)
    for b, seq_id in enumerate(seq_ids):
        k, v = history[seq_id]
        ref = dense_attention(q[b:b + 1], k, v, head_dim ** -0.5, len(k) - 1)
        torch.testing.assert_close(out[b:b + 1].double(), ref, rtol=1e-4, atol=1e-5)
