"""vLLM serves fourbit checkpoints (quantization "fourbit") and agrees with fourbit.

What is compared, in fp32 on the CPU, greedy, EOS ignored:
- vLLM + fourbit vs fourbit.generate on the same weights: the same int4 kernel runs every
  linear layer, the rest (attention, norms, rotary) is vLLM's own: tokens equal, and the
  log-probability of each generated token within LOGPROB_ATOL of fourbit's plain forward.
- vLLM + fourbit vs vLLM on the same weights dequantized (a float folder, vLLM's dense fp32
  matmul): the weights are equal numbers, only the order of the fp32 sums differs: tokens
  equal, log-probabilities within LOGPROB_ATOL.
- a batch of prompts of different lengths vs each prompt alone: tokens equal.
- tensor_parallel_size=2 vs 1 (a tiny random Llama, act-order layers included): tokens equal,
  log-probabilities within LOGPROB_ATOL (the all-reduce sums in another order).
- a model whose row-parallel K cannot split on group boundaries fails at startup, naming it.
- in bf16 (vLLM's default dtype on the CPU; on a CPU with AMX its attention runs AMX tiles,
  which died of SIGILL before fourbit asked Linux for them): the tiny Llama agrees with
  fourbit's own bf16 model (conftest.assert_agrees_in_bf16).
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

import fourbit
from conftest import TINY, assert_agrees_in_bf16, fourbit_logprobs, greedy, serve
from fourbit.integrations.vllm import save_pretrained
from fourbit.models.llama import LlamaConfig
from fourbit.models.loader import build_model
from fourbit.models.random_weights import RandomCheckpoint

NEW_TOKENS = 24
# fp32 logits computed in different summation orders differ by about 1e-5; 1e-3 leaves room
# and still catches any wrong weight (one wrong group moves them by far more).
LOGPROB_ATOL = 1e-3


@pytest.fixture(scope="module")
def smollm_vllm(smollm_int4_dir, smollm_prompts):
    """One engine on the int4 SmolLM2: the batch, then each prompt alone."""
    with serve(smollm_int4_dir, quantization="fourbit") as llm:
        batch = greedy(llm, smollm_prompts, NEW_TOKENS)
        alone = [greedy(llm, [p], NEW_TOKENS) for p in smollm_prompts]
    return batch, [(t[0], lp[0]) for t, lp in alone]


def test_smollm_equals_fourbit_generate(smollm, smollm_prompts, smollm_vllm):
    (tokens, logprobs), _ = smollm_vllm
    assert tokens == fourbit.generate(smollm, smollm_prompts, NEW_TOKENS)
    for prompt, seq, lps in zip(smollm_prompts, tokens, logprobs):
        assert fourbit_logprobs(smollm, prompt, seq) == pytest.approx(lps, abs=LOGPROB_ATOL)


def test_smollm_batch_equals_one_at_a_time(smollm_prompts, smollm_vllm):
    (tokens, logprobs), alone = smollm_vllm
    assert len({len(p) for p in smollm_prompts}) > 1
    assert tokens == [t for t, _ in alone]
    for lps, (_, lps_alone) in zip(logprobs, alone):
        assert lps == pytest.approx(lps_alone, abs=LOGPROB_ATOL)


def test_smollm_equals_vllm_on_the_dequantized_weights(smollm_float_dir, smollm_prompts, smollm_vllm):
    (tokens, logprobs), _ = smollm_vllm
    with serve(smollm_float_dir) as llm:  # no quantization_config: vLLM's own float path
        float_tokens, float_logprobs = greedy(llm, smollm_prompts, NEW_TOKENS)
    assert tokens == float_tokens
    for lps, float_lps in zip(logprobs, float_logprobs):
        assert lps == pytest.approx(float_lps, abs=LOGPROB_ATOL)


@pytest.fixture(scope="module")
def tiny_prompts():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, TINY.vocab_size, (n,), generator=generator).tolist() for n in (5, 17, 9)]


@pytest.fixture(scope="module")
def tiny_tp1(tiny_dir, tiny_prompts):
    with serve(tiny_dir) as llm:  # quant_method "fourbit" from config.json
        return greedy(llm, tiny_prompts, 16)


def test_tiny_act_order_equals_fourbit_generate(tiny, tiny_prompts, tiny_tp1):
    tokens, logprobs = tiny_tp1
    assert tokens == fourbit.generate(tiny, tiny_prompts, 16)
    for prompt, seq, lps in zip(tiny_prompts, tokens, logprobs):
        assert fourbit_logprobs(tiny, prompt, seq) == pytest.approx(lps, abs=LOGPROB_ATOL)


def test_tiny_act_order_bf16_agrees_with_fourbit_bf16(tiny, tiny_dir, tiny_prompts):
    with serve(tiny_dir, dtype="bfloat16") as llm:
        tokens, logprobs = greedy(llm, tiny_prompts, 16)
    assert_agrees_in_bf16(copy.deepcopy(tiny).to(torch.bfloat16), tiny_prompts, tokens, logprobs)


TP2_ENV = dict(VLLM_CPU_OMP_THREADS_BIND="0|1")


def test_tensor_parallel_2_equals_1(tiny_dir, tiny_prompts, tiny_tp1, monkeypatch):
    for key, value in TP2_ENV.items():
        monkeypatch.setenv(key, value)
    with serve(tiny_dir, tensor_parallel_size=2, distributed_executor_backend="mp") as llm:
        tokens, logprobs = greedy(llm, tiny_prompts, 16)
    assert tokens == tiny_tp1[0]
    for lps, lps_tp1 in zip(logprobs, tiny_tp1[1]):
        assert lps == pytest.approx(lps_tp1, abs=LOGPROB_ATOL)


START_UNSPLITTABLE = """
import sys
sys.path.insert(0, {tests!r})
from conftest import serve
if __name__ == "__main__":
    with serve({directory!r}, tensor_parallel_size=2, distributed_executor_backend="mp"):
        pass
"""


def test_tensor_parallel_refuses_a_shard_that_splits_a_group(tmp_path):
    # down_proj has K = intermediate_size = 320: two shards of 160, not whole groups of 64.
    config = LlamaConfig(**{**TINY.__dict__, "intermediate_size": 320})
    model = build_model(RandomCheckpoint(config), "cpu", torch.float32, quantize=dict(group_size=64))
    directory = save_pretrained(model, tmp_path / "unsplittable")
    script = tmp_path / "start.py"
    script.write_text(START_UNSPLITTABLE.format(tests=os.path.dirname(__file__), directory=str(directory)))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **TP2_ENV})
    assert run.returncode != 0
    assert ("model.layers.0.mlp.down_proj: tensor parallelism splits its K = 320 input channels into 2 shards of "
            "160, not a multiple of group_size 64") in run.stdout + run.stderr
