"""Triton split-KV decode: each sequence's partitions are planned on the device from its
seq_len (kernels/paged_attention.py decode_split), inside a grid sized from the table width
(backends/triton_attention.py). Checked against fourbit.reference.paged_attention over
batches mixing lengths 0 .. capacity in one wide table, and through the partial
log-sum-exps the decode kernel leaves for the merge: exactly the planned splits hold tokens,
each exactly its planned tokens, and a short sequence in a wide table spreads over several."""

import math

import pytest
import torch
import triton
import triton.language as tl
from fourbit.kernels.paged_attention import decode_split

from conftest import backend_cases, need
from fourbit import reference
from fourbit.backends import triton_attention as ta
from helpers import DTYPES, relative_error

TRITON_CASES = [c for c in backend_cases("paged_attention") if c.values[1] == "triton"]
CAPACITY = 256


def lengths(capacity):
    return [0, 1, 15, 16, 17, 64, capacity - 1, capacity]


class WideCache:
    """Sequences of seq_lens tokens in shuffled pages of one table `capacity` tokens wide;
    the table's entries past each sequence's end point at random pages full of noise."""

    def __init__(self, seq_lens, capacity, kv_heads, head_dim, block_size, dtype, device):
        width = capacity // block_size
        used = [math.ceil(n / block_size) for n in seq_lens]
        num_blocks = sum(used) + 2
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k_cache = torch.randn(shape).to(dtype).to(device)
        self.v_cache = torch.randn(shape).to(dtype).to(device)
        self.block_tables = torch.randint(0, num_blocks, (len(seq_lens), width), dtype=torch.int32)
        pages = torch.randperm(num_blocks)
        for b, nb in enumerate(used):
            self.block_tables[b, :nb], pages = pages[:nb].to(torch.int32), pages[nb:]
        self.block_tables = self.block_tables.to(device)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        self.capacity, self.block_size = capacity, block_size

    def keys(self, b):
        """Sequence b's keys [seq_len, Hkv, D], gathered token by token."""
        n, bt = int(self.seq_lens[b]), self.block_tables[b].tolist()
        return torch.stack([self.k_cache[bt[t // self.block_size], t % self.block_size] for t in range(n)])


class Recorder:
    """Stands in for paged_decode_kernel: fills the lse buffer with NaN (so a slot no program
    wrote shows), runs the kernel, and keeps the grid and buffers the launcher passed."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            lse = args[6]
            lse.fill_(float("nan"))
            self.kernel[grid](*args, **kwargs)
            self.launches.append({"grid": grid, "lse": lse.clone(), "max_partition": args[8],
                                  "min_partition": args[9], "block_n": kwargs["BLOCK_N"]})
        return launch


def run(cache, q, scale, monkeypatch, sms=None):
    """The Triton decode with the decode kernel recorded (and the SM count set, if given)."""
    recorder = Recorder(ta._kernels.paged_decode_kernel)
    monkeypatch.setattr(ta._kernels, "paged_decode_kernel", recorder)
    if sms is not None:
        monkeypatch.setattr(ta, "_sm_count", lambda device: sms)
    out = ta.paged_attention(q, cache.k_cache, cache.v_cache, cache.block_tables, cache.seq_lens, scale)
    (launch,) = recorder.launches
    return out, launch


def plan(cache, launch, b):
    return ta.decode_split(int(cache.seq_lens[b]), cache.capacity, launch["max_partition"], launch["grid"][2],
                           launch["min_partition"], launch["block_n"])


def check_decode(seq_lens, monkeypatch, device, sms=None, heads=4, kv_heads=2, head_dim=64, block_size=16,
                 dtype=torch.float16, capacity=CAPACITY):
    cache = WideCache(seq_lens, capacity, kv_heads, head_dim, block_size, dtype, device)
    q = torch.randn(len(seq_lens), heads, head_dim).to(dtype).to(device)
    scale = head_dim ** -0.5
    out, launch = run(cache, q, scale, monkeypatch, sms)

    # Against the reference: as close to its fp64 result as the reference in q's dtype is.
    args = (cache.block_tables, cache.seq_lens, scale)
    exact = reference.paged_attention(q.double(), cache.k_cache.double(), cache.v_cache.double(), *args)
    plain = reference.paged_attention(q, cache.k_cache, cache.v_cache, *args)
    assert out.dtype == q.dtype and out.shape == q.shape and torch.isfinite(out).all()
    err, err_plain = relative_error(out, exact), relative_error(plain, exact)
    assert err <= 2 * err_plain + 4 * torch.finfo(torch.float32).eps, f"relative error {err:.3g} vs {err_plain:.3g}"
    assert torch.equal(out[cache.seq_lens == 0], torch.zeros_like(out[cache.seq_lens == 0]))

    # The grid comes from the table width alone; each sequence's used splits hold tokens
    # (finite lse), and no program past them wrote anything.
    batch, grid_kv, splits = launch["grid"]
    assert (batch, grid_kv) == (len(seq_lens), kv_heads)
    assert splits == triton.cdiv(capacity, launch["max_partition"])
    lse = launch["lse"]
    for b, n in enumerate(seq_lens):
        _, part, used = plan(cache, launch, b)
        assert part <= launch["max_partition"] and used <= splits and (used - 1) * part < max(n, 1) <= used * part
        if n == 0:
            assert (lse[b, :, 0] == float("-inf")).all()
        else:
            assert torch.isfinite(lse[b, :, :used]).all(), f"seq_len {n}: a planned split got no tokens"
        assert lse[b, :, used:].isnan().all(), f"seq_len {n}: a split past the plan wrote its lse"
    return launch


# SM counts that give the batch of lengths() one split (no merge), 3 (partitions capped
# at the grid's) and 8 (every sequence planned by its own length).
@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("sms,splits", [(4, 1), (24, 3), (132, 8)], ids=["splits1", "splits3", "splits8"])
def test_mixed_lengths_in_a_wide_table(sms, splits, monkeypatch, device, backend):
    need(device, backend)
    launch = check_decode(lengths(CAPACITY), monkeypatch, device, sms=sms)
    assert launch["grid"][2] == splits


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("group", [1, 3, 8], ids=lambda g: f"gqa{g}")
def test_gqa_groups(group, monkeypatch, device, backend):
    need(device, backend)
    check_decode(lengths(CAPACITY), monkeypatch, device, sms=132, heads=2 * group)


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims(head_dim, monkeypatch, device, backend):
    need(device, backend)
    check_decode([0, 17, 100, CAPACITY], monkeypatch, device, sms=132, head_dim=head_dim)


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_dtypes(dtype, monkeypatch, device, backend):
    need(device, backend)
    check_decode(lengths(CAPACITY), monkeypatch, device, sms=132, dtype=dtype)


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("block_size", [8, 64])
def test_block_sizes(block_size, monkeypatch, device, backend):
    need(device, backend)
    check_decode(lengths(CAPACITY), monkeypatch, device, sms=132, block_size=block_size)


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_short_sequence_in_a_wide_table_spreads_over_splits(monkeypatch, device, backend):
    """64 tokens in a 4096-token table: the grid's partition is 1024 tokens (all 64 would
    land in split 0), but the sequence takes 2 partitions of 32, and each split's lse is the
    log-sum-exp of exactly its planned tokens."""
    need(device, backend)
    cache = WideCache([64], 4096, 2, 64, 16, torch.float32, device)
    q = torch.randn(1, 4, 64, device=device)
    scale = 64 ** -0.5
    out, launch = run(cache, q, scale, monkeypatch)
    assert launch["max_partition"] >= 64
    _, part, used = plan(cache, launch, 0)
    assert used >= 2
    k = cache.keys(0).double().repeat_interleave(2, 1)                               # [64, Hq, D]
    scores = torch.einsum("hd,thd->ht", q[0].double(), k) * scale / math.log(2)     # base 2
    expect = torch.stack([torch.logsumexp(scores[:, s * part:(s + 1) * part] * math.log(2), -1) / math.log(2)
                          for s in range(used)], -1)
    torch.testing.assert_close(launch["lse"][0, :, :used].double(), expect, rtol=1e-5, atol=1e-5)
    assert launch["lse"][0, :, used:].isnan().all()
    ref = reference.paged_attention(q, cache.k_cache, cache.v_cache, cache.block_tables, cache.seq_lens, scale)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)


# ---- the plan itself: the Python mirror, the jit helper, and what they promise ----

@triton.jit
def _plan_kernel(sl_ptr, out_ptr, capacity, max_partition, num_splits, min_partition, BLOCK_N: tl.constexpr):
    i = tl.program_id(0)
    seq_len, part, used = decode_split(tl.load(sl_ptr + i), capacity, max_partition, num_splits, min_partition,
                                       BLOCK_N)
    tl.store(out_ptr + 3 * i, seq_len)
    tl.store(out_ptr + 3 * i + 1, part)
    tl.store(out_ptr + 3 * i + 2, used)


# (batch, kv_heads, capacity, block_n, sms, min_partition) of launches, as the launcher plans them.
GEOMETRIES = [(1, 2, 4096, 16, 4, 32), (7, 2, 256, 16, 16, 32), (1, 8, 32768, 64, 132, 256),
              (4, 8, 4096, 64, 108, 256), (2, 1, 528, 32, 82, 256), (64, 8, 4096, 64, 132, 256)]


def plans():
    """(capacity, max_partition, grid splits, min_partition, block_n) for each geometry, and
    forced partitions that are not a whole number of tiles."""
    for batch, kv_heads, capacity, block_n, sms, min_partition in GEOMETRIES:
        max_partition = ta.decode_partition(batch, kv_heads, capacity, block_n, sms, min_partition)
        yield capacity, max_partition, triton.cdiv(capacity, max_partition), min_partition, block_n
    yield 200, 40, 5, 32, 16
    yield 200, 48, 5, 256, 16


def test_plan_covers_every_sequence_within_the_grid():
    for capacity, max_partition, splits, min_partition, block_n in plans():
        for n in range(-2, capacity + 3):
            seq_len, part, used = ta.decode_split(n, capacity, max_partition, splits, min_partition, block_n)
            assert seq_len == min(max(n, 0), capacity)
            assert 1 <= used <= splits and part <= max_partition
            assert (used - 1) * part < max(seq_len, 1) <= used * part  # every token, no empty used split
            if max_partition % block_n == 0:
                assert part % block_n == 0                              # no masked tiles but the last
            if triton.cdiv(seq_len, min_partition) <= splits:          # short: spread, not piled up
                assert part <= triton.cdiv(min_partition, block_n) * block_n
            if seq_len >= min_partition and part < max_partition:      # long: no split much shorter
                assert 2 * part > min_partition


def test_plan_spreads_short_sequences_on_a_gpu():
    """An H100 decoding one sequence with 8 kv heads in a 32768-token table: the grid's
    partition is 1024 tokens, but 1000 tokens take 4 partitions of 256."""
    max_partition = ta.decode_partition(1, 8, 32768, 64, 132, ta.MIN_PARTITION)
    splits = triton.cdiv(32768, max_partition)
    assert max_partition == 1024 and splits == 32
    assert ta.decode_split(1000, 32768, max_partition, splits, ta.MIN_PARTITION, 64) == (1000, 256, 4)
    assert ta.decode_split(32768, 32768, max_partition, splits, ta.MIN_PARTITION, 64) == (32768, 1024, 32)


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_jit_helper_matches_the_python_plan(device, backend):
    need(device, backend)
    for capacity, max_partition, splits, min_partition, block_n in plans():
        seq_lens = torch.tensor(sorted({-1, 0, 1, block_n - 1, block_n, block_n + 1, min_partition - 1,
                                        min_partition, min_partition + 1, 1000, capacity - 1, capacity,
                                        capacity + 5} | set(torch.randint(0, capacity + 1, (8,)).tolist())),
                                dtype=torch.int32, device=device)
        got = torch.empty(len(seq_lens), 3, dtype=torch.int32, device=device)
        _plan_kernel[(len(seq_lens),)](seq_lens, got, capacity, max_partition, splits, min_partition,
                                       BLOCK_N=block_n)
        expect = [ta.decode_split(n, capacity, max_partition, splits, min_partition, block_n)
                  for n in seq_lens.tolist()]
        assert got.tolist() == [list(e) for e in expect], (capacity, max_partition, splits, min_partition, block_n)


# ---- on a GPU: one captured launch serves every step ----

@pytest.mark.parametrize("device,backend", [c for c in TRITON_CASES if c.values[0] == "cuda"])
def test_one_cuda_graph_serves_every_length(device, backend):
    """The decode captured once in a CUDA graph over a 4096-token table, replayed with
    seq_lens rewritten in place: right at every length, so nothing was planned on the host."""
    need(device, backend)
    cache = WideCache([4096, 4096, 4096], 4096, 8, 128, 16, torch.float16, device)
    q = torch.randn(3, 32, 128, dtype=torch.float16, device=device)
    run_ = lambda: ta.paged_attention(q, cache.k_cache, cache.v_cache, cache.block_tables,  # noqa: E731
                                      cache.seq_lens, 128 ** -0.5)
    cache.seq_lens.fill_(1)
    run_()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_()
    for lens in ([1, 64, 4096], [0, 300, 1000], [4095, 17, 2049]):
        cache.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        ref = reference.paged_attention(q, cache.k_cache, cache.v_cache, cache.block_tables, cache.seq_lens,
                                        128 ** -0.5)
        torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
