"""BlockAllocator and PagedKVCache: reference counts, copy-on-write, prefix caching, eviction.

K and V written into the cache here encode the whole token prefix and the position (see
expected_kv), so a page that holds another prefix's contents, a missed copy-on-write or a
wrong prefix-cache hit shows up as a wrong value when the sequence is gathered back.
"""

import zlib

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, precondition, rule

import fourbit.kv_cache
from fourbit.kv_cache import BlockAllocator, OutOfBlocks, PagedKVCache

LAYERS, HEADS, HEAD_DIM = 2, 2, 4


def make_cache(num_blocks=8, block_size=8, **kwargs):
    return PagedKVCache(LAYERS, num_blocks, block_size, HEADS, HEAD_DIM, dtype=torch.float32, device="cpu", **kwargs)


def expected_kv(tokens: list[int]) -> torch.Tensor:
    """float32 [LAYERS, 2, len(tokens)]: what K (index 0) and V (index 1) of each layer hold
    for each position. K encodes a checksum of the tokens up to and including the position,
    the position and the layer; V = -K. Every value is an integer below 2**24: exact in fp32."""
    code, values = 0, []
    for position, token in enumerate(tokens):
        code = zlib.crc32(bytes([token]), code)
        values.append(((code % 4096) * 1024 + position) * 2 + 1)
    k = torch.tensor(values, dtype=torch.float32) + torch.arange(LAYERS, dtype=torch.float32)[:, None]
    return torch.stack([k, -k], dim=1)


def write_kv(cache, slots, tokens, start):
    """Write the K and V of tokens[start:] (the whole sequence is tokens) at slot_mapping slots."""
    flat = cache.kv.view(LAYERS, 2, cache.num_blocks * cache.block_size, HEADS, HEAD_DIM)
    flat[:, :, slots] = expected_kv(tokens)[:, :, start:, None, None]


def gather_kv(cache, seq_id) -> torch.Tensor:
    """[LAYERS, 2, seq_len, HEADS, HEAD_DIM]: the sequence's K and V read through
    block_tables and seq_lens, the way a paged-attention kernel reads them."""
    block_table, seq_len = cache.block_tables([seq_id])[0], int(cache.seq_lens([seq_id])[0])
    positions = torch.arange(seq_len)
    pages = block_table[positions // cache.block_size].long()
    return cache.kv[:, :, pages, positions % cache.block_size]


def assert_contents(cache, seq_id, tokens):
    got = gather_kv(cache, seq_id)
    assert torch.equal(got, expected_kv(tokens)[..., None, None].expand_as(got))


def add_and_fill(cache, seq_id, prompt) -> int:
    """add_sequence + append the uncached rest + write its K/V; returns the cached length."""
    cached = cache.add_sequence(seq_id, prompt)
    write_kv(cache, cache.append(seq_id, prompt[cached:]), prompt, cached)
    return cached


def append_and_fill(cache, seq_id, tokens):
    start = cache.seq_len(seq_id)
    slots = cache.append(seq_id, tokens)
    write_kv(cache, slots, cache.tokens(seq_id), start)
    return slots


def count_page_copies(cache) -> list[int]:
    """Wrap cache._copy_page (the one place pages are copied) to count its calls."""
    counter, copy_page = [0], cache._copy_page

    def counted(*args):
        counter[0] += 1
        return copy_page(*args)

    cache._copy_page = counted
    return counter


def cache_state(cache):
    """Everything a failed request must leave as it was."""
    seqs = sorted(((repr(s), tuple(seq.tokens), tuple(seq.blocks)) for s, seq in cache._seqs.items()))
    refcounts = [cache.allocator.refcount(b) for b in range(cache.num_blocks)]
    return seqs, refcounts, cache.allocator.num_free, dict(cache._block_key), list(cache._evictable)


def allocator_state(alloc):
    return [alloc.refcount(b) for b in range(alloc.num_blocks)], sorted(alloc._free)


# -- BlockAllocator ------------------------------------------------------------------------


def test_allocator_allocate_fork_free():
    alloc = BlockAllocator(4)
    assert alloc.num_blocks == 4 and alloc.num_free == 4
    assert alloc.allocate(0) == []
    blocks = alloc.allocate(3)
    assert len(set(blocks)) == 3 and alloc.num_free == 1
    assert all(alloc.refcount(b) == 1 for b in blocks)
    alloc.fork(blocks[:2])
    alloc.fork(blocks[:1])
    assert [alloc.refcount(b) for b in blocks] == [3, 2, 1]
    alloc.free(blocks)
    assert [alloc.refcount(b) for b in blocks] == [2, 1, 0] and alloc.num_free == 2
    alloc.free([blocks[0], blocks[0], blocks[1]])  # a block listed twice loses two references
    assert alloc.num_free == 4
    assert sorted(alloc.allocate(4)) == [0, 1, 2, 3]


def test_allocator_out_of_blocks_is_a_runtime_error_and_changes_nothing():
    alloc = BlockAllocator(3)
    alloc.allocate(2)
    before = allocator_state(alloc)
    with pytest.raises(OutOfBlocks, match="asked for 2 blocks, 1 free"):
        alloc.allocate(2)
    assert issubclass(OutOfBlocks, RuntimeError)
    assert allocator_state(alloc) == before


@pytest.mark.parametrize("blocks", [[0, 0], [1], [3], [-1], [0, 3], [0, 1]],
                         ids=["double-free-in-one-call", "free-block", "past-end", "negative", "valid-then-bad",
                              "valid-then-free"])
def test_allocator_bad_free_raises_and_changes_nothing(blocks):
    alloc = BlockAllocator(3)
    assert alloc.allocate(1) == [0]
    before = allocator_state(alloc)
    with pytest.raises(ValueError):
        alloc.free(blocks)
    assert allocator_state(alloc) == before


@pytest.mark.parametrize("blocks", [[1], [0, 1], [0, 3], [-1]],
                         ids=["free-block", "valid-then-free", "past-end", "negative"])
def test_allocator_bad_fork_raises_and_changes_nothing(blocks):
    alloc = BlockAllocator(3)
    alloc.allocate(1)
    before = allocator_state(alloc)
    with pytest.raises(ValueError):
        alloc.fork(blocks)
    assert allocator_state(alloc) == before


def test_allocator_bad_arguments():
    with pytest.raises(ValueError, match="negative"):
        BlockAllocator(2).allocate(-1)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0)
    with pytest.raises(ValueError, match="out of range"):
        BlockAllocator(2).refcount(2)


