"""Generation over the paged KV cache: the paged forward against the plain causal forward,
batching, chunked prefill, prefix reuse, sampling, stopping, and bad input."""

import contextlib
import sys
from pathlib import Path

import fourbit.kernels
import pytest
import torch

import fourbit
from conftest import need
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
            step = cache.plan(names, [chunks[n] for n in names])
            positions = torch.cat([torch.arange(done[n], done[n] + len(chunks[n])) for n in names])
            starts = step.query_start_loc
            context = PagedContext(cache, step)
            logits = smollm(torch.tensor([t for n in names for t in chunks[n]]), positions, context)
            for i, n in enumerate(names):
                rows = plain[n][done[n]:done[n] + len(chunks[n])]
                assert relative_error(logits[starts[i]:starts[i + 1]], rows) < 1e-4
                done[n] += len(chunks[n])
        for _ in range(2):
            names = list(seqs)
            batch = cache.plan(names, [[seqs[n][done[n]]] for n in names])
            assert batch.decode
            context = PagedContext(cache, batch)
            logits = smollm(torch.tensor([seqs[n][done[n]] for n in names]), (batch.seq_lens - 1).long(), context)
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



# ---- plan once per step, run per layer: no layer reads the device back ----

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def host_reads_from_fourbit():
    """Record every Tensor.item / tolist / cpu / numpy / bool() / int() / float() / index
    called from fourbit's own code (python/fourbit/, kernels/) while active: each is a
    device-to-host read, a synchronization on a GPU. Calls from torch or triton are not
    counted (Triton's CPU interpreter copies by design; on a GPU it does not run)."""
    roots = (str(Path(fourbit.__file__).parent), str(Path(fourbit.kernels.__file__).parent))
    calls, originals = [], {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def guard(name, method):
        def guarded(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(roots):
                calls.append(f"{name} at {caller}:{sys._getframe(1).f_lineno}")
            return method(self, *args, **kwargs)
        return guarded

    for name, method in originals.items():
        setattr(torch.Tensor, name, guard(name, method))
    try:
        yield calls
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def test_the_host_read_guard_sees_a_read():
    """The guard below would catch a layer that reads a tensor back (it is not blind)."""
    with host_reads_from_fourbit() as calls:
        fourbit.models.llama.rope_inv_freq(fourbit.models.llama.CONFIGS["smollm2-135m"])  # reads nothing
        assert calls == []
        fourbit.format.pack_int4(torch.zeros(2, 8, dtype=torch.int32))                    # reads min / max
    assert calls, "the guard missed pack_int4's host reads"


def _tiny_llama(seed: int = 0, **config):
    from fourbit.models.loader import build_model
    from fourbit.models.random_weights import RandomCheckpoint
    config = fourbit.models.LlamaConfig(**{**dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=3,
                                                  num_heads=4, num_kv_heads=2), **config})
    return build_model(RandomCheckpoint(config, seed=seed), "cpu", torch.float32, dict(group_size=32))


@pytest.mark.parametrize("attention", ["auto", "triton"])
def test_a_step_reads_nothing_back_in_any_layer(attention):
    """Plan once, run per layer: once a step's PagedBatch is planned, a whole paged forward
    (every layer's int4 matmuls, K/V writes and prefill or decode attention) makes no
    device-to-host read from fourbit's code, on the backends that run here: the CPU kernel
    and the reference ("auto"), and Triton's attention launchers through the interpreter.
    A per-layer validation or .max() (as before PagedBatch) fails this test."""
    need("cpu", "triton", "paged_attention") if attention == "triton" else None
    model = _tiny_llama()
    config = model.config
    cache = fourbit.PagedKVCache(config.num_layers, 8, 8, config.num_kv_heads, config.head_dim, torch.float32)
    prompts = {"a": list(range(1, 12)), "b": list(range(20, 25))}
    for name in prompts:
        cache.add_sequence(name)
    with torch.inference_mode():
        step = cache.plan(list(prompts), list(prompts.values()))
        positions = torch.cat([torch.arange(len(p)) for p in prompts.values()])
        ids = torch.tensor([t for p in prompts.values() for t in p])
        with host_reads_from_fourbit() as calls:
            model(ids, positions, PagedContext(cache, step, attention))
        assert calls == [], f"prefill read the device back: {calls}"
        step = cache.plan(list(prompts), [[3], [4]])
        positions = torch.tensor([len(p) for p in prompts.values()])
        with host_reads_from_fourbit() as calls:
            model(torch.tensor([3, 4]), positions, PagedContext(cache, step, attention))
        assert calls == [], f"decode read the device back: {calls}"


# ---- a failed generate leaves the cache as good as it found it ----

@pytest.fixture(scope="module")
def tiny():
    return _tiny_llama()


def tiny_cache(model, num_blocks=16, block_size=8):
    """A cache for the tiny model whose pages hold noise, not zeros: a page read before it is
    written shows up in the tokens."""
    config = model.config
    cache = fourbit.PagedKVCache(config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim,
                                 torch.float32)
    cache.kv.normal_(0.0, 10.0)
    return cache


def raise_on_call(layer, n):
    """A forward for layer that raises on its n-th call (after the layers before it ran)."""
    forward, calls = layer.forward, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError(f"injected failure in call {n}")
        return forward(*args, **kwargs)
    return failing


# prompt of 21 tokens, pages of 8, prefill chunks of 8: layer calls 1-3 are the prefill steps
# (1 and 2 each fill a page), call 4+k decodes the k-th new token; call 6 fills the third page.
@pytest.mark.parametrize("failing_call", [1, 2, 6], ids=["first-prefill-step", "second-prefill-step",
                                                          "decode-step-filling-a-page"])
def test_a_generate_that_raises_midway_poisons_no_later_one(tiny, monkeypatch, failing_call):
    """A layer raises inside a step (the layers before it wrote their K/V, the rest did not):
    afterwards the cache holds none of the call's sequences, and generating again on it (the
    same prompt, and the prompt continued past the page the failed step would have filled)
    gives exactly the tokens of a fresh cache, while the pages of the steps that did finish
    are still prefix-cache hits."""
    prompt = torch.randint(0, tiny.config.vocab_size, (21,)).tolist()
    run = lambda p, cache=None: fourbit.generate(tiny, [p], 8, block_size=8, prefill_chunk=8, cache=cache)[0]
    fresh = run(prompt)
    longer = prompt + fresh[:4]  # its first 24 tokens are the failed step's three pages
    fresh_longer = run(longer)
    cache = tiny_cache(tiny)
    with monkeypatch.context() as patch:
        patch.setattr(tiny.layers[1], "forward", raise_on_call(tiny.layers[1], failing_call))
        with pytest.raises(RuntimeError, match="injected"):
            run(prompt, cache)
    assert cache.num_free_blocks == cache.num_blocks and not cache._seqs
    committed_pages = min(failing_call - 1, 2)  # prefill steps that returned before the failure
    assert cache.add_sequence("probe", longer) == 8 * committed_pages
    cache.free("probe")
    assert run(prompt, cache) == fresh
    assert run(longer, cache) == fresh_longer
    assert cache.add_sequence("probe", longer) == 24  # the retries' pages are cached


def test_out_of_blocks_midway_then_a_retry_gives_a_fresh_caches_tokens(tiny):
    """Two prompts that outgrow the cache during decode: OutOfBlocks leaves no sequence
    behind, and each prompt generated again on that cache (now alone, it fits) gives the
    tokens of a fresh cache."""
    prompts = [torch.randint(0, tiny.config.vocab_size, (n,)).tolist() for n in (21, 13)]
    fresh = [fourbit.generate(tiny, [p], 8, block_size=8, prefill_chunk=8)[0] for p in prompts]
    cache = tiny_cache(tiny, num_blocks=6)  # the prompts take 5 pages; decoding both needs 7
    with pytest.raises(fourbit.OutOfBlocks):
        fourbit.generate(tiny, prompts, 8, prefill_chunk=8, cache=cache)
    assert cache.num_free_blocks == 6 and not cache._seqs
    assert [fourbit.generate(tiny, [p], 8, prefill_chunk=8, cache=cache)[0] for p in prompts] == fresh


def test_a_cache_serves_one_model(tiny):
    """K/V one model wrote are wrong for another of the same shape: a cache refuses a second
    model (and one of another geometry or dtype) with a ValueError naming the cache."""
    other = _tiny_llama(seed=1)
    prompt = torch.randint(0, 96, (20,)).tolist()
    cache = tiny_cache(tiny)
    fourbit.generate(tiny, [prompt], 4, cache=cache)
    with pytest.raises(ValueError, match="cache holds K/V written by another Llama"):
        fourbit.generate(other, [prompt], 4, cache=cache)
    assert fourbit.generate(tiny, [prompt], 4, cache=cache) == fourbit.generate(tiny, [prompt], 4)
    config = tiny.config
    for name, shape in (("num_layers", (2, 8, 8, 2, 16)), ("num_kv_heads", (3, 8, 8, 1, 16)),
                        ("head_dim", (3, 8, 8, 2, 8))):
        with pytest.raises(ValueError, match=f"cache has {name}"):
            fourbit.generate(tiny, [prompt], 4, cache=fourbit.PagedKVCache(*shape, dtype=torch.float32))
    wrong_dtype = fourbit.PagedKVCache(config.num_layers, 8, 8, config.num_kv_heads, config.head_dim, torch.float16)
    with pytest.raises(ValueError, match="cache has dtype"):
        fourbit.generate(tiny, [prompt], 4, cache=wrong_dtype)
    with pytest.raises(TypeError, match="cache must be a PagedKVCache"):
        fourbit.generate(tiny, [prompt], 4, cache=cache.kv)


# ---- arguments: what generate accepts, and a clear error naming each bad one ----

@pytest.mark.parametrize("form", ["int", "list", "tensor", "0-d tensor", "numpy"])
def test_stop_tokens_in_any_integer_form_stop(tiny, form):
    import numpy as np
    prompt = torch.randint(0, 96, (9,)).tolist()
    free_run = fourbit.generate(tiny, [prompt], 12)[0]
    i = max(i for i in range(len(free_run)) if free_run[i] not in free_run[:i])  # its first occurrence
    stop = free_run[i]
    given = {"int": stop, "list": [stop, 95], "tensor": torch.tensor([stop]), "0-d tensor": torch.tensor(stop),
             "numpy": np.array([stop])}[form]
    assert fourbit.generate(tiny, [prompt], 12, stop_tokens=given)[0] == free_run[:i]


def test_prompts_in_any_integer_form_give_the_same_tokens(tiny):
    import numpy as np
    prompts = [torch.randint(0, 96, (n,)).tolist() for n in (5, 11)]
    want = fourbit.generate(tiny, prompts, 4)
    assert fourbit.generate(tiny, tuple(torch.tensor(p) for p in prompts), 4) == want
    assert fourbit.generate(tiny, [np.array(p) for p in prompts], 4) == want
    assert fourbit.generate(tiny, [[np.int64(t) for t in p] for p in prompts], np.int64(4)) == want
    assert fourbit.generate(tiny, torch.tensor([prompts[0]] * 2), 4) == [want[0]] * 2
    assert fourbit.generate(tiny, prompts, 4, temperature=np.float32(0.0), top_k=np.int32(0)) == want


def test_a_prompt_must_fit_the_models_context():
    model = _tiny_llama(max_position_embeddings=24)
    prompt = torch.randint(0, 96, (20,)).tolist()
    assert len(fourbit.generate(model, [prompt], 4)[0]) == 4  # 24 positions: all of them
    with pytest.raises(ValueError, match=r"prompts\[0\] has 20 tokens and max_new_tokens is 5: 25 positions.*"
                                         "max_position_embeddings = 24"):
        fourbit.generate(model, [prompt], 5)
    with pytest.raises(ValueError, match=r"prompts\[1\] has 25 tokens"):
        fourbit.generate(model, [prompt, prompt + [1] * 5], 0)


BAD_ARGUMENTS = {
    # name: (keyword arguments over prompts=[[1, 2, 3]], max_new_tokens=4; the error; its message)
    "prompts-empty": (dict(prompts=[]), ValueError, "prompts must be a non-empty list"),
    "prompts-not-a-list": (dict(prompts={1: [1, 2]}), ValueError, "prompts must be a non-empty list"),
    "prompts-one-flat-prompt": (dict(prompts=[1, 2, 3]), TypeError, "prompts must be a list of prompts"),
    "prompts-an-empty-prompt": (dict(prompts=[[1, 2], []]), ValueError, r"prompts\[1\] is empty"),
    "prompts-id-outside-vocab": (dict(prompts=[[1, 96]]), ValueError, r"prompts\[0\] holds token ids outside"),
    "prompts-negative-id": (dict(prompts=[[-1, 2]]), ValueError, r"prompts\[0\] holds token ids outside"),
    "prompts-float-ids": (dict(prompts=[[1.0, 2.0]]), TypeError, r"prompts\[0\] must hold int token ids"),
    "prompts-float-tensor": (dict(prompts=[torch.tensor([1.0, 2.0])]), TypeError, r"prompts\[0\] must hold int"),
    "prompts-bool-ids": (dict(prompts=[[True, 2]]), TypeError, r"prompts\[0\] must hold int token ids"),
    "prompts-2d-prompt": (dict(prompts=[torch.ones(2, 3, dtype=torch.long)]), ValueError,
                          r"prompts\[0\] must be 1-D"),
    "prompts-text": (dict(prompts=["hello"]), TypeError, r"prompts\[0\] must be token ids, got a string"),
    "max_new_tokens-negative": (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be >= 0"),
    "max_new_tokens-float": (dict(max_new_tokens=4.0), TypeError, "max_new_tokens must be an int"),
    "max_new_tokens-bool": (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an int"),
    "temperature-negative": (dict(temperature=-0.5), ValueError, "temperature must be >= 0"),
    "temperature-nan": (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
    "temperature-inf": (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    "temperature-text": (dict(temperature="0.7"), TypeError, "temperature must be a real number"),
    "top_p-zero": (dict(temperature=1.0, top_p=0.0), ValueError, r"top_p must lie in \(0, 1\]"),
    "top_p-above-one": (dict(temperature=1.0, top_p=1.5), ValueError, r"top_p must lie in \(0, 1\]"),
    "top_p-nan": (dict(temperature=1.0, top_p=float("nan")), ValueError, "top_p must be finite"),
    "top_k-negative": (dict(temperature=1.0, top_k=-1), ValueError, "top_k must be >= 0"),
    "top_k-float": (dict(temperature=1.0, top_k=2.5), TypeError, "top_k must be an int"),
    "prefill_chunk-zero": (dict(prefill_chunk=0), ValueError, "prefill_chunk must be >= 1"),
    "prefill_chunk-float": (dict(prefill_chunk=8.0), TypeError, "prefill_chunk must be an int"),
    "seed-float": (dict(temperature=1.0, seed=1.5), TypeError, "seed must be an int"),
    "stop_tokens-text": (dict(stop_tokens="</s>"), TypeError, "stop_tokens must be token ids, got a string"),
    "stop_tokens-float": (dict(stop_tokens=[2.0]), TypeError, "stop_tokens must hold int token ids"),
    "stop_tokens-2d-tensor": (dict(stop_tokens=torch.ones(1, 2, dtype=torch.long)), ValueError,
                              "stop_tokens must be 1-D"),
    "stop_tokens-negative": (dict(stop_tokens=[-1]), ValueError, "stop_tokens must be non-negative"),
    "block_size-float": (dict(block_size=16.0), TypeError, "block_size must be an int"),
    "block_size-not-a-power-of-two": (dict(block_size=12), ValueError, "block_size must be a power of two"),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_a_bad_argument_raises_naming_it(tiny, name):
    kwargs, error, message = BAD_ARGUMENTS[name]
    kwargs = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=message):
        fourbit.generate(tiny, **kwargs)
