"""The C++ CPU paged attention ("cpu" backend: csrc/cpu/paged_attention*.cpp) on every
instruction set this machine has (FOURBIT_CPU_ISA), against fp64 dense attention on fresh
random data: dtypes, GQA ratios, block sizes, head dims (awkward ones whose rows are not a
whole number of registers), ragged batches with a length-0 sequence, contexts long enough to
be split over threads (split-KV, merged by log-sum-exp), chunked prefill over cached
prefixes, write_kv with skipped slots, and the errors the kernels raise themselves.

tests/test_attention.py and tests/test_numerics.py run the same backend on the default
instruction set (through backend_cases, which lists "cpu" for every paged op)."""

import pytest
import torch

import fourbit
from fourbit import ops
from fourbit.kv_cache import PagedBatch
from helpers import DTYPES
from test_attention import PagedSetup, assert_attention_accuracy, run_decode, run_prefill
from test_ops import CPU_ISAS, force_cpu_isa

pytestmark = pytest.mark.skipif(ops.unavailable("cpu", torch.device("cpu"), "paged_attention") is not None,
                                reason="needs fourbit._C with the CPU attention kernels")
KINDS = {"decode": run_decode, "prefill": run_prefill}


@pytest.fixture(params=CPU_ISAS)
def isa(request, monkeypatch):
    force_cpu_isa(request.param, monkeypatch)
    return request.param


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_dtypes(dtype, kind, isa):
    KINDS[kind]("cpu", "cpu", dtype=dtype, scale=0.3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", [1, 3, 5, 8], ids=lambda g: f"gqa{g}")
def test_gqa(group, kind, isa):
    KINDS[kind]("cpu", "cpu", heads=2 * group, kv_heads=2, dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("head_dim", [8, 36, 72, 128, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_head_dims(head_dim, dtype, kind, isa):
    """8 and 128 are whole registers on AVX2 (rows read in place); 36, 72 and 200 are not on
    any width (rows widened and padded first)."""
    KINDS[kind]("cpu", "cpu", head_dim=head_dim, dtype=dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_size", [8, 32, 128])
def test_block_sizes(block_size, kind, isa):
    KINDS[kind]("cpu", "cpu", block_size=block_size, dtype=torch.float32)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_long_context_split_kv(dtype, threads, isa):
    """One kv head of a long sequence beside short ones: with so few sequence x head pairs the
    long one is cut into partitions (several per thread) and merged; short ones are not."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_decode("cpu", "cpu", seq_lens=(3000, 1, 257), heads=4, kv_heads=1, head_dim=64, dtype=dtype)
        run_decode("cpu", "cpu", seq_lens=(6001,), heads=8, kv_heads=2, head_dim=128, dtype=dtype)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_ragged_batch_with_an_empty_sequence(dtype, isa):
    """A trusted batch (seq_lens 0 is not plannable) mixing lengths across tile and page
    edges: the empty sequence gives exact zeros, the others dense attention."""
    lens = [0, 1, 15, 16, 17, 33, 64, 100, 513]
    setup = PagedSetup([max(n, 1) for n in lens], 2, 64, 16, dtype)
    setup.seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), 6, 64).to(dtype)
    batch = PagedBatch(torch.full((len(lens),), -1), setup.block_tables, setup.seq_lens,
                       torch.arange(len(lens) + 1, dtype=torch.int32), 1, max(lens), setup.k_cache.shape[0], 16)
    out = fourbit.paged_attention(q, setup.k_cache, setup.v_cache, batch, backend="cpu")
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    setup.keys, setup.values = setup.keys[1:], setup.values[1:]
    assert_attention_accuracy(out[1:], q[1:], setup, [n - 1 for n in lens[1:]],
                              [(b, b + 1) for b in range(len(lens) - 1)], 64 ** -0.5)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_chunked_prefill_over_cached_prefixes(dtype, isa):
    """Sequences whose new tokens follow cached prefixes of every size (none, within a tile,
    several pages), a block of query tokens larger than one work unit (100 tokens), GQA 4."""
    run_prefill("cpu", "cpu", seq_lens=(100, 70, 300, 9), new=(100, 1, 130, 9), heads=8, kv_heads=2, dtype=dtype)
    run_prefill("cpu", "cpu", seq_lens=(40, 1000), new=(33, 500), heads=2, kv_heads=2, head_dim=80, dtype=dtype)


def test_every_thread_count_matches_the_reference():
    """The split-KV plan depends on the thread count (1 thread: no split; 4: the 700-token
    sequence in several partitions); every plan gives the reference's answer."""
    setup = PagedSetup([700, 20], 1, 64, 16, torch.float32)
    q = torch.randn(2, 4, 64)
    previous = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            outs.append(fourbit.paged_attention(q, setup.k_cache, setup.v_cache, setup.batch(), backend="cpu"))
    finally:
        torch.set_num_threads(previous)
    ref = fourbit.paged_attention(q, setup.k_cache, setup.v_cache, setup.batch(), backend="torch")
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_write_kv_every_isa_bit_exact(dtype, isa):
    num_blocks, block_size, kv_heads, head_dim = 5, 8, 3, 40
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(num_blocks * block_size)[:25]
    slots[[0, 7, 24]] = -1
    k, v = torch.randn(25, kv_heads, head_dim).to(dtype), torch.randn(25, kv_heads, head_dim).to(dtype)
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    expect_k.view(-1, kv_heads, head_dim)[slots[keep]] = k[keep]
    expect_v.view(-1, kv_heads, head_dim)[slots[keep]] = v[keep]
    batch = PagedBatch.from_tensors(slot_mapping=slots, block_tables=torch.zeros(1, 4, dtype=torch.int32),
                                    seq_lens=torch.tensor([25], dtype=torch.int32),
                                    query_start_loc=torch.tensor([0, 25], dtype=torch.int32),
                                    num_blocks=num_blocks, block_size=block_size)
    fourbit.write_kv(k, v, k_cache, v_cache, batch, backend="cpu")
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


def test_auto_runs_the_cpu_kernel_on_cpu(monkeypatch):
    """dispatch.choose_attention_backend picks "cpu" on the CPU (measured faster than the
    reference: bench/results/cpu-attention.md), and "auto" really runs it: the kernel's own
    result, bit for bit, with the reference never called."""
    from fourbit import reference
    assert fourbit.choose_attention_backend(torch.device("cpu"), torch.float32) == "cpu"
    monkeypatch.setattr(reference, "paged_attention", lambda *a: pytest.fail("the reference ran"))
    setup = PagedSetup([1, 37, 70], 2, 64, 16, torch.float32)
    q = torch.randn(3, 4, 64)
    out = fourbit.paged_attention(q, setup.k_cache, setup.v_cache, setup.batch(), backend="auto")
    assert torch.equal(out, ops._C.paged_attention_cpu(q, setup.k_cache, setup.v_cache, setup.block_tables,
                                                       setup.seq_lens, 64 ** -0.5))


# ---- what the kernels check themselves (direct calls; ops.py checks the same earlier) ----

def _decode_args(**over):
    s = PagedSetup([5, 9], 2, 64, 16, torch.float32)
    args = dict(q=torch.randn(2, 4, 64), k_cache=s.k_cache, v_cache=s.v_cache, block_tables=s.block_tables,
                seq_lens=s.seq_lens, scale=0.125)
    args.update(over)
    return args


CHECKS = {
    "q-dtype": (dict(q=torch.randn(2, 4, 64).half()), "q must have the cache's dtype"),
    "q-head-dim": (dict(q=torch.randn(2, 4, 32)), r"q must be \[tokens, num_heads, head_dim = 64\]"),
    "q-heads": (dict(q=torch.randn(2, 3, 64)), "query heads must be a positive multiple of the 2 kv heads"),
    "q-tokens": (dict(q=torch.randn(3, 4, 64)), "one token per sequence"),
    "cache-mismatch": (dict(v_cache=torch.randn(8, 16, 2, 64).half()), "v_cache must match k_cache"),
    "cache-dtype": (dict(k_cache=torch.zeros(8, 16, 2, 64, dtype=torch.int8),
                         v_cache=torch.zeros(8, 16, 2, 64, dtype=torch.int8),
                         q=torch.zeros(2, 4, 64, dtype=torch.int8)), "must be float32, bfloat16 or float16"),
    "cache-layout": (dict(k_cache=torch.randn(16, 2, 64)), r"k_cache must be contiguous \[num_blocks"),
    "tables-dtype": (dict(block_tables=torch.zeros(2, 2, dtype=torch.int64)), "block_tables must be int32"),
    "tables-empty": (dict(block_tables=torch.zeros(2, 0, dtype=torch.int32)), r"max_blocks >= 1"),
    "seq-lens-shape": (dict(seq_lens=torch.tensor([5], dtype=torch.int32)),
                       r"seq_lens must be contiguous int32 \[batch = 2\]"),
}


@pytest.mark.parametrize("over,message", CHECKS.values(), ids=CHECKS.keys())
def test_the_decode_kernel_names_bad_inputs(over, message):
    with pytest.raises(RuntimeError, match=message):
        ops._C.paged_attention_cpu(**_decode_args(**over))


def test_prefill_and_write_kv_kernels_name_bad_inputs():
    s = PagedSetup([5, 9], 2, 64, 16, torch.float32)
    q = torch.randn(14, 4, 64)
    with pytest.raises(RuntimeError, match=r"query_start_loc must be contiguous int32 \[batch \+ 1 = 3\]"):
        ops._C.paged_prefill_attention_cpu(q, s.k_cache, s.v_cache, s.block_tables, s.seq_lens,
                                           torch.tensor([0, 5], dtype=torch.int32), 9, 0.1)
    with pytest.raises(RuntimeError, match="max_query_len must be >= 0"):
        ops._C.paged_prefill_attention_cpu(q, s.k_cache, s.v_cache, s.block_tables, s.seq_lens,
                                           torch.tensor([0, 5, 14], dtype=torch.int32), -1, 0.1)
    k = torch.randn(3, 2, 64)
    with pytest.raises(RuntimeError, match="slot_mapping must be contiguous int64"):
        ops._C.write_kv_cpu(k, k, s.k_cache, s.v_cache, torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"k and v must both be \[tokens, num_kv_heads = 2, head_dim = 64\]"):
        ops._C.write_kv_cpu(torch.randn(3, 1, 64), torch.randn(3, 1, 64), s.k_cache, s.v_cache,
                            torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="k and v must have the cache's dtype"):
        ops._C.write_kv_cpu(k.half(), k.half(), s.k_cache, s.v_cache, torch.tensor([0, 1, 2]))
