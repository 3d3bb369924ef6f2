"""The paged KV cache: block allocation, copy-on-write and prefix caching, in plain Python.

Page layout. This block and format.py are the only places that do layout arithmetic; every
other module and every kernel takes these names and tensors as they are.

- Per layer, K and V pages: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]
  (NHD) in the cache dtype. All of them live in one tensor
  kv [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]: kv[layer, 0] is the
  layer's k_cache and kv[layer, 1] its v_cache, both contiguous.
- block_tables int32 [batch, max_blocks_per_seq]: the pages of each sequence in order;
  entries past a sequence's last page are 0 and never read.
- seq_lens int32 [batch]: the number of tokens of each sequence.
- Token t of sequence b lives at page block_tables[b, t // block_size], row t % block_size.
- Writes take slot_mapping int64 [tokens] = page * block_size + row; -1 means skip (the cache
  never hands out -1; callers use it for padding tokens).
- query_start_loc int32 [batch + 1]: the new tokens of sequence b are rows
  query_start_loc[b] .. query_start_loc[b + 1] - 1 of a step's input, the last of its tokens.

Plan once per step, run per layer: a PagedBatch holds these tensors for one step, validated
once when it is built (PagedKVCache.plan builds and checks them on the host before a single
upload; PagedBatch.from_tensors checks tensors a caller made, with one read to the host).
Every layer then runs the paged ops on it without touching the host.

Blocks are shared by reference count. fork() shares all blocks of a sequence (parallel
sampling, beam search); a sharer that appends to a shared, partly filled last block first
copies it (copy-on-write), so the other sharer, left sole owner, writes in place. With prefix
caching every full block is registered under its tokens and those of all blocks before it; a
new sequence whose prompt starts with registered blocks shares them instead of recomputing
them. The cache holds one reference to each block it registered. A block whose only
reference is the cache's is evictable, least recently used first, and only when an
allocation finds no free block left.

A block is registered only once its K and V are known written, so a failed step never leaves
a prefix-cache hit on pages nobody wrote. append() and plan() register the full blocks they
complete at once: the caller promises to write their K/V before anything reads them.
plan(..., commit=False) holds them pending instead, and commit(batch), called once the forward
that writes them has returned, registers them; a step never committed (its forward raised)
registers nothing, then or later: each sequence counts the tokens whose K/V are known written,
and only a step that continues that count advances it. generate plans every step this way.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import weakref
from collections.abc import Hashable, Iterable

import torch

KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class PagedBatch:
    """The index tensors of one step of paged attention, validated once (module notes).

    Attributes:
        slot_mapping: int64 [num_tokens], where each new token's K and V go (-1: nowhere).
        block_tables: int32 [batch, max_blocks], the pages of each sequence.
        seq_lens: int32 [batch], each sequence's tokens, cached plus new, in [1, max_blocks * block_size].
        query_start_loc: int32 [batch + 1], from 0 rising to num_tokens; sequence b's
            new tokens are rows query_start_loc[b] .. query_start_loc[b + 1] - 1, at most seq_lens[b].
        max_query_len: the most new tokens of any sequence (host int: sizes prefill grids).
        max_seq_len: the longest sequence (host int).
        num_blocks, block_size: the geometry of the cache it was validated against.

    Build it with PagedKVCache.plan or PagedBatch.from_tensors, which check every value.
    The constructor itself checks only what the host knows (dtypes, shapes, devices): a
    batch made directly (generate's CUDA graphs do, over static buffers they fill from
    planned batches) is trusted, and the kernels clamp every index they read regardless.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_seq_len: int
    num_blocks: int
    block_size: int

    def __post_init__(self):
        for name, dtype, dims in (("slot_mapping", torch.int64, 1), ("block_tables", torch.int32, 2),
                                  ("seq_lens", torch.int32, 1), ("query_start_loc", torch.int32, 1)):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != dtype:
                raise TypeError(f"{name} must be a {dtype} tensor, got {getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() != dims:
                raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(t.shape)}")
            if t.device != self.block_tables.device:
                raise ValueError(f"{name} is on {t.device} but block_tables is on {self.block_tables.device}")
        batch = self.block_tables.shape[0]
        if self.block_tables.shape[1] == 0:
            raise ValueError("block_tables must have at least one column")
        for name, want in (("seq_lens", (batch,)), ("query_start_loc", (batch + 1,))):
            if tuple(getattr(self, name).shape) != want:
                raise ValueError(f"{name} must have shape {want} for the {batch} rows of block_tables, "
                                 f"got {tuple(getattr(self, name).shape)}")
        _check_positive("num_blocks", self.num_blocks)
        if self.block_size < 8 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 8, got {self.block_size}")
        for name in ("max_query_len", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")

    @property
    def batch_size(self) -> int:
        return self.block_tables.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def device(self) -> torch.device:
        return self.block_tables.device

    @property
    def decode(self) -> bool:
        """Every sequence has exactly one new token (the decode kernels run it)."""
        return self.num_tokens == self.batch_size and self.max_query_len == 1

    @classmethod
    def from_tensors(cls, *, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     query_start_loc: torch.Tensor | None = None, num_blocks: int, block_size: int) -> PagedBatch:
        """A batch from a caller's tensors (any device), every value checked: one copy of the
        index tensors to the host, once per step.

        Args:
            slot_mapping: int64 [num_tokens]; block_tables: int32 [B, max_blocks];
            seq_lens: int32 [B]; query_start_loc: int32 [B + 1], or None for decode (one new
                token per sequence: arange(B + 1));
            num_blocks, block_size: the cache's geometry (k_cache.shape[:2]).
        Raises:
            TypeError / ValueError naming the tensor and the rule it breaks.
        """
        for name, t in (("slot_mapping", slot_mapping), ("block_tables", block_tables), ("seq_lens", seq_lens)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if query_start_loc is None:
            query_start_loc = torch.arange(block_tables.shape[0] + 1, dtype=torch.int32, device=block_tables.device)
        trusted = cls(slot_mapping, block_tables, seq_lens, query_start_loc, 0, 0, num_blocks, block_size)
        host = [t.cpu() for t in (slot_mapping, block_tables, seq_lens, query_start_loc)]
        max_query_len, max_seq_len = _check_batch_values(*host, num_blocks, block_size)
        return dataclasses.replace(trusted, max_query_len=max_query_len, max_seq_len=max_seq_len)


def _check_batch_values(slot_mapping, block_tables, seq_lens, query_start_loc, num_blocks: int,
                        block_size: int) -> tuple[int, int]:
    """Check a batch's index values (CPU tensors); return (max_query_len, max_seq_len)."""
    slots = num_blocks * block_size
    if bool(((slot_mapping < -1) | (slot_mapping >= slots)).any()):
        raise ValueError(f"slot_mapping values must be -1 or lie in [0, num_blocks * block_size = {slots})")
    capacity = block_tables.shape[1] * block_size
    if bool(((seq_lens < 1) | (seq_lens > capacity)).any()):
        raise ValueError(f"seq_lens must lie in [1, max_blocks * block_size = {capacity}], got {seq_lens.tolist()}")
    used = torch.arange(block_tables.shape[1])[None, :] * block_size < seq_lens[:, None]
    if bool((used & ((block_tables < 0) | (block_tables >= num_blocks))).any()):
        raise ValueError(f"block_tables holds pages outside [0, num_blocks = {num_blocks}) within the sequences' "
                         "lengths")
    new = query_start_loc[1:] - query_start_loc[:-1]
    if int(query_start_loc[0]) != 0 or int(query_start_loc[-1]) != slot_mapping.shape[0] or bool((new < 0).any()):
        raise ValueError(f"query_start_loc must rise from 0 to num_tokens = {slot_mapping.shape[0]}, "
                         f"got {query_start_loc.tolist()}")
    if bool((new > seq_lens).any()):
        raise ValueError("a sequence has more new tokens (query_start_loc) than tokens (seq_lens)")
    return int(new.max()) if len(new) else 0, int(seq_lens.max()) if len(seq_lens) else 0


class OutOfBlocks(RuntimeError):
    """A request needs more blocks than are free (and, in a PagedKVCache, evictable)."""


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _token_list(tokens) -> list[int]:
    """Token ids as a list of ints, from an iterable of ints or a 1-D integer tensor."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"tokens must be token ids (ints), got text {tokens[:20]!r}: encode it first")
    try:
        return [operator.index(t) for t in tokens]
    except TypeError:
        raise TypeError(f"tokens must be an iterable of int token ids, got {type(tokens).__name__}") from None


class BlockAllocator:
    """A pool of blocks 0 .. num_blocks-1 with reference counts (plain Python, no tensors).

    A block is free when its reference count is 0. Every method either succeeds or raises
    before changing anything.
    """

    def __init__(self, num_blocks: int):
        _check_positive("num_blocks", num_blocks)
        self._refcounts = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: hands out 0, 1, 2, ... first

    @property
    def num_blocks(self) -> int:
        return len(self._refcounts)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block: int) -> int:
        return self._refcounts[self._index(block)]

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks, each with reference count 1. OutOfBlocks if fewer than n are free."""
        if isinstance(n, bool) or not hasattr(n, "__index__"):
            raise TypeError(f"n (blocks to allocate) must be an int, got {type(n).__name__} {n!r}")
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"n (blocks to allocate) must not be negative, got {n}")
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        for block in blocks:
            self._refcounts[block] = 1
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference per listed block (a block listed twice loses two); a block left
        with none is free again. ValueError for an index out of range or a reference that
        does not exist (double free)."""
        counts = self._counts(blocks)
        for block, count in counts.items():
            if self._refcounts[block] < count:
                raise ValueError(f"block {block} freed {count} time(s) but holds "
                                 f"{self._refcounts[block]} reference(s)")
        for block, count in counts.items():
            self._refcounts[block] -= count
            if self._refcounts[block] == 0:
                self._free.append(block)

    def fork(self, blocks: Iterable[int]) -> None:
        """Add one reference per listed block (sharing). ValueError for a free block."""
        counts = self._counts(blocks)
        for block in counts:
            if self._refcounts[block] == 0:
                raise ValueError(f"cannot fork block {block}: it is not allocated")
        for block, count in counts.items():
            self._refcounts[block] += count

    def _counts(self, blocks: Iterable[int]) -> collections.Counter:
        return collections.Counter(self._index(block) for block in blocks)

    def _index(self, block: int) -> int:
        block = operator.index(block)
        if not 0 <= block < len(self._refcounts):
            raise ValueError(f"block {block} out of range [0, {len(self._refcounts)})")
        return block


def _chain_hash(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent_hash, tokens))


class _BlockKey:
    """Prefix-cache key of one full block: its tokens and the key of the block before it.

    Its hash is hash(parent's hash, tokens). Equality compares the whole chain back to the
    first block, so equal keys mean equal token prefixes: a hash collision, at any block of
    the chain, costs a comparison but never returns wrong contents.
    """

    __slots__ = ("parent", "tokens", "hash")

    def __init__(self, parent: _BlockKey | None, tokens: tuple[int, ...]):
        self.parent, self.tokens = parent, tokens
        self.hash = _chain_hash(None if parent is None else parent.hash, tokens)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other) -> bool:
        a, b = self, other
        while a is not b:  # keys of one chain are shared objects: this stops at the first common one
            if not (isinstance(a, _BlockKey) and isinstance(b, _BlockKey)):
                return False
            if a.hash != b.hash or a.tokens != b.tokens:
                return False
            a, b = a.parent, b.parent
        return True


@dataclasses.dataclass
class _Sequence:
    tokens: list[int]  # token ids whose K and V are (or are being) written; length = len(tokens)
    blocks: list[int]  # its pages, ceil(len(tokens) / block_size) of them
    keys: list[_BlockKey]  # prefix-cache keys of its registered full blocks (none without prefix caching)
    written: int  # tokens[:written] have K and V known written: only their full blocks are registered


class PagedKVCache:
    """K and V pages for all layers, and the sequences that own them (see the module notes).

    Args:
        num_layers, num_blocks, block_size, num_kv_heads, head_dim: positive ints;
            block_size a power of two >= 8.
        dtype: torch.float32, torch.bfloat16 or torch.float16.
        device: where the pages live (torch's default device when None).
        enable_prefix_caching: share full blocks between sequences with the same prefix.

    Attributes:
        kv: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] in dtype, zeros at
            first; kv[layer, 0] and kv[layer, 1] are that layer's K and V pages.

    Sequences are named by any hashable seq_id; an unknown one raises KeyError.

    K and V of one model are wrong for another: claim(model) ties the cache to the model that
    writes it (generate does), and a claim by a different model raises ValueError.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float16, device=None,
                 enable_prefix_caching: bool = True):
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            _check_positive(name, value)
        if block_size < 8 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 8, got {block_size}")
        if dtype not in KV_DTYPES:
            raise TypeError(f"dtype must be one of {KV_DTYPES}, got {dtype}")
        self.kv = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                              dtype=dtype, device=device)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._allocator = BlockAllocator(num_blocks)
        self._seqs: dict[Hashable, _Sequence] = {}
        self._cached: dict[_BlockKey, int] = {}  # the prefix cache: key -> block
        self._block_key: dict[int, _BlockKey] = {}  # and back: cached block -> its key
        # Cached blocks that only the cache holds, least recently used first.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        # The step planned with commit=False and not committed yet: its batch and, per
        # sequence, (seq_id, the sequence, its tokens before the step, after it).
        self._pending: tuple[PagedBatch, list[tuple[Hashable, _Sequence, int, int]]] | None = None
        self._owner: weakref.ref | None = None  # what claim() tied the cache to

    # -- shape and storage ----------------------------------------------------------------

    num_layers = property(lambda self: self.kv.shape[0])
    num_blocks = property(lambda self: self.kv.shape[2])
    block_size = property(lambda self: self.kv.shape[3])
    num_kv_heads = property(lambda self: self.kv.shape[4])
    head_dim = property(lambda self: self.kv.shape[5])
    dtype = property(lambda self: self.kv.dtype)
    device = property(lambda self: self.kv.device)
    allocator = property(lambda self: self._allocator, doc="The BlockAllocator of the pages.")

    def k_cache(self, layer: int) -> torch.Tensor:
        """K pages of a layer: [num_blocks, block_size, num_kv_heads, head_dim], a contiguous view."""
        return self.kv[layer, 0]

    def v_cache(self, layer: int) -> torch.Tensor:
        """V pages of a layer: [num_blocks, block_size, num_kv_heads, head_dim], a contiguous view."""
        return self.kv[layer, 1]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of layer i."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_layers:
            raise ValueError(f"layer must be an int in [0, num_layers = {self.num_layers}), got {i!r}")
        return self.k_cache(i), self.v_cache(i)

    # -- sequences ------------------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable, tokens: Iterable[int] = ()) -> int:
        """Register a new sequence whose prompt is tokens (list of int token ids).

        With prefix caching, the longest run of cached full blocks that starts the prompt,
        within tokens[:-1] (at least one token is always left to compute), becomes the
        sequence's first blocks. Returns how many tokens that covers (a multiple of
        block_size, 0 without a hit): the sequence holds just those; append the rest.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        tokens = _token_list(tokens)
        keys, blocks = self._lookup_prefix(tokens)
        self._take_cached(blocks)
        cached = len(blocks) * self.block_size
        self._seqs[seq_id] = _Sequence(tokens[:cached], blocks, keys, cached)
        return cached

    def append(self, seq_id: Hashable, tokens: Iterable[int]) -> torch.Tensor:
        """Append token ids to a sequence; allocate (and copy-on-write) its pages as needed.

        Returns slot_mapping: int64 [len(tokens)] on the cache device, slot = page *
        block_size + row, where the caller writes these tokens' K and V (in every layer)
        before anything reads them: the full blocks they complete are registered in the
        prefix cache at once (plan(..., commit=False) and commit() defer that until the
        writes are done). Raises OutOfBlocks, changing nothing, when the pages cannot be had
        even by evicting cached blocks.
        """
        seq, tokens = self._seq(seq_id), _token_list(tokens)
        self._reserve(self._blocks_needed(seq, len(tokens)))
        start = len(seq.tokens)
        slots = self._append(seq, tokens)
        self._mark_written(seq, start)
        return slots.to(self.device)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """A new sequence child_id sharing all of parent_id's blocks and tokens."""
        parent = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} already exists")
        self._allocator.fork(parent.blocks)
        self._seqs[child_id] = _Sequence(list(parent.tokens), list(parent.blocks), list(parent.keys),
                                         parent.written)

    def free(self, seq_id: Hashable) -> None:
        """Forget a sequence and drop its references; its cached blocks keep their contents,
        and its blocks a pending step would have registered are never registered."""
        seq = self._seq(seq_id)
        del self._seqs[seq_id]
        self._release(seq.blocks)

    # -- batches for the kernels ----------------------------------------------------------

    def plan(self, seq_ids: list[Hashable], new_tokens: list[Iterable[int]], *,
             commit: bool = True) -> PagedBatch:
        """Append new tokens to each of seq_ids and plan the step that computes them.

        Args:
            seq_ids: distinct sequences of this cache, in the order of the step's rows.
            new_tokens: for each, the token ids (possibly none) whose K and V this step writes.
            commit: register the full blocks the step completes in the prefix cache now, as
                append does (the caller writes their K/V before anything reads them). False
                holds them pending until commit(batch), which the caller calls once the
                forward that writes them has returned; a failed step is never committed and
                leaves no hit on unwritten pages. Either way a successful plan drops the
                previous pending step if it was not committed.
        Returns:
            A PagedBatch on the cache device: the new tokens of seq_ids[b] are rows
            query_start_loc[b] .. of the step's input, written at slot_mapping.
        Raises:
            OutOfBlocks, changing nothing, when the pages cannot be had for all of them
            (even by evicting cached blocks); ValueError for repeated or unknown ids.
        """
        seq_ids, new_tokens = list(seq_ids), [_token_list(t) for t in new_tokens]
        if len(seq_ids) != len(new_tokens):
            raise ValueError(f"{len(seq_ids)} sequences but {len(new_tokens)} token lists")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("a sequence appears twice in one step")
        seqs = [self._seq(seq_id) for seq_id in seq_ids]
        self._reserve(sum(self._blocks_needed(seq, len(t)) for seq, t in zip(seqs, new_tokens)))
        starts_before = [len(seq.tokens) for seq in seqs]
        slots = [self._append(seq, tokens) for seq, tokens in zip(seqs, new_tokens)]
        lens = [len(seq.tokens) for seq in seqs]
        width = max([len(seq.blocks) for seq in seqs] + [1])
        starts = [0]
        for tokens in new_tokens:
            starts.append(starts[-1] + len(tokens))
        host = (torch.cat(slots) if slots else torch.empty(0, dtype=torch.int64),
                torch.tensor([seq.blocks + [0] * (width - len(seq.blocks)) for seq in seqs],
                             dtype=torch.int32).view(len(seqs), width),
                torch.tensor(lens, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32))
        # The cache made these; checking them on the host costs no synchronization.
        max_query_len, max_seq_len = _check_batch_values(*host, self.num_blocks, self.block_size)
        batch = PagedBatch(*(t.to(self.device, non_blocking=True) for t in host), max_query_len, max_seq_len,
                           self.num_blocks, self.block_size)
        self._pending = None
        if commit:
            for seq, start in zip(seqs, starts_before):
                self._mark_written(seq, start)
        else:
            self._pending = (batch, [(seq_id, seq, start, len(seq.tokens))
                                     for seq_id, seq, start in zip(seq_ids, seqs, starts_before)])
        return batch

    def commit(self, batch: PagedBatch) -> None:
        """Record that the K/V of a step planned with commit=False are written (its forward
        returned): the full blocks it completed join the prefix cache. Sequences freed since
        the plan are skipped.

        Raises:
            ValueError when batch is not the pending step: planned with commit=True, already
            committed, or superseded by a later plan (that step's blocks are never registered).
        """
        if self._pending is None or self._pending[0] is not batch:
            raise ValueError("batch is not this cache's pending step: commit takes the batch of the last "
                             "plan(..., commit=False), once")
        _, entries = self._pending
        self._pending = None
        for seq_id, seq, start, end in entries:
            if self._seqs.get(seq_id) is seq:
                self._mark_written(seq, start, end)

    def claim(self, owner) -> None:
        """Tie this cache's K/V to owner, the model that writes them (generate claims it for
        its model; any object with weak references). The first claim sets the owner; a claim
        by any other object raises ValueError, since pages one model wrote, reused through the
        prefix cache, would give another model wrong results."""
        if self._owner is None:
            self._owner = weakref.ref(owner)
            return
        current = self._owner()
        if current is not owner:
            was = "a model that no longer exists" if current is None else f"another {type(current).__name__}"
            raise ValueError(f"cache holds K/V written by {was}: a PagedKVCache serves the one model that "
                             f"first used it; make a new PagedKVCache for this {type(owner).__name__}")

    def block_tables(self, seq_ids: Iterable[Hashable]) -> torch.Tensor:
        """block_tables: int32 [len(seq_ids), max_blocks] on the cache device; max_blocks is
        the most pages of any of these sequences (at least 1); rows are padded with 0."""
        seqs = [self._seq(seq_id) for seq_id in seq_ids]
        width = max([len(seq.blocks) for seq in seqs] + [1])
        rows = [seq.blocks + [0] * (width - len(seq.blocks)) for seq in seqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.device).view(len(seqs), width)

    def seq_lens(self, seq_ids: Iterable[Hashable]) -> torch.Tensor:
        """seq_lens: int32 [len(seq_ids)] on the cache device."""
        lens = [len(self._seq(seq_id).tokens) for seq_id in seq_ids]
        return torch.tensor(lens, dtype=torch.int32, device=self.device)

    def seq_len(self, seq_id: Hashable) -> int:
        return len(self._seq(seq_id).tokens)

    def tokens(self, seq_id: Hashable) -> list[int]:
        return list(self._seq(seq_id).tokens)

    def blocks(self, seq_id: Hashable) -> list[int]:
        return list(self._seq(seq_id).blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can get: free ones and evictable cached ones."""
        return self._allocator.num_free + len(self._evictable)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    # -- private: block bookkeeping -------------------------------------------------------

    def _seq(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def _needs_copy(self, seq: _Sequence) -> bool:
        """Whether the last page is partly filled and shared: appending must copy it first."""
        return len(seq.tokens) % self.block_size != 0 and self._allocator.refcount(seq.blocks[-1]) > 1

    def _blocks_needed(self, seq: _Sequence, n: int) -> int:
        new_pages = _cdiv(len(seq.tokens) + n, self.block_size) - len(seq.blocks)
        return new_pages + self._needs_copy(seq)

    def _append(self, seq: _Sequence, tokens: list[int]) -> torch.Tensor:
        """Append tokens to seq, its blocks already reserved; their slots, int64 on the CPU."""
        start = len(seq.tokens)
        if not tokens:
            return torch.empty(0, dtype=torch.int64)
        if self._needs_copy(seq):
            self._copy_on_write(seq)
        seq.blocks += self._allocator.allocate(_cdiv(start + len(tokens), self.block_size) - len(seq.blocks))
        seq.tokens += tokens
        return self._slot_mapping(seq, start)

    def _mark_written(self, seq: _Sequence, start: int, end: int | None = None) -> None:
        """The K/V of seq.tokens[start:end] are written (end: all of them). That extends the
        known-written prefix only if it continued it (start == seq.written): after a step
        that was never committed, nothing past it is ever registered."""
        if seq.written == start:
            seq.written = len(seq.tokens) if end is None else end
            self._register_full_blocks(seq)

    def _reserve(self, n: int) -> None:
        """Make n blocks free, evicting least recently used cached blocks only if needed."""
        free, evictable = self._allocator.num_free, len(self._evictable)
        if n > free + evictable:
            raise OutOfBlocks(f"asked for {n} blocks, {free} free and {evictable} evictable")
        for _ in range(n - free):
            self._evict_one()

    def _evict_one(self) -> None:
        block, _ = self._evictable.popitem(last=False)
        del self._cached[self._block_key.pop(block)]
        self._allocator.free([block])

    def _release(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Cached blocks left to the cache alone become
        evictable, the last block first: a block is only ever hit after the ones before it."""
        self._allocator.free(blocks)
        for block in reversed(blocks):
            if block in self._block_key and self._allocator.refcount(block) == 1:
                self._evictable[block] = None

    def _copy_on_write(self, seq: _Sequence) -> None:
        """Give seq a private copy of its shared, partly filled last page."""
        old, new = seq.blocks[-1], self._allocator.allocate(1)[0]
        self._copy_page(old, new, len(seq.tokens) % self.block_size)
        self._release([old])
        seq.blocks[-1] = new

    def _copy_page(self, src: int, dst: int, rows: int) -> None:
        """Copy the first rows of page src to page dst, K and V of every layer at once."""
        self.kv[:, :, dst, :rows].copy_(self.kv[:, :, src, :rows])

    def _slot_mapping(self, seq: _Sequence, start: int) -> torch.Tensor:
        """slot_mapping int64 [len(seq.tokens) - start] (CPU) of the tokens from position start on."""
        positions = torch.arange(start, len(seq.tokens))
        pages = torch.tensor(seq.blocks, dtype=torch.int64)[positions // self.block_size]
        return pages * self.block_size + positions % self.block_size

    # -- private: prefix cache ------------------------------------------------------------

    def _lookup_prefix(self, tokens: list[int]) -> tuple[list[_BlockKey], list[int]]:
        """Keys and blocks of the cached full blocks that start tokens[:-1]."""
        keys, blocks = [], []
        if not self.enable_prefix_caching:
            return keys, blocks
        for i in range(max(len(tokens) - 1, 0) // self.block_size):
            key = _BlockKey(keys[-1] if keys else None, self._block_tokens(tokens, i))
            block = self._cached.get(key)
            if block is None:
                break
            keys.append(self._block_key[block])
            blocks.append(block)
        return keys, blocks

    def _take_cached(self, blocks: list[int]) -> None:
        """Share cache hits: one more reference each, and none of them evictable now."""
        self._allocator.fork(blocks)
        for block in blocks:
            self._evictable.pop(block, None)

    def _register_full_blocks(self, seq: _Sequence) -> None:
        if not self.enable_prefix_caching:
            return
        for i in range(len(seq.keys), seq.written // self.block_size):
            key = _BlockKey(seq.keys[-1] if seq.keys else None, self._block_tokens(seq.tokens, i))
            seq.keys.append(self._register(key, seq.blocks[i]))

    def _register(self, key: _BlockKey, block: int) -> _BlockKey:
        """Cache block under key unless an equal key is cached already; return the cached key."""
        if key in self._cached:
            return self._block_key[self._cached[key]]
        self._allocator.fork([block])  # the cache's own reference
        self._cached[key], self._block_key[block] = block, key
        return key

    def _block_tokens(self, tokens: list[int], i: int) -> tuple[int, ...]:
        return tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
