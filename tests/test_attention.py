"""write_kv, paged_attention and paged_prefill_attention against a dense attention computed
here (fp64 math on K/V gathered token by token), for every (device, backend) pair that
implements the op.

One parametrize per axis (GQA ratio, head_dim, block_size, dtype); the other axes keep
small defaults so the Triton interpreter finishes quickly on the CPU."""

import math

import pytest
import torch

import fourbit
from conftest import backend_cases, need
from fourbit import ops
from fourbit.kv_cache import PagedBatch
from helpers import DTYPES, relative_error

OP_OF = {"decode": "paged_attention", "prefill": "paged_prefill_attention"}
# (kind, device, backend) for every pair that implements decode, then prefill (no CUDA prefill kernel).
KIND_CASES = [pytest.param(kind, *case.values, marks=case.marks, id=f"{kind}-{case.id}")
              for kind in OP_OF for case in backend_cases(OP_OF[kind])]


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

    def batch(self, query_start_loc=None, slot_mapping=None) -> PagedBatch:
        """A checked PagedBatch over these sequences (decode unless query_start_loc is given);
        by default its new tokens write nowhere (slot -1): the cache already holds them."""
        tokens = len(self.seq_lens) if query_start_loc is None else int(query_start_loc[-1])
        if slot_mapping is None:
            slot_mapping = torch.full((tokens,), -1, dtype=torch.int64, device=self.device)
        return PagedBatch.from_tensors(slot_mapping=slot_mapping, block_tables=self.block_tables,
                                       seq_lens=self.seq_lens, query_start_loc=query_start_loc,
                                       num_blocks=self.k_cache.shape[0], block_size=self.block_size)


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
    out = fourbit.paged_attention(q, setup.k_cache, setup.v_cache, setup.batch(), scale, backend=backend)
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
    batch = setup.batch(torch.tensor(starts, dtype=torch.int32, device=device))
    out = fourbit.paged_prefill_attention(q, setup.k_cache, setup.v_cache, batch, scale, backend=backend)
    spans = list(zip(starts[:-1], starts[1:]))
    assert_attention_accuracy(out, q, setup, [s - n for s, n in zip(seq_lens, new)], spans,
                              scale or head_dim ** -0.5)


RUN = {"decode": run_decode, "prefill": run_prefill}


@pytest.mark.parametrize("kind,device,backend", KIND_CASES)
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8, 16], ids=lambda g: f"gqa{g}")
def test_gqa_ratios(group, kind, backend, device):
    need(device, backend, OP_OF[kind])
    RUN[kind](backend, device, heads=2 * group, kv_heads=2)


@pytest.mark.parametrize("kind,device,backend", KIND_CASES)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims(head_dim, kind, backend, device):
    need(device, backend, OP_OF[kind])
    RUN[kind](backend, device, head_dim=head_dim)


@pytest.mark.parametrize("kind,device,backend", KIND_CASES)
@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128])
def test_block_sizes(block_size, kind, backend, device):
    need(device, backend, OP_OF[kind])
    RUN[kind](backend, device, block_size=block_size)


