"""Batched generation over the paged KV cache: chunked prefill, then batched decode.

Each step plans its batch once (PagedKVCache.plan: pages appended, index tables built and
checked on the host, uploaded once) and runs the model on the new tokens of every active
sequence (models/llama.py, PagedContext); no layer reads anything back. Prefill steps take
up to `prefill_chunk` prompt tokens from as many sequences as fit, decode steps one token
from each. Prompts that start with blocks already
in the cache's prefix cache skip them. A sequence that stops frees its pages at once. On a
GPU the decode step is captured in a CUDA graph per batch-size bucket and replayed.

Every step is planned with commit=False and committed once the model's forward has returned:
a step that raises (an exception in a layer, an interrupt) leaves no prefix-cache entry on
pages it did not finish writing, so the next call with the same prompt recomputes them. A
cache serves one model (PagedKVCache.claim) of its own geometry.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import time
import types
import warnings

import torch

from .kv_cache import PagedBatch, PagedKVCache
from .models.llama import Llama, PagedContext


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens int64 [B] from logits [B, vocab]: greedy at temperature 0, else softmax of
    logits / temperature restricted to the top_k tokens and the top_p probability mass."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already hold top_p of the mass (the first stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _token_ids(name: str, value) -> list[int]:
    """A list of int token ids from a list / tuple / 1-D integer tensor or numpy array."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be token ids, got a string: encode it with the tokenizer first")
    if hasattr(value, "ndim") and hasattr(value, "tolist"):  # torch.Tensor, numpy.ndarray
        if value.ndim != 1:
            raise ValueError(f"{name} must be 1-D token ids, got shape {tuple(value.shape)}")
        value = value.tolist()
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of int token ids, got {type(value).__name__}") from None
    out = []
    for t in items:
        try:
            if isinstance(t, bool):
                raise TypeError
            out.append(operator.index(t))
        except TypeError:
            raise TypeError(f"{name} must hold int token ids, got {t!r} ({type(t).__name__})") from None
    return out


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if hasattr(prompts, "ndim") and getattr(prompts, "ndim", 0) == 2:  # [batch, length] tensor or array
        prompts = list(prompts)
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of token-id lists, got {type(prompts).__name__}")
    if all(isinstance(p, numbers.Integral) for p in prompts):
        raise TypeError("prompts must be a list of prompts, each a list of token ids: wrap a single prompt "
                        "in a list")
    out = []
    for i, prompt in enumerate(prompts):
        prompt = _token_ids(f"prompts[{i}]", prompt)
        if not prompt:
            raise ValueError(f"prompts[{i}] is empty")
        if any(not 0 <= t < vocab_size for t in prompt):
            raise ValueError(f"prompts[{i}] holds token ids outside [0, {vocab_size})")
        out.append(prompt)
    return out


def _check_stop_tokens(stop_tokens) -> set[int]:
    """stop_tokens as a set of ints: None, an int, ints, or a 0-D / 1-D integer tensor or array."""
    if stop_tokens is None:
        return set()
    if getattr(stop_tokens, "ndim", None) == 0 or isinstance(stop_tokens, numbers.Integral):
        stop_tokens = [stop_tokens]
    stop = set(_token_ids("stop_tokens", stop_tokens))
    if any(t < 0 for t in stop):
        raise ValueError(f"stop_tokens must be non-negative token ids, got {sorted(stop)}")
    return stop


def _check_int(name: str, value, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_sampling(temperature, top_k, top_p) -> tuple[float, int, float]:
    temperature, top_p = _check_float("temperature", temperature), _check_float("top_p", top_p)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] (1 keeps every token), got {top_p}")
    return temperature, _check_int("top_k", top_k, 0), top_p


def _check_cache(cache, model: Llama) -> None:
    """The cache has the model's geometry, dtype and device, and serves this model only."""
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    config = model.config
    for name, want in (("num_layers", config.num_layers), ("num_kv_heads", config.num_kv_heads),
                       ("head_dim", config.head_dim), ("dtype", model.dtype), ("device", model.device)):
        if getattr(cache, name) != want:
            raise ValueError(f"cache has {name} = {getattr(cache, name)} but the model needs {want}")
    cache.claim(model)