class BlockAllocatorMachine(RuleBasedStateMachine):
    """BlockAllocator against a dict of reference counts."""

    @initialize(num_blocks=st.integers(1, 12))
    def start(self, num_blocks):
        self.alloc = BlockAllocator(num_blocks)
        self.model = {}  # block -> reference count, referenced blocks only

    def some_blocks(self, data):
        """Mostly referenced blocks, sometimes free or out-of-range ones, with repeats."""
        n = self.alloc.num_blocks
        known = st.sampled_from(sorted(self.model)) if self.model else st.integers(0, n - 1)
        return data.draw(st.lists(st.one_of(known, known, st.integers(-1, n)), max_size=5))

    @rule(n=st.integers(0, 6))
    def allocate(self, n):
        before = allocator_state(self.alloc)
        try:
            blocks = self.alloc.allocate(n)
        except OutOfBlocks:
            assert n > self.alloc.num_blocks - len(self.model)
            assert allocator_state(self.alloc) == before
            return
        assert len(blocks) == n == len(set(blocks)) and not set(blocks) & set(self.model)
        self.model.update(dict.fromkeys(blocks, 1))

    @rule(data=st.data())
    def free(self, data):
        blocks, before = self.some_blocks(data), allocator_state(self.alloc)
        bad = any(not 0 <= b < self.alloc.num_blocks or blocks.count(b) > self.model.get(b, 0) for b in blocks)
        if bad:
            with pytest.raises(ValueError):
                self.alloc.free(blocks)
            assert allocator_state(self.alloc) == before
            return
        self.alloc.free(blocks)
        for b in blocks:
            self.model[b] -= 1
            if not self.model[b]:
                del self.model[b]

    @rule(data=st.data())
    def fork(self, data):
        blocks, before = self.some_blocks(data), allocator_state(self.alloc)
        if any(b not in self.model for b in blocks):
            with pytest.raises(ValueError):
                self.alloc.fork(blocks)
            assert allocator_state(self.alloc) == before
            return
        self.alloc.fork(blocks)
        for b in blocks:
            self.model[b] += 1

    @invariant()
    def refcounts_match_the_model(self):
        assert [self.alloc.refcount(b) for b in range(self.alloc.num_blocks)] == [
            self.model.get(b, 0) for b in range(self.alloc.num_blocks)]

    @invariant()
    def free_and_referenced_partition_the_blocks(self):
        free = self.alloc._free
        assert len(free) == len(set(free)) == self.alloc.num_free
        assert not set(free) & set(self.model)
        assert self.alloc.num_free + len(self.model) == self.alloc.num_blocks


