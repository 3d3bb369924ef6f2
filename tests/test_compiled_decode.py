"""generate(..., compile=True): the decode step under torch.compile (inductor's CPU backend)
gives the eager step's logits, K/V writes and tokens, on fresh random weights and on the
embedded model; a compile that fails falls back to eager decoding with a warning."""

import pytest
import torch

import fourbit
from fourbit.generate import _CompiledDecode, compile_stats, model_signature
from fourbit.models import PagedContext
from helpers import relative_error


def _random_llama(seed: int, **config):
    from fourbit.models.loader import build_model
    from fourbit.models.random_weights import RandomCheckpoint
    config = fourbit.models.LlamaConfig(**{**dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=3,
                                                  num_heads=4, num_kv_heads=2), **config})
    return build_model(RandomCheckpoint(config, seed=seed), "cpu", torch.float32, dict(group_size=32))


@pytest.fixture(scope="module")
def tiny():
    return _random_llama(seed=int(torch.randint(1 << 30, ())))


def _prefilled(model, prompts, num_blocks=32, block_size=8):
    """A cache (pages holding noise, then the prompts' K/V) and each prompt's next position."""
    config = model.config
    cache = fourbit.PagedKVCache(config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim,
                                 torch.float32)
    cache.kv.normal_()
    names = list(range(len(prompts)))
    for name in names:
        cache.add_sequence(name)
    with torch.inference_mode():
        step = cache.plan(names, prompts)
        positions = torch.cat([torch.arange(len(p)) for p in prompts])
        model(torch.tensor([t for p in prompts for t in p]), positions, PagedContext(cache, step))
    return cache, names


@pytest.mark.parametrize("batch", [1, 3], ids=["batch-1", "batch-3-padded-to-4"])
def test_a_compiled_step_gives_the_eager_logits_and_cache(tiny, batch):
    """One decode step, compiled and eager, from the same cache: the same logits and the same
    K/V written (a graph that dropped or misplaced a write fails both). Batch 3 runs in the
    bucket of 4 with a padding row, which must write nothing."""
    prompts = [torch.randint(0, 96, (n,)).tolist() for n in (11, 5, 17)[:batch]]
    cache, names = _prefilled(tiny, prompts)
    tokens = torch.randint(0, 96, (batch,))
    with torch.inference_mode():
        step = cache.plan(names, [[t] for t in tokens.tolist()])
        positions = (step.seq_lens - 1).long()
        before = cache.kv.clone()
        decode = _CompiledDecode()
        compiled = decode.run(tiny, cache, tokens, positions, step, "auto", decode.variant(tiny))
        after_compiled = cache.kv.clone()
        cache.kv.copy_(before)
        eager = tiny(tokens, positions, PagedContext(cache, step))
    assert compiled.shape == eager.shape == (batch, 96)
    assert relative_error(compiled, eager) < 1e-5
    assert not torch.equal(after_compiled, before)      # the step wrote its K/V ...
    assert torch.allclose(after_compiled, cache.kv, rtol=1e-5, atol=1e-6)  # ... where eager writes them


def test_compiled_generate_gives_the_eager_tokens(tiny):
    """Prompts of different lengths, batched and alone, greedy: the same tokens compiled and
    eager; each batch size compiles once (its bucket), later calls reuse the graph."""
    prompts = [torch.randint(0, 96, (n,)).tolist() for n in (9, 2, 20)]
    for batch in (prompts, prompts[:1]):
        eager = fourbit.generate(tiny, batch, max_new_tokens=12, block_size=8)
        compiled = fourbit.generate(tiny, batch, max_new_tokens=12, block_size=8, compile=True)
        assert compiled == eager and all(len(out) == 12 for out in compiled)
    stats = compile_stats(tiny)
    assert stats["error"] is None and stats["threads"] == torch.get_num_threads()
    buckets = sorted(key[0] for key in stats["compile_seconds"])
    assert buckets == [1, 4], stats
    fourbit.generate(tiny, prompts[:1], max_new_tokens=12, block_size=8, compile=True)
    assert len(compile_stats(tiny)["compile_seconds"]) == 2   # no new graph for a call like an earlier one


@pytest.mark.skipif("cpu-a8" not in fourbit.available_backends("cpu"), reason="needs the cpu-a8 kernel")
def test_switching_layer_backends_compiles_another_graph():
    """Int4Linear layers moved to another backend between calls (here W4A16 -> W4A8 -> back):
    each setting gets its own graph, compiled under the raised limit (not dynamo's default 8
    across many buckets), with no fallback to eager; its tokens are that setting's eager ones."""
    model = _random_llama(seed=5)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    for backend in ("auto", "cpu-a8", "auto", "cpu-a8"):
        for module in model.modules():
            if isinstance(module, fourbit.Int4Linear):
                module.backend = backend
        for batch in (prompts, prompts[:1], prompts * 4):  # buckets 2, 1, 8
            eager = fourbit.generate(model, batch, max_new_tokens=5, block_size=8)
            assert fourbit.generate(model, batch, max_new_tokens=5, block_size=8, compile=True) == eager
    stats = compile_stats(model)
    assert stats["error"] is None and len(stats["compile_seconds"]) == 6, stats


