"""vLLM peer tests (make vllm-test): fourbit's quantization method inside vLLM 0.32 on the CPU.

They run in the vLLM venv (.vllm-venv, make vllm-venv), never in `make test`. pytest runs
them with --confcutdir=tests/vllm, so tests/conftest.py (TRITON_INTERPRET=1, for fourbit's
own suite) is not loaded. Every vLLM engine runs offline, in eager mode, on few tokens.
"""

import contextlib
import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine: the models are tiny
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import fourbit  # noqa: E402
from fourbit.integrations.vllm import save_pretrained  # noqa: E402
from fourbit.models.llama import LlamaConfig  # noqa: E402
from fourbit.models.loader import build_model  # noqa: E402
from fourbit.models.random_weights import RandomCheckpoint  # noqa: E402

# A Llama whose head counts divide by 2 (tensor_parallel_size=2), all sizes multiples of 64.
TINY = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="session")
def smollm():
    """fourbit's SmolLM2-135M (the embedded Q4_1 GGUF: its int4 layers at group size 32), fp32."""
    return fourbit.load_model("smollm2-135m", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm_prompts():
    """Prompts of different lengths, as token ids (the engines run without a tokenizer)."""
    tokenizer = fourbit.load_tokenizer("smollm2-135m")
    texts = ["The capital of France is", "def fibonacci(n):",
             "Once upon a time, in a small village at the edge of a great forest, there lived",
             "Water boils at", "List three colors: red,"]
    return [tokenizer.encode(t) for t in texts]


@pytest.fixture(scope="session")
def smollm_int4_dir(smollm, tmp_path_factory):
    return save_pretrained(smollm, tmp_path_factory.mktemp("smollm-int4"))


@pytest.fixture(scope="session")
def smollm_float_dir(tmp_path_factory):
    """The same weights dequantized (exactly, in fp32): a plain float Hugging Face folder."""
    model = fourbit.load_model("smollm2-135m", device="cpu", dtype=torch.float32, quantize=False)
    return save_pretrained(model, tmp_path_factory.mktemp("smollm-float"))


@pytest.fixture(scope="session")
def tiny():
    """A random tiny Llama quantized by fourbit (RTN, group size 64), act-order on the
    column-parallel layers (q/k/v and gate/up: one perm per fused layer, which tensor
    parallelism keeps whole)."""
    model = build_model(RandomCheckpoint(TINY, seed=3), "cpu", torch.float32, quantize=dict(group_size=64))
    generator = torch.Generator().manual_seed(0)
    for block in model.layers:
        for layer in (block.self_attn.qkv_proj, block.mlp.gate_up_proj):
            weight = layer.weight
            weight.perm = torch.randperm(weight.shape[1], generator=generator).to(torch.int32)
            layer.load_weight(weight)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tiny, tmp_path_factory):
    return save_pretrained(tiny, tmp_path_factory.mktemp("tiny-int4"))


@contextlib.contextmanager
def serve(directory, **options):
    """A vLLM engine on directory (eager, no tokenizer), shut down after."""
    from vllm import LLM

    options = dict(dict(enforce_eager=True, dtype="float32", max_model_len=256, max_num_seqs=8,
                        skip_tokenizer_init=True), **options)
    llm = LLM(model=str(directory), **options)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def greedy(llm, prompts, max_tokens: int):
    """(tokens, logprobs of those tokens) per prompt: greedy, without stopping at EOS."""
    from vllm.inputs import TokensPrompt

    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[step[t].logprob for t, step in zip(seq, o.outputs[0].logprobs)] for seq, o in zip(tokens, outputs)]
    return tokens, logprobs


@torch.inference_mode()
def fourbit_logprobs(model, prompt, tokens) -> list[float]:
    """fourbit's log-probabilities of `tokens` following `prompt` (one plain causal forward)."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    logits = model(ids)[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()


# bf16, the dtype vLLM picks on the CPU by default: vLLM's attention (its AMX kernel where the
# CPU has AMX), norms and sums round differently from fourbit's, so on the random tiny Llama
# greedy tokens part at near ties after a few steps (either way: vLLM's bf16 tokens differ from
# fourbit's fp32 ones too). Compared instead, for vLLM's tokens: fourbit's own bf16 forward's
# log-probabilities within BF16_LOGPROB_ATOL of vLLM's (measured: up to 0.012), and each token
# within BF16_LOGPROB_ATOL of fourbit's most likely one (measured: up to 0.004).
BF16_LOGPROB_ATOL = 0.05


@torch.inference_mode()
def assert_agrees_in_bf16(model, prompts, tokens, logprobs) -> None:
    """vLLM's greedy (tokens, logprobs) in bf16 agree with fourbit's bf16 model, as above."""
    for prompt, seq, lps in zip(prompts, tokens, logprobs):
        assert len(seq) == len(lps) > 0
        ids = torch.tensor([list(prompt) + list(seq)])
        logp = model(ids)[0, len(prompt) - 1:-1].float().log_softmax(-1)
        ours = logp.gather(-1, torch.tensor(seq)[:, None])[:, 0]
        assert ours.tolist() == pytest.approx(lps, abs=BF16_LOGPROB_ATOL)
        assert float((logp.max(-1).values - ours).max()) <= BF16_LOGPROB_ATOL