class _DecodeGraphs:
    """CUDA graphs of the decode step, one per batch-size bucket (1, 2, 4, ...), over static
    input buffers. Rows past the live batch are padding: slot -1 (nothing written), one
    token of page 0 to attend to, logits ignored."""

    def __init__(self, model: Llama, cache: PagedKVCache, max_blocks: int, backend: str):
        self.model, self.cache, self.max_blocks, self.backend = model, cache, max_blocks, backend
        self.graphs = {}

    def run(self, input_ids, positions, batch: PagedBatch) -> torch.Tensor:
        size = input_ids.shape[0]
        bucket = 1 << (size - 1).bit_length()
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, buffers, logits = self.graphs[bucket]
        for name in ("input_ids", "positions", "block_tables"):  # query_start_loc stays arange
            buffers[name].zero_()
        buffers["slot_mapping"].fill_(-1)
        buffers["seq_lens"].fill_(1)
        buffers["input_ids"][:size] = input_ids
        buffers["positions"][:size] = positions
        buffers["slot_mapping"][:size] = batch.slot_mapping
        buffers["block_tables"][:size, :batch.block_tables.shape[1]] = batch.block_tables
        buffers["seq_lens"][:size] = batch.seq_lens
        graph.replay()
        return logits[:size]

    def _step(self, b):
        # A trusted batch over the static buffers: run() fills them from planned (checked)
        # batches, and padding rows point at page 0 with one token and write nothing.
        batch = PagedBatch(b["slot_mapping"], b["block_tables"], b["seq_lens"], b["query_start_loc"], 1,
                           self.max_blocks * self.cache.block_size, self.cache.num_blocks, self.cache.block_size)
        return self.model(b["input_ids"], b["positions"], PagedContext(self.cache, batch, self.backend))

    def _capture(self, bucket: int):
        device = self.cache.device
        b = {"input_ids": torch.zeros(bucket, dtype=torch.int64, device=device),
             "positions": torch.zeros(bucket, dtype=torch.int64, device=device),
             "slot_mapping": torch.full((bucket,), -1, dtype=torch.int64, device=device),
             "block_tables": torch.zeros(bucket, self.max_blocks, dtype=torch.int32, device=device),
             "seq_lens": torch.ones(bucket, dtype=torch.int32, device=device),
             "query_start_loc": torch.arange(bucket + 1, dtype=torch.int32, device=device)}
        # Warm up outside the graph (autotuning and lazy initialization cannot be captured).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(b)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._step(b)
        return graph, b, logits


def _decode_step(model: Llama, cache: PagedKVCache, input_ids, positions, slot_mapping, block_tables, seq_lens,
                 query_start_loc, backend: str) -> torch.Tensor:
    """One decode step of a padded batch: the function _CompiledDecode compiles. A trusted
    PagedBatch over tensors built from a planned (checked) one, as _DecodeGraphs' is."""
    batch = PagedBatch(slot_mapping, block_tables, seq_lens, query_start_loc, 1,
                       block_tables.shape[1] * cache.block_size, cache.num_blocks, cache.block_size)
    return model(input_ids, positions, PagedContext(cache, batch, backend))


_COMPILED_ATTRIBUTE = "_fourbit_compiled_decode"  # where a model keeps its _CompiledDecode