def _halve_output(module, args, output):
    return output * 0.5


def _eps(model):
    model.layers[1].post_attention_layernorm.eps = 0.25


def _hook(model):
    model.layers[0].mlp.register_forward_hook(_halve_output)


def _strided_weight(model):  # the same shape, every other element of a longer tensor
    norm = model.layers[2].input_layernorm
    norm.weight = torch.nn.Parameter(torch.randn(2 * norm.weight.numel())[::2])


def _float_layer(model):  # an int4 layer swapped for the float layer of its dequantized weight
    attention = model.layers[0].self_attn
    int4 = attention.o_proj
    dense = torch.nn.Linear(int4.in_features, int4.out_features, bias=False)
    with torch.no_grad():
        dense.weight.copy_(int4.weight.dequantize())
    attention.o_proj = dense


@pytest.mark.parametrize("change", [_eps, _hook, _strided_weight, _float_layer],
                         ids=["norm-eps", "forward-hook", "strided-weight", "module-swapped"])
def test_a_model_changed_between_calls_gets_its_own_graph(change):
    """The compiled step runs without dynamo's guards on the model's modules; model_signature,
    taken at each generate call, stands in for them. A change a graph is specialized to (an
    attribute, a hook, a weight's strides, a module's type) makes another graph, whose tokens
    are the changed model's eager ones (a stale graph would give the old model's tokens, or
    read a strided weight as contiguous)."""
    model = _random_llama(seed=11)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3]]
    assert fourbit.generate(model, prompts, 8, block_size=8, compile=True) == fourbit.generate(model, prompts, 8,
                                                                                               block_size=8)
    before = model_signature(model)
    change(model)
    assert model_signature(model) != before
    eager = fourbit.generate(model, prompts, 8, block_size=8)
    assert fourbit.generate(model, prompts, 8, block_size=8, compile=True) == eager
    variants = {key[-1] for key in compile_stats(model)["compile_seconds"]}
    assert variants == {0, 1}


def test_new_weight_values_reuse_the_graph():
    """Weights are inputs of the graph, not constants in it: new values of the same shape and
    layout (load_state_dict, in place) give the new model's tokens from the same graph."""
    model = _random_llama(seed=12)
    prompts = [[7, 7, 1, 2]]
    fourbit.generate(model, prompts, 6, block_size=8, compile=True)
    other = _random_llama(seed=13)
    model.load_state_dict(other.state_dict())
    assert fourbit.generate(model, prompts, 6, block_size=8, compile=True) == fourbit.generate(other, prompts, 6,
                                                                                               block_size=8)
    assert len(compile_stats(model)["compile_seconds"]) == 1


def test_a_compile_that_fails_falls_back_to_eager(monkeypatch):
    """A model the compiler cannot take whole (a graph break in a layer; fullgraph refuses
    it): generate warns, decodes eagerly with the same tokens, and does not try again."""
    model = _random_llama(seed=3)
    prompts = [[5, 6, 7, 8], [9]]
    eager = fourbit.generate(model, prompts, max_new_tokens=6, block_size=8)
    forward = type(model.layers[1]).forward

    def breaking(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(model.layers[1], "forward", breaking.__get__(model.layers[1]))
    with pytest.warns(UserWarning, match="torch.compile of the decode step failed"):
        out = fourbit.generate(model, prompts, max_new_tokens=6, block_size=8, compile=True)
    assert out == eager
    assert compile_stats(model)["error"] is not None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, no second warning
        assert fourbit.generate(model, prompts, max_new_tokens=6, block_size=8, compile=True) == eager


def test_compile_must_be_a_bool(tiny):
    with pytest.raises(TypeError, match="compile must be True or False"):
        fourbit.generate(tiny, [[1, 2]], max_new_tokens=2, compile="yes")


def test_compiled_generate_on_the_embedded_model(smollm):
    """SmolLM2-135M's Q4_1 layers on the CPU kernels: the same greedy tokens compiled and
    eager, and the same last-step logits."""
    prompt = [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198]
    eager = fourbit.generate(smollm, [prompt], max_new_tokens=16)[0]
    compiled = fourbit.generate(smollm, [prompt], max_new_tokens=16, compile=True)[0]
    assert compiled == eager
    cache, names = _prefilled(smollm, [prompt + eager[:-1]], num_blocks=16, block_size=16)
    with torch.inference_mode():
        step = cache.plan(names, [[eager[-1]]])
        positions = (step.seq_lens - 1).long()
        before = cache.kv.clone()
        decode = _CompiledDecode()
        out = decode.run(smollm, cache, torch.tensor([eager[-1]]), positions, step, "auto", decode.variant(smollm))
        cache.kv.copy_(before)
        ref = smollm(torch.tensor([eager[-1]]), positions, PagedContext(cache, step))
    assert relative_error(out, ref) < 1e-5
    assert compile_stats(smollm)["error"] is None
