"""Generation over the paged KV cache: the paged forward against the plain causal forward,
batching, chunked prefill, prefix reuse, sampling, stopping, and bad input."""

import pytest
import torch

import fourbit
from fourbit.generate import sample
from fourbit.models import PagedContext
from helpers import relative_error

PROMPTS = [[1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198], [19556, 905],
           list(range(100, 137))]


def test_paged_prefill_and_decode_match_the_plain_forward(smollm):
    """Chunked prefill of two sequences (chunks cut mid-sequence), then decode steps, through
    the cache: every logit row equals the plain causal forward's at the same position."""
    config = smollm.config
    cache = fourbit.PagedKVCache(config.num_layers, 16, 16, config.num_kv_heads, config.head_dim, torch.float32)
    seqs = {"a": PROMPTS[0] + [42, 43], "b": PROMPTS[2] + [7, 8]}
    with torch.no_grad():
        plain = {name: smollm(torch.tensor([ids]))[0] for name, ids in seqs.items()}
        for name in seqs:
            cache.add_sequence(name)
        done = {name: 0 for name in seqs}
        # Prefill in chunks of at most 10 tokens per sequence, then one token per decode step.
        while any(done[n] < len(seqs[n]) - 2 for n in seqs):
            names = [n for n in seqs if done[n] < len(seqs[n]) - 2]
            chunks = {n: seqs[n][done[n]:min(done[n] + 10, len(seqs[n]) - 2)] for n in names}
            slots = torch.cat([cache.append(n, chunks[n]) for n in names])
            positions = torch.cat([torch.arange(done[n], done[n] + len(chunks[n])) for n in names])
            starts = torch.tensor([0] + [len(chunks[n]) for n in names]).cumsum(0).to(torch.int32)
            context = PagedContext(cache, slots, cache.block_tables(names), cache.seq_lens(names), starts)
            logits = smollm(torch.tensor([t for n in names for t in chunks[n]]), positions, context)
            for i, n in enumerate(names):
                rows = plain[n][done[n]:done[n] + len(chunks[n])]
                assert relative_error(logits[starts[i]:starts[i + 1]], rows) < 1e-4
                done[n] += len(chunks[n])
        for step in range(2):
            names = list(seqs)
            slots = torch.cat([cache.append(n, [seqs[n][done[n]]]) for n in names])
            seq_lens = cache.seq_lens(names)
            context = PagedContext(cache, slots, cache.block_tables(names), seq_lens, decode=True)
            logits = smollm(torch.tensor([seqs[n][done[n]] for n in names]), (seq_lens - 1).long(), context)
            for i, n in enumerate(names):
                assert relative_error(logits[i], plain[n][done[n]]) < 1e-4
                done[n] += 1


def test_batched_generation_equals_one_prompt_at_a_time(smollm):
    together = fourbit.generate(smollm, PROMPTS, max_new_tokens=8, prefill_chunk=20)
    alone = [fourbit.generate(smollm, [p], max_new_tokens=8)[0] for p in PROMPTS]
    assert together == alone and all(len(out) == 8 for out in together)


def test_a_shared_cache_reuses_prompt_prefixes_and_frees_everything(smollm):
    config = smollm.config
    cache = fourbit.PagedKVCache(config.num_layers, 64, 16, config.num_kv_heads, config.head_dim, torch.float32)
    first = fourbit.generate(smollm, [PROMPTS[2]], max_new_tokens=5, cache=cache)
    assert cache.num_free_blocks == 64  # the sequence's pages are free or evictable again
    assert cache.add_sequence("probe", PROMPTS[2]) == 32  # two full blocks of the prompt are cached
    cache.free("probe")
    assert fourbit.generate(smollm, [PROMPTS[2]], max_new_tokens=5, cache=cache) == first


def test_stop_tokens_and_limits(smollm):
    free_run = fourbit.generate(smollm, [PROMPTS[0]], max_new_tokens=6)[0]
    stopped = fourbit.generate(smollm, [PROMPTS[0]], max_new_tokens=6, stop_tokens=[free_run[2]])[0]
    assert stopped == free_run[:2]
    assert fourbit.generate(smollm, [PROMPTS[0]], max_new_tokens=0) == [[]]


def test_seeded_sampling_is_reproducible(smollm):
    run = lambda seed: fourbit.generate(smollm, PROMPTS[:2], max_new_tokens=10, temperature=1.0, top_k=50,
                                        top_p=0.95, seed=seed)
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_sample_respects_top_k_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits[:3], 0.0, 0, 1.0, g), torch.tensor([1, 1, 1]))
    assert set(sample(logits, 1.0, 2, 1.0, g).tolist()) == {1, 3}       # the two largest
    probs = logits[0].softmax(-1)                                           # 0.64 0.24 ...: top_p 0.8 keeps 2
    assert probs[1] < 0.8 < probs[1] + probs[3]
    assert set(sample(logits, 1.0, 0, 0.8, g).tolist()) == {1, 3}
    counts = torch.bincount(sample(logits, 1.0, 0, 1.0, g), minlength=5).float() / 4000
    assert torch.allclose(counts, probs, atol=0.03)                        # plain sampling follows softmax


def test_bad_prompts_raise(smollm):
    with pytest.raises(ValueError, match="non-empty list"):
        fourbit.generate(smollm, [], 4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        fourbit.generate(smollm, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="outside"):
        fourbit.generate(smollm, [[1, 10**6]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        fourbit.generate(smollm, [[1, 2]], -1)
