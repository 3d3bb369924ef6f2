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

Blocks are shared by reference count. fork() shares all blocks of a sequence (parallel
sampling, beam search); a sharer that appends to a shared, partly filled last block first
copies it (copy-on-write), so the other sharer, left sole owner, writes in place. With prefix
caching every full block is registered under its tokens and those of all blocks before it; a
new sequence whose prompt starts with registered blocks shares them instead of recomputing
them. The cache holds one reference to each block it registered. A block whose only
reference is the cache's is evictable, least recently used first, and only when an
allocation finds no free block left.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
from collections.abc import Hashable, Iterable

import torch

KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class OutOfBlocks(RuntimeError):
    """A request needs more blocks than are free (and, in a PagedKVCache, evictable)."""


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _token_list(tokens) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    return [operator.index(t) for t in tokens]


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
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
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
    keys: list[_BlockKey]  # prefix-cache keys of its full blocks (empty without prefix caching)


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
        self._seqs[seq_id] = _Sequence(tokens[:cached], blocks, keys)
        return cached

    def append(self, seq_id: Hashable, tokens: Iterable[int]) -> torch.Tensor:
        """Append token ids to a sequence; allocate (and copy-on-write) its pages as needed.

        Returns slot_mapping: int64 [len(tokens)] on the cache device, slot = page *
        block_size + row, where the caller writes these tokens' K and V (in every layer)
        before anything reads them. Raises OutOfBlocks, changing nothing, when the pages
        cannot be had even by evicting cached blocks.
        """
        seq, tokens = self._seq(seq_id), _token_list(tokens)
        if not tokens:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        self._reserve(self._blocks_needed(seq, len(tokens)))
        start = len(seq.tokens)
        if self._needs_copy(seq):
            self._copy_on_write(seq)
        seq.blocks += self._allocator.allocate(_cdiv(start + len(tokens), self.block_size) - len(seq.blocks))
        seq.tokens += tokens
        self._register_full_blocks(seq)
        return self._slot_mapping(seq, start)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """A new sequence child_id sharing all of parent_id's blocks and tokens."""
        parent = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} already exists")
        self._allocator.fork(parent.blocks)
        self._seqs[child_id] = _Sequence(list(parent.tokens), list(parent.blocks), list(parent.keys))

    def free(self, seq_id: Hashable) -> None:
        """Forget a sequence and drop its references; its cached blocks keep their contents."""
        seq = self._seq(seq_id)
        del self._seqs[seq_id]
        self._release(seq.blocks)

    # -- batches for the kernels ----------------------------------------------------------

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
        """slot_mapping int64 [len(seq.tokens) - start] of the tokens from position start on."""
        positions = torch.arange(start, len(seq.tokens))
        pages = torch.tensor(seq.blocks)[positions // self.block_size]
        return (pages * self.block_size + positions % self.block_size).to(self.device)

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
        for i in range(len(seq.keys), len(seq.tokens) // self.block_size):
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