def _new_compiled_step():
    """torch.compile of a copy of _decode_step with its own code object: dynamo keeps graphs and
    guards on the code, so a copy's graphs serve only the (model, signature) it was made for.

    fullgraph: a graph break raises (and generate decodes eagerly) rather than run a step cut
    into pieces. dynamic=False: one graph per padded batch size; only the block-table width is
    symbolic (marked per call). The cache's page count stays static: torch 2.13's inductor
    drops the symbolic storage offsets of the per-layer views a write_kv mutates (both pages
    written at offset 0), so a symbolic page count corrupts the cache.

    No guards on the model's modules (skip_guard_on_all_nn_modules_unsafe): dynamo would check
    5,300 of them on every step for SmolLM2 (types, hook dicts, attributes, 424 weight
    tensors), about 1 ms of a 5.7 ms step. model_signature, computed once per generate call,
    stands in for them; the guards on the cache, the step's tensors and global state stay.
    size_asserts off: inductor would check the size and stride of every graph input and
    custom-op output on every step, 581 checks per SmolLM2 step (0.55 us each; 5.5 -> 5.2 ms
    per step, interleaved in one process). The inputs are what the signature and the guards
    describe; the ops' outputs are contiguous in this graph, as their fakes say
    (torch.library.opcheck in the tests, and test_compiled_decode against eager).
    cpp_wrapper: the graph's wrapper (the code that calls its kernels and fourbit's ops in
    order) is C++, not Python: on this project's 2-core Xeon, SmolLM2 batch-1 decode 114-125
    -> 130-142 tokens/s (alternating processes). cpp_wrapper_build_separate: the wrapper and
    the kernels compile as separate files, which cut the cold first call from 95 to 48 s
    (the Python wrapper's: 29 s) at the same speed."""
    step = types.FunctionType(_decode_step.__code__.replace(), _decode_step.__globals__, _decode_step.__name__)
    return torch.compile(step, dynamic=False, fullgraph=True,
                         options={"size_asserts": False, "cpp_wrapper": True, "cpp_wrapper_build_separate": True,
                                  "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})


_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _describe(value, depth: int = 0):
    """A hashable description of one module attribute for model_signature: plain values as
    themselves; tensors by dtype, device, shape, strides, storage offset and requires_grad
    (what a graph that takes them as inputs is specialized to, not their values); containers
    and dataclasses (a config) by their contents; modules (walked on their own), functions
    (hooks, a patched forward) and other objects by identity."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.device, tuple(value.shape), value.stride(), value.storage_offset(),
                value.requires_grad)
    if depth < 4:
        if isinstance(value, (tuple, list)):
            return (type(value), tuple(_describe(v, depth + 1) for v in value))
        if isinstance(value, (set, frozenset)):
            return (type(value), tuple(sorted(repr(_describe(v, depth + 1)) for v in value)))
        if isinstance(value, dict):
            return (type(value), tuple((k, _describe(v, depth + 1)) for k, v in value.items()))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return (type(value), tuple((f.name, _describe(getattr(value, f.name), depth + 1))
                                       for f in dataclasses.fields(value)))
    return (type(value), id(value))


def model_signature(model: torch.nn.Module) -> tuple:
    """Everything a compiled decode step reads through the model's modules, as one hashable
    value: each module's name, type and attributes (its parameters, buffers, hooks, backend,
    eps, config, ... as _describe gives them). A compiled step runs without dynamo's guards
    on the modules (see _new_compiled_step); a model whose signature changed between generate
    calls (a layer moved to another backend, a weight replaced by one of another shape or
    dtype, a hook added, a module swapped) gets a graph of its own. Changing the model during
    a generate call is not supported."""
    return tuple((name, type(module), tuple((k, _describe(v)) for k, v in vars(module).items()
                                            if k != _COMPILED_ATTRIBUTE))
                 for name, module in model.named_modules())


class _CompiledDecode:
    """The decode step under torch.compile (inductor's CPU backend), one graph per batch-size
    bucket (1, 2, 4, ...) and cache geometry (pages, page size), kept on the model across
    generate calls. fourbit's ops stay opaque custom ops in the graph (the compiler sees their
    fakes), so each runs the backend "auto" picks, as in eager mode; what the compiler removes
    is the per-op overhead between them (norms, rotary embeddings, SwiGLU, residual adds fused
    into a few C++ loops). Rows past the live batch are padding, as in _DecodeGraphs.

    Each model_signature the model has had gets its own torch.compile (_new_compiled_step):
    a layer moved to another backend, or any other change between calls, is another graph.

    Attributes:
        compile_seconds: {(bucket, num_blocks, block_size, dtype, backend, variant): seconds of
            the first call (trace, compile and one step)}; variant counts the model's
            signatures in the order they were first seen (0, 1, ...).
        error: why compiling failed (then generate decodes eagerly), or None.
    """

    # Dynamo's per-function recompile limit while a new bucket compiles (its default, 8,
    # would be reached by a few buckets of a few models in one process).
    RECOMPILE_LIMIT = 64

    def __init__(self):
        self.compile_seconds, self.error = {}, None
        self._variants, self._steps = {}, []  # model_signature -> variant; each variant's step

    def variant(self, model: Llama) -> int:
        """The number of the model's model_signature now (a new one gets its own compiled step).
        Once per generate call: the signature walks every module (about 8 ms for SmolLM2), and
        a tuple that size is hashed anew on each lookup (about 2.6 ms)."""
        signature = model_signature(model)
        if signature not in self._variants:
            self._variants[signature] = len(self._steps)
            self._steps.append(_new_compiled_step())
        return self._variants[signature]

    @staticmethod
    def of(model: Llama) -> _CompiledDecode:
        """The model's compiled decode (made on first use)."""
        compiled = model.__dict__.get(_COMPILED_ATTRIBUTE)
        if compiled is None:
            compiled = model.__dict__[_COMPILED_ATTRIBUTE] = _CompiledDecode()
        return compiled

    def run(self, model: Llama, cache: PagedKVCache, input_ids, positions, batch: PagedBatch,
            backend: str, variant: int) -> torch.Tensor:
        """One decode step of `model`, whose model_signature is `variant` (self.variant(model)
        of this generate call); new graphs compile under the raised limit."""
        size, device = input_ids.shape[0], input_ids.device
        bucket = 1 << (size - 1).bit_length()
        pad = bucket - size
        # At least two columns: a width of 1 would be specialized (dynamo's 0/1 rule) and
        # compile a second graph. Column 1 onward past a sequence's pages is never read.
        width = max(batch.block_tables.shape[1], 2)
        block_tables = torch.zeros(bucket, width, dtype=torch.int32, device=device)
        block_tables[:size, :batch.block_tables.shape[1]] = batch.block_tables
        if pad:
            input_ids = torch.cat([input_ids, input_ids.new_zeros(pad)])
            positions = torch.cat([positions, positions.new_zeros(pad)])
            slot_mapping = torch.cat([batch.slot_mapping, batch.slot_mapping.new_full((pad,), -1)])
            seq_lens = torch.cat([batch.seq_lens, batch.seq_lens.new_ones(pad)])
        else:
            slot_mapping, seq_lens = batch.slot_mapping, batch.seq_lens
        query_start_loc = torch.arange(bucket + 1, dtype=torch.int32, device=device)
        torch._dynamo.mark_dynamic(block_tables, 1)
        args = (model, cache, input_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc, backend)
        step = self._steps[variant]
        key = (bucket, cache.num_blocks, cache.block_size, str(model.dtype).split(".")[-1], backend, variant)
        if key in self.compile_seconds:
            return step(*args)[:size]
        start = time.perf_counter()
        limit = max(self.RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
        with torch._dynamo.config.patch(recompile_limit=limit):
            logits = step(*args)
        self.compile_seconds[key] = time.perf_counter() - start
        return logits[:size]


def _num_blocks(needed: int, block_size: int, compile_decode: bool) -> int:
    """Pages of the cache generate makes: what the prompts need; when the decode step is
    compiled, rounded up to a power of two and to at least 256 tokens' worth (the graph is
    specialized to the cache's page count, so calls of similar lengths share one graph)."""
    if not compile_decode:
        return needed
    return max(1 << (needed - 1).bit_length(), -(-256 // block_size))


@torch.inference_mode()
def generate(model: Llama, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens=None, seed: int | None = None, *, block_size: int = 16,
             prefill_chunk: int = 512, cache: PagedKVCache | None = None, use_cuda_graph: bool | None = None,
             backend: str = "auto", compile: bool = False) -> list[list[int]]:
    """Generate continuations of token-id prompts of different lengths, batched.

    Args:
        model: a Llama (fourbit.load_model).
        prompts: list of prompts, each a list / tuple / 1-D tensor / numpy array of int token
            ids in [0, vocab_size) (or one 2-D tensor, a prompt per row); each prompt plus
            max_new_tokens within the model's max_position_embeddings.
        max_new_tokens: at most this many new tokens per sequence (an int >= 0).
        temperature, top_k, top_p: temperature 0 is greedy; otherwise sampling (top_k 0 and
            top_p 1 keep every token). temperature finite and >= 0, top_k an int >= 0, top_p
            in (0, 1].
        stop_tokens: token ids that end a sequence (not included in its output): an int, an
            iterable of ints, or a 1-D integer tensor. Text is not accepted (encode it first).
        seed: makes sampling reproducible.
        block_size, prefill_chunk: pages of the KV cache; prompt tokens per prefill step (>= 1).
        cache: an existing PagedKVCache to use (with its prefix cache); by default a new one
            sized for these prompts. It must match the model (layers, KV heads, head_dim, dtype,
            device), and it serves only the model that first used it (ValueError otherwise).
        use_cuda_graph: capture decode steps in CUDA graphs on CUDA devices (default True).
        backend: the attention backend ("auto", "torch", "triton", "cuda").
        compile: run decode steps off the GPU through torch.compile (inductor), one graph
            per batch-size bucket (1, 2, 4, ...) and cache geometry, kept on the model for
            later calls: the first step of each costs the compile (tens of seconds on a
            2-core CPU; compile_stats(model) lists them), later ones run the fused graph.
            If compiling fails, a warning says why and the call decodes eagerly (so do later
            calls on this model). The default cache then has a power of two of pages, at
            least 256 tokens' worth, so that calls of similar lengths share a graph. A model
            changed between calls (a layer's backend, a module, a weight's shape or layout)
            gets graphs of its own (model_signature); weight values may change freely.
            Prefill stays eager. On CUDA
            devices the CUDA graphs serve and this is ignored.
    Returns:
        The new tokens of each prompt, in order.
    Raises:
        TypeError / ValueError naming the argument that is wrong. On any error midway the
        cache keeps no sequence of this call and no prefix-cache entry it did not finish.
    """
    config = model.config
    prompts = _check_prompts(prompts, config.vocab_size)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 0)
    temperature, top_k, top_p = _check_sampling(temperature, top_k, top_p)
    prefill_chunk = _check_int("prefill_chunk", prefill_chunk, 1)
    seed = None if seed is None else _check_int("seed", seed, -(2 ** 63))
    stop = _check_stop_tokens(stop_tokens)
    for i, prompt in enumerate(prompts):
        if len(prompt) + max_new_tokens > config.max_position_embeddings:
            raise ValueError(f"prompts[{i}] has {len(prompt)} tokens and max_new_tokens is {max_new_tokens}: "
                             f"{len(prompt) + max_new_tokens} positions, beyond the model's context "
                             f"(max_position_embeddings = {config.max_position_embeddings})")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    device = model.device
    compiled = None
    if compile and device.type != "cuda":
        compiled = _CompiledDecode.of(model)
        if compiled.error is not None:
            compiled = None
    variant = None  # the model's signature, taken at the first decode step (none for prefill-only calls)
    if cache is None:
        block_size = _check_int("block_size", block_size, 1)
        needed = sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts) + 1
        cache = PagedKVCache(config.num_layers, _num_blocks(needed, block_size, compiled is not None), block_size,
                             config.num_kv_heads, config.head_dim, model.dtype, device)
    _check_cache(cache, model)
    max_len = max(len(p) for p in prompts) + max_new_tokens
    max_blocks = -(-max_len // cache.block_size)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    graphs = None
    if device.type == "cuda" and use_cuda_graph is not False:
        graphs = _DecodeGraphs(model, cache, max(max_blocks, 1), backend)

    seqs = [object() for _ in prompts]  # cache ids of this call's sequences
    pending = {}                          # seq -> prompt tokens not yet in the cache
    outputs = {seq: [] for seq in seqs}
    last = {}                             # seq -> sampled token whose K/V is not yet cached
    done = set()

    def take(seq, logits_row_token):
        token = int(logits_row_token)
        if token in stop or max_new_tokens == 0:
            done.add(seq)
            return
        outputs[seq].append(token)
        if len(outputs[seq]) >= max_new_tokens:
            done.add(seq)
        else:
            last[seq] = token

    try:
        for seq, prompt in zip(seqs, prompts):
            pending[seq] = prompt[cache.add_sequence(seq, prompt):]
        # Chunked prefill: up to prefill_chunk prompt tokens per step, across sequences.
        while any(pending.values()):
            batch, chunks, budget = [], [], prefill_chunk
            for seq in seqs:
                if pending[seq] and budget > 0:
                    chunk, pending[seq] = pending[seq][:budget], pending[seq][budget:]
                    batch.append(seq)
                    chunks.append(chunk)
                    budget -= len(chunk)
            starts = [cache.seq_len(s) for s in batch]
            lengths = torch.tensor([len(c) for c in chunks])
            positions = torch.cat([torch.arange(s, s + len(c)) for s, c in zip(starts, chunks)]).to(device)
            query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            finished = [i for i, s in enumerate(batch) if not pending[s]]  # prompts complete this step
            step = cache.plan(batch, chunks, commit=False)
            input_ids = torch.tensor([t for c in chunks for t in c], device=device)
            rows = (query_start_loc[1:] - 1)[finished].to(device)
            logits = model(input_ids, positions, PagedContext(cache, step, backend), logits_rows=rows)
            cache.commit(step)  # every layer wrote this step's K/V: its full pages may be hit now
            if finished:
                for i, token in zip(finished, sample(logits, temperature, top_k, top_p, generator).tolist()):
                    take(batch[i], token)

        # Batched decode: one token per live sequence per step.
        while True:
            for seq in [s for s in seqs if s in done and s in cache]:
                cache.free(seq)
            batch = [s for s in seqs if s not in done]
            if not batch:
                break
            step = cache.plan(batch, [[last[s]] for s in batch], commit=False)
            input_ids = torch.tensor([last[s] for s in batch], device=device)
            positions = torch.tensor([cache.seq_len(s) - 1 for s in batch], device=device)
            logits = None
            if graphs is not None:
                try:
                    logits = graphs.run(input_ids, positions, step)
                except RuntimeError as error:  # a capture that fails costs speed, not the result
                    warnings.warn(f"fourbit.generate: CUDA graph capture failed ({error}); decoding eagerly",
                                  stacklevel=2)
                    graphs = None
            if compiled is not None:
                try:
                    if variant is None:
                        variant = compiled.variant(model)
                    logits = compiled.run(model, cache, input_ids, positions, step, backend, variant)
                except Exception as error:  # a compile that fails costs speed, not the result
                    compiled.error = f"{type(error).__name__}: {error}"
                    warnings.warn(f"fourbit.generate: torch.compile of the decode step failed "
                                  f"({compiled.error.splitlines()[0]}); decoding eagerly", stacklevel=3)
                    compiled = None
            if logits is None:
                logits = model(input_ids, positions, PagedContext(cache, step, backend))
            cache.commit(step)
            for seq, token in zip(batch, sample(logits, temperature, top_k, top_p, generator).tolist()):
                take(seq, token)
    finally:
        for seq in seqs:
            if seq in cache:
                cache.free(seq)
    return [outputs[seq] for seq in seqs]


def compile_stats(model: Llama) -> dict:
    """What generate(..., compile=True) did on this model: {"compile_seconds": {(bucket,
    num_blocks, block_size, dtype, backend, variant): first-call seconds}, "error": why
    compiling failed or None, "threads": torch's intra-op threads now}; a variant is one
    model_signature of the model (0 for the first seen, then 1, ...)."""
    compiled = model.__dict__.get(_COMPILED_ATTRIBUTE) or _CompiledDecode()
    return {"compile_seconds": dict(compiled.compile_seconds), "error": compiled.error,
            "threads": torch.get_num_threads()}