@pytest.mark.parametrize("kind,device,backend", KIND_CASES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_dtypes_and_scale(dtype, kind, backend, device):
    need(device, backend, OP_OF[kind])
    RUN[kind](backend, device, dtype=dtype, scale=0.3)


@pytest.mark.parametrize("device,backend", [c for c in backend_cases("paged_attention") if c.values[1] == "triton"])
def test_decode_partitions_merge_exactly(device, backend):
    """Flash-decoding's split and log-sum-exp merge, forced to several partition sizes,
    including partitions that lie wholly past a sequence's end."""
    need(device, backend)
    from fourbit.backends import triton_attention
    setup = PagedSetup([3, 90, 200], 2, 64, 16, torch.float32, device)
    q = torch.randn(3, 4, 64, device=device)
    ref = fourbit.paged_attention(q, setup.k_cache, setup.v_cache, setup.batch(), backend="torch")
    for partition in (16, 48, 256):
        out = triton_attention.paged_attention(q, setup.k_cache, setup.v_cache, setup.block_tables,
                                               setup.seq_lens, 64 ** -0.5, partition=partition)
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("device,backend", [c for c in backend_cases("paged_attention") if c.values[0] == "cuda"])
@pytest.mark.parametrize("context", [4096, 32768, 131072])
def test_long_context_decode_on_cuda(context, device, backend):
    need(device, backend, "paged_attention")
    run_decode(backend, device, seq_lens=(context, 17), heads=32, kv_heads=8, head_dim=128)


@pytest.mark.parametrize("device,backend",
                         [c for c in backend_cases("paged_prefill_attention") if c.values[0] == "cuda"])
def test_long_prefill_on_cuda(device, backend):
    need(device, backend, "paged_prefill_attention")
    run_prefill(backend, device, seq_lens=(3000, 5000), new=(3000, 1000), heads=32, kv_heads=8, head_dim=128)


# ---- write_kv ----

@pytest.mark.parametrize("device,backend", backend_cases("write_kv"))
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_write_kv_is_bit_exact_and_skips_minus_one(dtype, device, backend):
    need(device, backend, "write_kv")
    num_blocks, block_size, kv_heads, head_dim = 6, 16, 3, 80
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype).to(device)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype).to(device)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size)[:20]
    slots[[3, 11]] = -1
    k = torch.randn(20, kv_heads, head_dim).to(dtype).to(device)
    v = torch.randn(20, kv_heads, head_dim).to(dtype).to(device)
    batch = PagedBatch.from_tensors(slot_mapping=slots.to(device), block_tables=torch.zeros(1, 2, dtype=torch.int32,
                                    device=device), seq_lens=torch.tensor([20], dtype=torch.int32, device=device),
                                    query_start_loc=torch.tensor([0, 20], dtype=torch.int32, device=device),
                                    num_blocks=num_blocks, block_size=block_size)
    fourbit.write_kv(k, v, k_cache, v_cache, batch, backend=backend)
    expect_k, expect_v = before_k.clone(), before_v.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expect_k[slot // block_size, slot % block_size] = k[t]
            expect_v[slot // block_size, slot % block_size] = v[t]
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


# ---- errors and op registration ----

def test_batch_errors_name_the_problem():
    """PagedBatch.from_tensors checks every index value once, when the step is planned."""
    s = PagedSetup([5, 9], 2, 64, 16, torch.float16)
    geometry = dict(num_blocks=s.k_cache.shape[0], block_size=16)
    slots = torch.full((2,), -1)

    def build(block_tables=s.block_tables, seq_lens=s.seq_lens, query_start_loc=None, slot_mapping=slots, **kw):
        return PagedBatch.from_tensors(slot_mapping=slot_mapping, block_tables=block_tables, seq_lens=seq_lens,
                                       query_start_loc=query_start_loc, **{**geometry, **kw})

    with pytest.raises(TypeError, match="block_tables must be a torch.int32"):
        build(block_tables=s.block_tables.long())
    with pytest.raises(ValueError, match="seq_lens must have shape"):
        build(seq_lens=s.seq_lens[:1])
    with pytest.raises(ValueError, match="seq_lens must lie in"):
        build(seq_lens=torch.tensor([5, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="seq_lens must lie in"):
        build(seq_lens=torch.tensor([5, 10**6], dtype=torch.int32))
    bad_table = s.block_tables.clone()
    bad_table[1, 0] = 99
    with pytest.raises(ValueError, match="outside"):
        build(block_tables=bad_table)
    with pytest.raises(ValueError, match="power of two"):
        build(block_size=12)
    with pytest.raises(ValueError, match="query_start_loc must rise"):
        build(query_start_loc=torch.tensor([0, 4, 3], dtype=torch.int32), slot_mapping=torch.full((6,), -1))
    with pytest.raises(ValueError, match="more new tokens"):
        build(query_start_loc=torch.tensor([0, 7, 14], dtype=torch.int32), slot_mapping=torch.full((14,), -1))
    with pytest.raises(ValueError, match="slot_mapping values"):
        build(slot_mapping=torch.tensor([0, 10**4]))
    with pytest.raises(TypeError, match="slot_mapping must be a torch.int64"):
        build(slot_mapping=torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_tables must have at least one column"):
        build(block_tables=s.block_tables[:, :0])


def test_op_errors_name_the_problem():
    """The ops check per call what the host knows: dtypes, shapes, devices, and that the
    batch was planned for this cache."""
    s = PagedSetup([5, 9], 2, 64, 16, torch.float16)
    batch = s.batch()
    q = torch.randn(2, 4, 64).half()
    args = (s.k_cache, s.v_cache, batch)
    with pytest.raises(TypeError, match="cache's dtype"):
        fourbit.paged_attention(q.float(), *args)
    with pytest.raises(ValueError, match="multiple of the 2 kv heads"):
        fourbit.paged_attention(torch.randn(2, 3, 64).half(), *args)
    with pytest.raises(ValueError, match="head_dim = 64"):
        fourbit.paged_attention(torch.randn(2, 4, 32).half(), *args)
    with pytest.raises(ValueError, match="contiguous"):
        fourbit.paged_attention(q, s.k_cache.transpose(0, 1), s.v_cache.transpose(0, 1), batch)
    with pytest.raises(ValueError, match="power of two"):
        fourbit.paged_attention(q, s.k_cache[:, :12].contiguous(), s.v_cache[:, :12].contiguous(), batch)
    with pytest.raises(ValueError, match="planned for"):
        fourbit.paged_attention(q, s.k_cache[:-1].contiguous(), s.v_cache[:-1].contiguous(), batch)
    with pytest.raises(TypeError, match="PagedBatch"):
        fourbit.paged_attention(q, s.k_cache, s.v_cache, s.block_tables)
    with pytest.raises(ValueError, match="one new token per sequence"):
        fourbit.paged_attention(q, s.k_cache, s.v_cache, s.batch(torch.tensor([0, 2, 3], dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"q must be \[3, num_heads"):
        fourbit.paged_prefill_attention(q, s.k_cache, s.v_cache, s.batch(torch.tensor([0, 2, 3], dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"k must be \[2, 2, head_dim"):
        fourbit.write_kv(torch.randn(3, 2, 64).half(), torch.randn(3, 2, 64).half(), *args)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors and the inputs are on cpu"):
        fourbit.paged_attention(q, *args, backend="cuda")


def test_a_batch_is_checked_each_time_it_is_built():
    """No memo: tables changed in place after a batch was built are caught when the next
    step's batch is built from them (each step builds its own)."""
    s = PagedSetup([5, 9], 2, 64, 16, torch.float16)
    q = torch.randn(2, 4, 64).half()
    fourbit.paged_attention(q, s.k_cache, s.v_cache, s.batch())
    s.seq_lens[1] = 10**6
    with pytest.raises(ValueError, match="seq_lens must lie in"):
        s.batch()
    s.seq_lens[1] = 9
    s.block_tables[1, 0] = 99
    with pytest.raises(ValueError, match="outside"):
        s.batch()
    s.block_tables[1, 0] = 0
    with pytest.raises(ValueError, match="slot_mapping values"):
        s.batch(slot_mapping=torch.tensor([0, 10**4]))


def test_empty_batch():
    s = PagedSetup([5], 2, 64, 16, torch.float16)
    q = torch.randn(0, 4, 64).half()
    batch = PagedBatch.from_tensors(slot_mapping=torch.empty(0, dtype=torch.int64), block_tables=s.block_tables[:0],
                                    seq_lens=s.seq_lens[:0], num_blocks=s.k_cache.shape[0], block_size=16)
    assert batch.batch_size == 0 and batch.max_query_len == 0
    assert fourbit.paged_attention(q, s.k_cache, s.v_cache, batch).shape == (0, 4, 64)
    assert fourbit.paged_prefill_attention(q, s.k_cache, s.v_cache, batch).shape == (0, 4, 64)


@pytest.mark.skipif(ops._C is None, reason="the ops are registered by fourbit._C")
@pytest.mark.parametrize("device,backend", backend_cases("paged_attention"))
def test_opcheck(device, backend):
    """The schemas, fakes and implementations agree (torch.library.opcheck), on every backend,
    Triton through its interpreter on the CPU."""
    need(device, backend, "paged_attention")
    s = PagedSetup([5, 20], 2, 64, 8, torch.float32, device)
    q = torch.randn(2, 4, 64, device=device)
    torch.library.opcheck(torch.ops.fourbit.paged_attention.default,
                          (q, s.k_cache, s.v_cache, s.block_tables, s.seq_lens, 0.125, backend))
    if backend in ops.available_backends(device, "paged_prefill_attention"):
        qp = torch.randn(7, 4, 64, device=device)
        torch.library.opcheck(torch.ops.fourbit.paged_prefill_attention.default,
                              (qp, s.k_cache, s.v_cache, s.block_tables, s.seq_lens,
                               torch.tensor([0, 2, 7], dtype=torch.int32, device=device), 5, 0.125, backend))
    if backend in ops.available_backends(device, "write_kv"):
        torch.library.opcheck(torch.ops.fourbit.write_kv.default,
                              (torch.randn(3, 2, 64, device=device), torch.randn(3, 2, 64, device=device),
                               s.k_cache.clone(), s.v_cache.clone(), torch.tensor([0, -1, 9], device=device), backend))


# ---- the cache and the ops together ----

@pytest.mark.parametrize("device,backend", backend_cases("write_kv"))
def test_paged_kv_cache_serves_prefill_and_decode(device, backend):
    """Sequences in a PagedKVCache (a shared prompt prefix, a fork with copy-on-write):
    steps planned by the cache write K/V at its slot_mapping, then prefill and decode through
    its block_tables and seq_lens, against dense attention over each sequence's own K/V history."""
    need(device, backend, "write_kv")
    heads, kv_heads, head_dim, block = 4, 2, 64, 8
    cache = fourbit.PagedKVCache(1, 32, block, kv_heads, head_dim, torch.float32, device)
    history = {}  # seq id -> (K, V) of its tokens, built here

    def feed(seq_ids, token_lists):
        """Plan a step appending token_lists, write their K/V; the step and each sequence's queries."""
        step = cache.plan(seq_ids, token_lists)
        n = step.num_tokens
        k, v, q = (torch.randn(n, h, head_dim, device=device) for h in (kv_heads, kv_heads, heads))
        fourbit.write_kv(k, v, *cache.layer(0), step, backend=backend)
        starts = step.query_start_loc.tolist()
        for b, seq_id in enumerate(seq_ids):
            old_k, old_v = history.get(seq_id, (k[:0], v[:0]))
            lo, hi = starts[b], starts[b + 1]
            history[seq_id] = (torch.cat([old_k, k[lo:hi]]), torch.cat([old_v, v[lo:hi]]))
        return step, q

    def check(step, q, seq_ids, backend_used):
        attend = fourbit.paged_attention if step.decode else fourbit.paged_prefill_attention
        out = attend(q, *cache.layer(0), step, backend=backend_used)
        starts = step.query_start_loc.tolist()
        for b, seq_id in enumerate(seq_ids):
            k, v = history[seq_id]
            lo, hi = starts[b], starts[b + 1]
            ref = dense_attention(q[lo:hi], k, v, head_dim ** -0.5, len(k) - (hi - lo))
            torch.testing.assert_close(out[lo:hi].double(), ref, rtol=1e-4, atol=1e-5)

    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    assert cache.add_sequence("a", prompt) == 0
    step, q = feed(["a"], [prompt])
    assert cache.add_sequence("b", prompt[:17] + [99]) == 16  # two full blocks shared
    history["b"] = tuple(t[:16] for t in history["a"])
    prefill = "auto" if backend == "cuda" else backend  # there is no CUDA prefill kernel
    check(step, q, ["a"], prefill)
    step, q = feed(["b"], [[prompt[16], 99]])
    check(step, q, ["b"], prefill)
    cache.fork("a", "c")  # shares a's partly filled last block: c's first append copies it
    history["c"] = history["a"]
    for t in (40, 41, 42):
        step, q = feed(["a", "b", "c"], [[t]] * 3)
        assert step.decode
        check(step, q, ["a", "b", "c"], backend)
    assert cache.blocks("a")[:2] == cache.blocks("b")[:2] == cache.blocks("c")[:2]
    assert cache.blocks("a")[-1] != cache.blocks("c")[-1]


# ---- whatever the tables hold, no kernel reads or writes outside its tensors ----

def guarded(shape, dtype, device, pad=64):
    """A random tensor of shape that is a view into a larger one with sentinel values before
    and after it: a write outside the view changes a sentinel."""
    n = math.prod(shape)
    storage = torch.full((n + 2 * pad,), 7.0, dtype=dtype, device=device)
    storage[pad:pad + n] = torch.randn(n, device=device).to(dtype)
    return storage, storage[pad:pad + n].view(shape)


def sentinels_intact(storage, pad=64):
    return bool((storage[:pad] == 7.0).all() and (storage[-pad:] == 7.0).all())


BAD_TABLES = {
    "pages-out-of-range": dict(block_tables=[[99, -5, 3], [2**30, 0, 1]]),
    "seq-lens-past-capacity": dict(seq_lens=[10**6, -3]),
    "query-start-loc-past-q": dict(query_start_loc=[0, 4000, 4005]),
    "query-start-loc-negative": dict(query_start_loc=[-100, 2, 5]),
    "slots-out-of-range": dict(slot_mapping=[10**9, -7, 3, 2**40, 5]),
}


@pytest.mark.parametrize("device,backend", backend_cases("paged_prefill_attention"))
@pytest.mark.parametrize("bad", BAD_TABLES.values(), ids=BAD_TABLES.keys())
def test_bad_tables_never_reach_outside_memory(bad, device, backend):
    """A PagedBatch made directly is trusted (no value checks: a caller who bypasses
    from_tensors, or tensors changed in place through an alias after the check). Whatever it
    holds, write_kv and prefill / decode attention neither crash nor write outside the cache,
    q or out (sentinels around every tensor stay intact); the Triton interpreter raises on
    any access outside a tensor, so this also covers reads there."""
    need(device, backend, "paged_prefill_attention")
    num_blocks, block, kv_heads, heads, head_dim = 6, 8, 2, 4, 64
    k_store, k_cache = guarded((num_blocks, block, kv_heads, head_dim), torch.float32, device)
    v_store, v_cache = guarded((num_blocks, block, kv_heads, head_dim), torch.float32, device)
    tensors = dict(slot_mapping=[0, 1, 2, 3, 4], block_tables=[[0, 1, 2], [3, 4, 5]], seq_lens=[10, 7],
                   query_start_loc=[0, 2, 5])
    tensors.update(bad)
    dtypes = dict(slot_mapping=torch.int64, block_tables=torch.int32, seq_lens=torch.int32,
                  query_start_loc=torch.int32)
    t = {name: torch.tensor(v, dtype=dtypes[name], device=device) for name, v in tensors.items()}
    q_store, q = guarded((5, heads, head_dim), torch.float32, device)
    kv = torch.randn(5, kv_heads, head_dim, device=device)
    prefill = PagedBatch(t["slot_mapping"], t["block_tables"], t["seq_lens"], t["query_start_loc"], 5, 10,
                         num_blocks, block)
    fourbit.write_kv(kv, kv, k_cache, v_cache, prefill, backend=backend)
    fourbit.paged_prefill_attention(q, k_cache, v_cache, prefill, backend=backend)
    decode = PagedBatch(t["slot_mapping"][:2], t["block_tables"], t["seq_lens"],
                        torch.arange(3, dtype=torch.int32, device=device), 1, 10, num_blocks, block)
    fourbit.paged_attention(q[:2], k_cache, v_cache, decode, backend=backend)
    assert sentinels_intact(k_store) and sentinels_intact(v_store) and sentinels_intact(q_store)


@pytest.mark.parametrize("device,backend", backend_cases("paged_attention"))
def test_a_sequence_of_length_zero_attends_to_nothing(device, backend):
    """A trusted batch with seq_lens 0 (a padded row) gives zeros, not NaN, on every backend."""
    need(device, backend, "paged_attention")
    s = PagedSetup([5, 9], 2, 64, 16, torch.float32, device)
    s.seq_lens[0] = 0
    batch = PagedBatch(torch.full((2,), -1, device=device), s.block_tables, s.seq_lens,
                       torch.arange(3, dtype=torch.int32, device=device), 1, 9, s.k_cache.shape[0], 16)
    q = torch.randn(2, 4, 64, device=device)
    out = fourbit.paged_attention(q, s.k_cache, s.v_cache, batch, backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isfinite(out[1]).all()
