"""End-to-end decode speed (tokens per second per sequence) of int4 models against float ones,
and the memory of a 7B model quantized layer by layer.

    pytest bench/bench_model.py --benchmark-only --benchmark-json=out.json      # fast cases
    pytest bench/bench_model.py --benchmark-only -m slow ...                    # Llama-2-7B

Providers: "float" (the baseline: the same model with float weights, fp32 on the CPU and
fp16 on a GPU), "int4" (fourbit's Int4Linear layers), on the CPU "int4-compiled" (the same,
decoding through generate(..., compile=True): the decode step under torch.compile; the
first call's compile time is recorded as compile_s), and on a GPU "hf" (Hugging Face
transformers' generate on the same architecture in fp16). Decode rate: (time for 65 new
tokens - time for 1) / 64, so the prefill cancels out. Every case records torch's threads.
"""

from __future__ import annotations

import os
import resource
import time

import pytest
import torch

import fourbit
from fourbit.evaluate import decode_tokens_per_second
from fourbit.generate import compile_stats
from fourbit.models.llama import CONFIGS
from fourbit.models.loader import build_model
from fourbit.models.random_weights import RandomCheckpoint
from timing import DEVICE, SMOKE, record

FLOAT = torch.float16 if DEVICE.type == "cuda" else torch.float32
PROMPT = [1] + list(range(300, 331))  # 32 tokens
NEW_TOKENS = 4 if SMOKE else 64


def weight_bytes(model) -> int:
    """Bytes of every weight a decode step reads (parameters and int4 buffers, once each)."""
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def rss_gb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def smollm(provider: str):
    if provider == "float":
        return fourbit.load_model("smollm2-135m", device=DEVICE, dtype=FLOAT, quantize=False)
    return fourbit.load_model("smollm2-135m", device=DEVICE, dtype=FLOAT)  # its Q4_1 layers as int4


def llama_7b(provider: str):
    checkpoint = RandomCheckpoint(CONFIGS["llama-2-7b"], device=DEVICE)
    if provider == "hf":
        import transformers
        config = transformers.LlamaConfig(**{k: v for k, v in CONFIGS["llama-2-7b"].to_hf().items()
                                             if k not in ("model_type", "architectures")})
        with torch.device(DEVICE):
            return transformers.LlamaForCausalLM(config).to(FLOAT).eval()
    return build_model(checkpoint, DEVICE, FLOAT, quantize=dict(group_size=128) if provider == "int4" else None)


def hf_tokens_per_second(model, batch: int) -> float:
    """transformers' generate, timed as decode_tokens_per_second times fourbit's."""
    ids = torch.tensor([PROMPT] * batch, device=DEVICE)

    def run(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start
    run(4)
    return NEW_TOKENS / (run(1 + NEW_TOKENS) - run(1))


def decode_case(benchmark, model_name: str, build, provider: str, batch: int):
    holder = {}

    def measure():
        model = build(provider.removesuffix("-compiled"))
        holder["bytes"] = weight_bytes(model)
        if provider == "hf":
            holder["tok_s"] = hf_tokens_per_second(model, batch)
        else:
            holder["tok_s"] = decode_tokens_per_second(model, PROMPT, NEW_TOKENS, repeats=1 if SMOKE else 3,
                                                       batch=batch, compile=provider.endswith("-compiled"))
            holder["compile_s"] = sum(compile_stats(model)["compile_seconds"].values())
    benchmark.pedantic(measure, rounds=1, iterations=1)
    us = 1e6 / holder["tok_s"]
    record(benchmark, "decode", provider, us, holder["bytes"], dict(model=model_name, batch=batch,
                                                                   dtype=str(FLOAT).split(".")[-1]),
           baseline="float", tokens_per_s=holder["tok_s"], weight_bytes=holder["bytes"],
           threads=torch.get_num_threads(), compile_s=holder.get("compile_s", 0.0))


@pytest.mark.parametrize("provider", ["float", "int4"] + (["int4-compiled"] if DEVICE.type == "cpu" else []))
def test_smollm2_decode(benchmark, provider):
    try:
        fourbit.models.resolve_source("smollm2-135m")
    except FileNotFoundError as error:
        pytest.skip(str(error))
    decode_case(benchmark, "smollm2-135m", smollm, provider, 1)


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type != "cuda", reason="the 7B decode comparison runs on a GPU")
@pytest.mark.parametrize("provider", ["float", "int4", "hf"])
@pytest.mark.parametrize("batch", [1, 16])
def test_llama2_7b_decode_on_gpu(benchmark, batch, provider):
    decode_case(benchmark, "llama-2-7b (random weights)", llama_7b, provider, batch)


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type != "cpu", reason="the 24 GB CPU machine's memory check")
def test_llama2_7b_int4_fits_on_the_cpu(benchmark):
    """Build Llama-2-7B from random weights one layer at a time, quantizing each linear layer
    as it is made (the float model never exists whole), then decode a few tokens."""
    holder = {}

    def build_and_decode():
        before = rss_gb()
        start = time.perf_counter()
        model = build_model(RandomCheckpoint(CONFIGS["llama-2-7b"]), "cpu", torch.bfloat16,
                            quantize=dict(group_size=128))
        holder.update(build_s=time.perf_counter() - start, rss_gb=rss_gb() - before, model=model)
        holder["tok_s"] = decode_tokens_per_second(model, PROMPT, 4, repeats=1)
    benchmark.pedantic(build_and_decode, rounds=1, iterations=1)
    model = holder.pop("model")
    params = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, fourbit.Int4Linear))
    record(benchmark, "model_memory", "int4", 1e6 / holder["tok_s"], weight_bytes(model),
           dict(model="llama-2-7b (random weights)", batch=1, dtype="bfloat16"), baseline="float",
           tokens_per_s=holder["tok_s"], weight_gb=weight_bytes(model) / 1e9, rss_gb=holder["rss_gb"],
           peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, build_s=holder["build_s"],
           fp16_weight_gb=2 * params / 1e9)