TestBlockAllocatorMachine = BlockAllocatorMachine.TestCase
TestBlockAllocatorMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


# -- PagedKVCache: construction and batches ------------------------------------------------


@pytest.mark.parametrize("name,value", [
    ("num_layers", 0), ("num_blocks", -1), ("block_size", 4), ("block_size", 24), ("block_size", 8.0),
    ("num_kv_heads", 0), ("head_dim", True)])
def test_cache_rejects_bad_sizes(name, value):
    args = dict(num_layers=1, num_blocks=4, block_size=8, num_kv_heads=1, head_dim=4)
    args[name] = value
    with pytest.raises(ValueError, match=name):
        PagedKVCache(**args)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "float16"], ids=str)
def test_cache_rejects_bad_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        PagedKVCache(1, 4, 8, 1, 4, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cache_storage_is_one_tensor_with_contiguous_layer_views(dtype):
    cache = PagedKVCache(3, 5, 16, 2, 8, dtype=dtype, device="cpu")
    assert cache.kv.shape == (3, 2, 5, 16, 2, 8) and cache.kv.dtype == dtype and not cache.kv.any()
    sizes = (cache.num_layers, cache.num_blocks, cache.block_size, cache.num_kv_heads, cache.head_dim)
    assert sizes == (3, 5, 16, 2, 8)
    assert cache.dtype == dtype and cache.device == torch.device("cpu")
    assert cache.allocator.num_blocks == 5 and cache.num_free_blocks == 5
    k, v = cache.layer(1)
    assert k.shape == v.shape == (5, 16, 2, 8) and k.is_contiguous() and v.is_contiguous()
    assert k.data_ptr() == cache.k_cache(1).data_ptr() == cache.kv[1, 0].data_ptr()
    assert v.data_ptr() == cache.v_cache(1).data_ptr() == cache.kv[1, 1].data_ptr()


def test_block_tables_and_seq_lens():
    cache = make_cache(num_blocks=8, block_size=8)
    add_and_fill(cache, "a", [1] * 20)
    add_and_fill(cache, "b", [2] * 3)
    cache.add_sequence("empty")
    tables, lens = cache.block_tables(["b", "a", "empty"]), cache.seq_lens(["b", "a", "empty"])
    assert tables.dtype == lens.dtype == torch.int32 and tables.device == lens.device == cache.device
    assert tables.shape == (3, 3) and lens.tolist() == [3, 20, 0]
    assert tables[0].tolist() == cache.blocks("b") + [0, 0]
    assert tables[1].tolist() == cache.blocks("a") and tables[2].tolist() == [0, 0, 0]
    assert cache.block_tables(["empty"]).shape == (1, 1) and cache.block_tables([]).shape == (0, 1)
    assert cache.seq_lens([]).shape == (0,)
    assert cache.seq_len("a") == 20 and cache.tokens("a") == [1] * 20 and "a" in cache and "c" not in cache


def test_append_returns_the_slot_of_each_token():
    cache = make_cache(num_blocks=8, block_size=8)
    cache.add_sequence(7)
    slots = cache.append(7, [1, 2, 3])
    blocks = cache.blocks(7)
    assert slots.dtype == torch.int64 and slots.tolist() == [blocks[0] * 8 + r for r in range(3)]
    slots = cache.append(7, list(range(10)))
    blocks = cache.blocks(7)
    assert len(blocks) == 2
    assert slots.tolist() == [blocks[t // 8] * 8 + t % 8 for t in range(3, 13)]
    assert cache.append(7, []).tolist() == [] and cache.seq_len(7) == 13


@pytest.mark.parametrize("call", [
    lambda c: c.append("x", [1]), lambda c: c.fork("x", "y"), lambda c: c.free("x"),
    lambda c: c.block_tables(["a", "x"]), lambda c: c.seq_lens(["x"]), lambda c: c.seq_len("x"),
    lambda c: c.tokens("x"), lambda c: c.blocks("x")],
    ids=["append", "fork", "free", "block_tables", "seq_lens", "seq_len", "tokens", "blocks"])
def test_unknown_sequence_is_a_key_error_naming_it(call):
    cache = make_cache()
    cache.add_sequence("a", [1, 2])
    with pytest.raises(KeyError, match="'x'"):
        call(cache)


def test_existing_sequence_id_is_a_value_error():
    cache = make_cache()
    cache.add_sequence("a")
    cache.add_sequence("b")
    with pytest.raises(ValueError, match="'a'"):
        cache.add_sequence("a")
    with pytest.raises(ValueError, match="'b'"):
        cache.fork("a", "b")


# -- copy-on-write -------------------------------------------------------------------------


def test_fork_shares_and_a_shared_partial_block_is_copied_exactly_once():
    cache = make_cache(num_blocks=8, block_size=8)
    copies = count_page_copies(cache)
    add_and_fill(cache, "parent", [1] * 11)
    cache.fork("parent", "child")
    assert cache.blocks("child") == cache.blocks("parent") and cache.tokens("child") == [1] * 11
    shared_partial = cache.blocks("parent")[1]
    assert cache.allocator.refcount(shared_partial) == 2

    slots = append_and_fill(cache, "child", [2, 2])
    assert copies[0] == 1
    assert cache.blocks("child")[0] == cache.blocks("parent")[0] and cache.blocks("child")[1] != shared_partial
    assert (slots // 8).tolist() == [cache.blocks("child")[1]] * 2
    assert cache.allocator.refcount(shared_partial) == 1

    slots = append_and_fill(cache, "parent", [3, 3, 3])  # now the sole owner: writes in place
    assert copies[0] == 1 and cache.blocks("parent")[1] == shared_partial
    assert (slots // 8).tolist() == [shared_partial] * 3
    assert_contents(cache, "parent", [1] * 11 + [3, 3, 3])
    assert_contents(cache, "child", [1] * 11 + [2, 2])


def test_a_shared_full_last_block_is_not_copied():
    cache = make_cache(num_blocks=8, block_size=8, enable_prefix_caching=False)
    copies = count_page_copies(cache)
    add_and_fill(cache, "parent", [1] * 8)
    cache.fork("parent", "child")
    append_and_fill(cache, "child", [2])
    append_and_fill(cache, "parent", [3])
    assert copies[0] == 0 and cache.blocks("child")[0] == cache.blocks("parent")[0]
    assert_contents(cache, "child", [1] * 8 + [2])
    assert_contents(cache, "parent", [1] * 8 + [3])


def test_out_of_blocks_on_append_changes_nothing():
    cache = make_cache(num_blocks=4, block_size=8)
    add_and_fill(cache, "a", [1] * 20)  # 3 blocks, 2 of them cached
    cache.fork("a", "b")
    add_and_fill(cache, "c", [2] * 8)  # the last block
    cache.free("c")  # its block is cached and evictable now
    before = cache_state(cache)
    assert cache.num_free_blocks == 1
    with pytest.raises(OutOfBlocks, match="asked for 2 blocks, 0 free and 1 evictable"):
        cache.append("b", [3] * 5)  # copy-on-write of the shared partial block + one new block
    assert cache_state(cache) == before
    assert cache.add_sequence("d", [2] * 9) == 8  # nothing was evicted


def test_plan_appends_and_builds_the_step_tables():
    """plan appends each sequence's new tokens exactly as append would, and its PagedBatch
    holds the same slots, tables and lengths as the cache reports, with query_start_loc and
    the host-side maxima of the step."""
    planned, appended = make_cache(), make_cache()
    for cache in (planned, appended):
        cache.add_sequence("a", [])
        cache.add_sequence("b", [])
    step = planned.plan(["b", "a"], [[5] * 11, [6] * 3])
    slots = torch.cat([appended.append("b", [5] * 11), appended.append("a", [6] * 3)])
    assert torch.equal(step.slot_mapping, slots)
    assert torch.equal(step.block_tables, appended.block_tables(["b", "a"]))
    assert torch.equal(step.seq_lens, appended.seq_lens(["b", "a"]))
    assert step.query_start_loc.tolist() == [0, 11, 14] and not step.decode
    assert (step.max_query_len, step.max_seq_len, step.num_blocks, step.block_size) == (11, 11, 8, 8)
    decode = planned.plan(["a", "b"], [[7], [8]])
    assert decode.decode and decode.seq_lens.tolist() == [4, 12] and decode.query_start_loc.tolist() == [0, 1, 2]
    empty = planned.plan([], [])
    assert empty.batch_size == 0 and empty.num_tokens == 0


def test_plan_is_all_or_nothing():
    """A step whose sequences together need more pages than exist raises OutOfBlocks and
    changes nothing, though the first sequence alone would have fit; repeated and unknown
    ids are rejected before anything changes."""
    cache = make_cache(num_blocks=4, block_size=8)
    add_and_fill(cache, "a", [1] * 4)
    add_and_fill(cache, "b", [2] * 4)
    before = cache_state(cache)
    with pytest.raises(OutOfBlocks):
        cache.plan(["a", "b"], [[3] * 20, [4] * 20])  # 2 new pages each, 2 free
    assert cache_state(cache) == before
    with pytest.raises(ValueError, match="twice"):
        cache.plan(["a", "a"], [[3], [3]])
    with pytest.raises(KeyError, match="'x'"):
        cache.plan(["a", "x"], [[3], [3]])
    with pytest.raises(ValueError, match="token lists"):
        cache.plan(["a"], [[3], [3]])
    assert cache_state(cache) == before


# -- prefix caching ------------------------------------------------------------------------


@pytest.mark.parametrize("length,hit", [(1, 0), (7, 0), (8, 0), (9, 8), (16, 8), (17, 16), (23, 16)])
def test_prefix_hit_covers_full_blocks_but_never_the_last_token(length, hit):
    cache = make_cache(num_blocks=8, block_size=8)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6] * 3
    assert add_and_fill(cache, "a", prompt[:length]) == 0
    assert add_and_fill(cache, "b", prompt[:length]) == hit
    assert cache.blocks("b")[:hit // 8] == cache.blocks("a")[:hit // 8]
    assert_contents(cache, "b", prompt[:length])


def test_same_prompt_shares_blocks_with_identical_contents():
    cache = make_cache(num_blocks=8, block_size=8)
    prompt = [0, 1, 2, 3] * 5  # 20 tokens: 2 full blocks, then 4 tokens
    add_and_fill(cache, "a", prompt)
    cached = cache.add_sequence("b", prompt)
    assert cached == 16 and cache.tokens("b") == prompt[:16] and cache.blocks("b") == cache.blocks("a")[:2]
    assert all(cache.allocator.refcount(b) == 3 for b in cache.blocks("b"))  # a, b and the cache
    write_kv(cache, cache.append("b", prompt[16:]), prompt, 16)
    assert cache.blocks("b")[2] != cache.blocks("a")[2]
    assert torch.equal(gather_kv(cache, "a"), gather_kv(cache, "b"))
    assert_contents(cache, "b", prompt)
    assert add_and_fill(cache, "c", prompt[:8] + [3] * 12) == 8  # shares the first block only


def test_freed_cached_blocks_keep_their_contents():
    cache = make_cache(num_blocks=8, block_size=8)
    prompt = [2, 0] * 12
    add_and_fill(cache, "a", prompt)
    blocks = cache.blocks("a")
    cache.free("a")
    assert cache.num_free_blocks == 8 and cache.allocator.num_free == 5
    assert add_and_fill(cache, "b", prompt) == 16 and cache.blocks("b")[:2] == blocks[:2]
    assert_contents(cache, "b", prompt)


def test_without_prefix_caching_nothing_is_shared():
    cache = make_cache(num_blocks=8, block_size=8, enable_prefix_caching=False)
    prompt = [1, 2] * 10
    add_and_fill(cache, "a", prompt)
    assert add_and_fill(cache, "b", prompt) == 0
    assert not set(cache.blocks("a")) & set(cache.blocks("b"))
    cache.free("a")
    cache.free("b")
    assert cache.allocator.num_free == 8


def test_hash_collisions_never_return_wrong_contents(monkeypatch):
    monkeypatch.setattr(fourbit.kv_cache, "_chain_hash", lambda parent_hash, tokens: 0)
    cache = make_cache(num_blocks=12, block_size=8)
    a = [0] * 8 + [1] * 8 + [2]
    b = [3] * 8 + [1] * 8 + [2]  # same second block, different first one
    add_and_fill(cache, "a", a)
    assert add_and_fill(cache, "b", b) == 0
    assert add_and_fill(cache, "c", b) == 16 and cache.blocks("c")[:2] == cache.blocks("b")[:2]
    assert_contents(cache, "c", b)
    assert add_and_fill(cache, "d", a[:8] + [0] * 9) == 8


def test_eviction_is_least_recently_used_and_only_when_no_block_is_free():
    cache = make_cache(num_blocks=6, block_size=8)
    a, b = [1] * 16 + [0], [2] * 16 + [0]
    add_and_fill(cache, "a", a[:16])
    add_and_fill(cache, "b", b[:16])
    a_blocks, b_blocks = cache.blocks("a"), cache.blocks("b")
    cache.free("a")
    cache.free("b")  # evictable now, least recently used first: a's blocks, then b's
    assert cache.allocator.num_free == 2 and cache.num_free_blocks == 6

    add_and_fill(cache, "c", [3] * 8)  # a free block is left: nothing is evicted
    assert cache.add_sequence("probe", a) == 16 and cache.blocks("probe") == a_blocks
    cache.free("probe")  # the hit made a's blocks the most recently used
    assert cache.allocator.num_free == 1 and cache.num_free_blocks == 5

    add_and_fill(cache, "d", [4] * 16)  # 2 blocks: the free one and b's last block
    assert b_blocks[1] in cache.blocks("d") and cache.num_free_blocks == 3
    assert cache.add_sequence("b2", b) == 8 and cache.blocks("b2") == b_blocks[:1]
    assert cache.add_sequence("a2", a) == 16 and cache.blocks("a2") == a_blocks


def test_out_of_blocks_evicts_nothing():
    cache = make_cache(num_blocks=4, block_size=8)
    add_and_fill(cache, "a", [1] * 16)
    cache.free("a")
    add_and_fill(cache, "b", [2] * 8)
    before = cache_state(cache)
    with pytest.raises(OutOfBlocks, match="asked for 4 blocks, 1 free and 2 evictable"):
        cache.append("b", [2] * 32)
    assert cache_state(cache) == before
    assert cache.add_sequence("c", [1] * 17) == 16


# -- registration only of written pages: plan(commit=False) and commit ---------------------


def plan_and_fill(cache, seq_id, tokens, commit=True):
    """plan a one-sequence step without registering it, write its K/V, commit if asked."""
    start = cache.seq_len(seq_id)
    step = cache.plan([seq_id], [tokens], commit=False)
    write_kv(cache, step.slot_mapping, cache.tokens(seq_id), start)
    if commit:
        cache.commit(step)
    return step


def test_a_step_planned_without_commit_joins_the_prefix_cache_only_when_committed():
    cache = make_cache(num_blocks=8, block_size=8)
    prompt = torch.randint(0, 50, (20,)).tolist()
    cache.add_sequence("a", [])
    step = plan_and_fill(cache, "a", prompt[:12], commit=False)  # fills page 0
    assert cache.add_sequence("probe", prompt) == 0  # written, but not yet known to be
    cache.free("probe")
    cache.commit(step)
    assert cache.add_sequence("probe", prompt) == 8
    cache.free("probe")
    plan_and_fill(cache, "a", prompt[12:])  # fills page 1, committed at once
    assert add_and_fill(cache, "b", prompt) == 16 and cache.blocks("b")[:2] == cache.blocks("a")[:2]
    assert_contents(cache, "b", prompt)
    assert all(cache.allocator.refcount(b) == 3 for b in cache.blocks("b")[:2])  # a, b and the cache


def test_a_step_never_committed_is_never_registered():
    """A step whose forward failed is not committed: a later plan or a free discards it, the
    pages it filled never become hits (not even once later steps of the sequence commit),
    and the pages of the steps before it stay hits."""
    cache = make_cache(num_blocks=12, block_size=8)
    prompt = torch.randint(0, 50, (40,)).tolist()
    cache.add_sequence("a", [])
    plan_and_fill(cache, "a", prompt[:8])
    failed = cache.plan(["a"], [prompt[8:16]], commit=False)  # page 1: nothing written
    plan_and_fill(cache, "a", prompt[16:24])  # supersedes the failed step, commits its own
    plan_and_fill(cache, "a", prompt[24:32], commit=False)
    cache.commit(cache.plan(["a"], [prompt[32:33]], commit=False))
    with pytest.raises(ValueError, match="not this cache's pending step"):
        cache.commit(failed)
    assert cache.add_sequence("b", prompt) == 8
    cache.free("a")
    cache.free("b")
    assert cache.num_free_blocks == 12 and len(cache._block_key) == 1

    cache.add_sequence("d", [])
    step = cache.plan(["d"], [prompt[:16]], commit=False)
    cache.free("d")  # freed before its forward returned: its pages go back unregistered
    cache.commit(step)  # skips the freed sequence
    assert cache.num_free_blocks == 12 and len(cache._block_key) == 1
    assert cache.add_sequence("e", prompt) == 8


def test_commit_takes_the_pending_step_once():
    cache = make_cache()
    cache.add_sequence("a", [])
    with pytest.raises(ValueError, match="not this cache's pending step"):
        cache.commit(cache.plan(["a"], [[1] * 8]))  # planned with commit=True: registered already
    step = cache.plan(["a"], [[2] * 8], commit=False)
    cache.commit(step)
    with pytest.raises(ValueError, match="not this cache's pending step"):
        cache.commit(step)


def test_out_of_blocks_keeps_the_pending_step():
    cache = make_cache(num_blocks=2, block_size=8)
    cache.add_sequence("a", [])
    step = plan_and_fill(cache, "a", [1] * 9, commit=False)
    with pytest.raises(OutOfBlocks):
        cache.plan(["a"], [[2] * 16], commit=False)
    cache.commit(step)
    assert cache.add_sequence("b", [1] * 9) == 8


def test_a_cache_is_claimed_by_one_owner():
    class Model:
        pass

    cache, first, second = make_cache(), Model(), Model()
    cache.claim(first)
    cache.claim(first)
    with pytest.raises(ValueError, match="cache holds K/V written by another Model"):
        cache.claim(second)
    del first
    with pytest.raises(ValueError, match="cache holds K/V written by a model that no longer exists"):
        cache.claim(second)


# -- the cache as a state machine ----------------------------------------------------------


class PagedKVCacheMachine(RuleBasedStateMachine):
    """PagedKVCache against a dense model: a token list per live sequence.

    After every append the machine writes each new token's K and V at its slot; then every
    live sequence, gathered through block_tables and seq_lens, must read back exactly the
    values its own tokens predict."""

    seqs = Bundle("seqs")

    @initialize(num_blocks=st.integers(12, 24), block_size=st.sampled_from([8, 16]))
    def start(self, num_blocks, block_size):
        self.cache = make_cache(num_blocks, block_size)
        self.copies = count_page_copies(self.cache)
        self.model = {}  # seq_id -> its tokens
        self.prompts = []  # every prompt added so far, of live and freed sequences
        self.next_id = 0

    def new_sequence(self, prompt):
        seq_id, self.next_id = self.next_id, self.next_id + 1
        self.prompts.append(prompt)
        cached = self.cache.add_sequence(seq_id, prompt)
        assert cached % self.cache.block_size == 0 and cached <= len(prompt) - 1
        assert len(self.cache.blocks(seq_id)) == cached // self.cache.block_size
        self.model[seq_id] = prompt[:cached]
        self.append_tokens(seq_id, prompt[cached:])
        return seq_id

    def append_tokens(self, seq_id, tokens):
        cache, start = self.cache, len(self.model[seq_id])
        before, copies = cache_state(cache), self.copies[0]
        last = cache.blocks(seq_id)[-1:]
        must_copy = start % cache.block_size != 0 and cache.allocator.refcount(last[0]) > 1
        try:
            slots = cache.append(seq_id, tokens)
        except OutOfBlocks:
            assert cache_state(cache) == before and self.copies[0] == copies
            return
        assert self.copies[0] - copies == must_copy
        assert slots.dtype == torch.int64 and slots.shape == (len(tokens),)
        for page in (slots // cache.block_size).tolist():  # never a page another sequence reads
            assert [s for s in self.model if page in cache.blocks(s)] == [seq_id]
        self.model[seq_id] = self.model[seq_id] + list(tokens)
        write_kv(cache, slots, self.model[seq_id], start)

    # At most a few live sequences: the cache fills up with cached, evictable blocks instead.
    @precondition(lambda self: len(self.model) < 4)
    @rule(target=seqs, prompt=st.lists(st.integers(0, 3), min_size=1, max_size=40))
    def add(self, prompt):
        return self.new_sequence(prompt)

    @precondition(lambda self: len(self.model) < 4)
    @rule(target=seqs, source=seqs, cut=st.integers(0, 40), extra=st.lists(st.integers(0, 3), max_size=12))
    def add_with_a_known_prefix(self, source, cut, extra):
        prompt = self.model[source][:cut] + extra
        return self.new_sequence(prompt or [0])

    @precondition(lambda self: len(self.model) < 4 and self.prompts)
    @rule(target=seqs, pick=st.integers(0, 1000), extra=st.lists(st.integers(0, 3), max_size=4))
    def add_a_past_prompt(self, pick, extra):
        return self.new_sequence(self.prompts[pick % len(self.prompts)] + extra)

    @rule(seq_id=seqs, tokens=st.lists(st.integers(0, 3), min_size=1, max_size=20))
    def append(self, seq_id, tokens):
        self.append_tokens(seq_id, tokens)

    @precondition(lambda self: len(self.model) < 4)
    @rule(target=seqs, parent=seqs)
    def fork(self, parent):
        child, self.next_id = self.next_id, self.next_id + 1
        self.cache.fork(parent, child)
        self.model[child] = list(self.model[parent])
        return child

    @rule(seq_id=consumes(seqs))
    def free(self, seq_id):
        self.cache.free(seq_id)
        del self.model[seq_id]

    @rule(seq_id=seqs, tokens=st.lists(st.integers(0, 3), min_size=1, max_size=20))
    def committed_step(self, seq_id, tokens):
        """plan(commit=False), the forward writes every layer, commit: as append."""
        cache, start = self.cache, len(self.model[seq_id])
        try:
            step = cache.plan([seq_id], [tokens], commit=False)
        except OutOfBlocks:
            return
        self.model[seq_id] = self.model[seq_id] + list(tokens)
        write_kv(cache, step.slot_mapping, self.model[seq_id], start)
        cache.commit(step)

    @rule(seq_id=consumes(seqs), tokens=st.lists(st.integers(0, 3), min_size=1, max_size=20),
          layers_written=st.integers(0, LAYERS - 1))
    def failed_step(self, seq_id, tokens, layers_written):
        """plan(commit=False), the forward writes some layers and raises, the sequence is
        freed (as generate does): its prompt, retried by add_a_past_prompt, must not hit a
        page the failed step filled."""
        cache, start = self.cache, len(self.model[seq_id])
        try:
            step = cache.plan([seq_id], [tokens], commit=False)
        except OutOfBlocks:
            step = None
        else:
            full = self.model[seq_id] + list(tokens)
            flat = cache.kv.view(LAYERS, 2, cache.num_blocks * cache.block_size, HEADS, HEAD_DIM)
            flat[:, :, step.slot_mapping] = 0.5  # not a value expected_kv ever holds
            flat[:layers_written, :, step.slot_mapping] = expected_kv(full)[:layers_written, :, start:, None, None]
            self.prompts.append(full)
        cache.free(seq_id)
        del self.model[seq_id]

    @invariant()
    def contents_match_the_dense_model(self):
        for seq_id, tokens in self.model.items():
            assert self.cache.tokens(seq_id) == tokens and self.cache.seq_len(seq_id) == len(tokens)
            assert len(self.cache.blocks(seq_id)) == -(-len(tokens) // self.cache.block_size)
            assert_contents(self.cache, seq_id, tokens)

    @invariant()
    def refcounts_are_holders_plus_the_cache(self):
        cache, cached = self.cache, set(self.cache._block_key)
        holders = [sum(b in cache.blocks(s) for s in self.model) for b in range(cache.num_blocks)]
        for block in range(cache.num_blocks):
            assert cache.allocator.refcount(block) == holders[block] + (block in cached)
        assert set(cache._evictable) == {b for b in cached if not holders[b]}
        assert cache.num_free_blocks == cache.allocator.num_free + len(cache._evictable)

    @invariant()
    def no_block_leaks(self):
        alloc = self.cache.allocator
        referenced = {b for b in range(alloc.num_blocks) if alloc.refcount(b)}
        held = {b for s in self.model for b in self.cache.blocks(s)}
        assert referenced == held | set(self.cache._block_key)
        assert alloc.num_free + len(referenced) == alloc.num_blocks


TestPagedKVCacheMachine = PagedKVCacheMachine.TestCase
TestPagedKVCacheMachine.settings = settings(max_examples=40, stateful_step_count=60, deadline=None)
