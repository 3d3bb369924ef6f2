"""Batched generation over the paged KV cache: chunked prefill, then batched decode.

Each step plans its batch once (PagedKVCache.plan: pages appended, index tables built and
checked on the host, uploaded once) and runs the model on the new tokens of every active
sequence (models/llama.py, PagedContext); no layer reads anything back. Prefill steps take
up to `prefill_chunk` prompt tokens from as many sequences as fit, decode steps one token
from each. Prompts that start with blocks already
in the cache's prefix cache skip them. A sequence that stops frees its pages at once. On a
GPU the decode step is captured in a CUDA graph per batch-size bucket and replayed.
"""

from __future__ import annotations

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


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, prompt in enumerate(prompts):
        prompt = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt):
            raise ValueError(f"prompt {i} holds token ids outside [0, {vocab_size})")
        out.append(prompt)
    return out


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


@torch.inference_mode()
def generate(model: Llama, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens=None, seed: int | None = None, *, block_size: int = 16,
             prefill_chunk: int = 512, cache: PagedKVCache | None = None, use_cuda_graph: bool | None = None,
             backend: str = "auto") -> list[list[int]]:
    """Generate continuations of token-id prompts of different lengths, batched.

    Args:
        model: a Llama (fourbit.load_model).
        prompts: list of token-id lists (or 1-D tensors).
        max_new_tokens: at most this many new tokens per sequence.
        temperature, top_k, top_p: 0 is greedy; otherwise sampling (top_k 0 and top_p 1 keep
            every token).
        stop_tokens: token ids that end a sequence (not included in its output).
        seed: makes sampling reproducible.
        block_size, prefill_chunk: pages of the KV cache; prompt tokens per prefill step.
        cache: an existing PagedKVCache to use (with its prefix cache); by default a new one
            sized for these prompts.
        use_cuda_graph: capture decode steps in CUDA graphs on CUDA devices (default True).
        backend: the attention backend ("auto", "torch", "triton", "cuda").
    Returns:
        The new tokens of each prompt, in order.
    """
    config = model.config
    prompts = _check_prompts(prompts, config.vocab_size)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    stop = set([stop_tokens] if isinstance(stop_tokens, int) else stop_tokens or ())
    device = model.device
    max_len = max(len(p) for p in prompts) + max_new_tokens
    max_blocks = -(-max_len // block_size)
    if cache is None:
        cache = PagedKVCache(config.num_layers, sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts) + 1,
                             block_size, config.num_kv_heads, config.head_dim, model.dtype, device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    graphs = None
    if device.type == "cuda" and use_cuda_graph is not False:
        graphs = _DecodeGraphs(model, cache, max(max_blocks, 1), backend)

    seqs = [object() for _ in prompts]  # cache ids of this call's sequences
    pending = {}                          # seq -> prompt tokens not yet in the cache
    for seq, prompt in zip(seqs, prompts):
        pending[seq] = prompt[cache.add_sequence(seq, prompt):]
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
            context = PagedContext(cache, cache.plan(batch, chunks), backend)
            input_ids = torch.tensor([t for c in chunks for t in c], device=device)
            rows = (query_start_loc[1:] - 1)[finished].to(device)
            logits = model(input_ids, positions, context, logits_rows=rows)
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
            step = cache.plan(batch, [[last[s]] for s in batch])
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
            if logits is None:
                logits = model(input_ids, positions, PagedContext(cache, step, backend))
            for seq, token in zip(batch, sample(logits, temperature, top_k, top_p, generator).tolist()):
                take(seq, token)
    finally:
        for seq in seqs:
            if seq in cache:
                cache.free(seq)
    return [outputs[seq] for seq in seqs]
