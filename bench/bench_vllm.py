"""vLLM generation throughput on the CPU: fourbit's int4 method against vLLM's own paths, on one
model, in one run.

    .vllm-venv/bin/python bench/bench_vllm.py [--json out.json] [--compiled]

Runs in the vLLM venv (make vllm-venv), not under pytest (it has no tests; bench-smoke collects
it and finds none). The model is SmolLM2-135M (the embedded GGUF, dequantized to bf16), and
from those bf16 weights one int4 model: symmetric round-to-nearest at group size 32 (scales in
bf16), which compressed-tensors holds exactly too. The providers, each a fresh vLLM engine:

    vllm-fp32, vllm-bf16      vLLM on the float weights (its dense CPU GEMM)
    fourbit-fp32/-bf16        vLLM + quantization "fourbit": fourbit's C++ int4 kernel
    vllm-w4a16-bf16           vLLM's own CPU W4A16 kernel (compressed-tensors pack-quantized ->
                              cpu_gemm_wna16) on the same int4 weights, bf16 activations

Throughput is generated tokens per second of wall time for one llm.generate call, greedy,
EOS ignored: batch 1 (one prompt of PROMPT_LEN tokens, DECODE_1 new ones: decode-bound) and
batch 16 (16 such prompts, DECODE_16 new each), after a warm-up call. Engines run eagerly
(enforce_eager) unless --compiled: vLLM's default torch.compile mode costs minutes of
compilation per engine on 2 cores. The lm_head (tied to the 49152 x 576 embeddings, a fifth
of the weights) stays float in every provider.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

PROMPT_LEN, DECODE_1, DECODE_16 = 32, 64, 32


def build(workdir: Path) -> dict[str, Path]:
    """The float, fourbit and compressed-tensors folders of one model (same int4 weights)."""
    import torch

    import fourbit
    from fourbit.integrations.vllm import save_pretrained

    model = fourbit.load_model("smollm2-135m", device="cpu", dtype=torch.bfloat16, quantize=False)
    dirs = {"float": save_pretrained(model, workdir / "float")}
    fourbit.quantize_(model, group_size=32, symmetric=True)
    dirs["fourbit"] = save_pretrained(model, workdir / "fourbit")
    dirs["compressed-tensors"] = fourbit.save_model(model, workdir / "compressed-tensors", format="compressed-tensors")
    return dirs


def generate(llm, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    """(generated tokens per second, the tokens) of one greedy llm.generate call."""
    from vllm.inputs import TokensPrompt

    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in out) / elapsed, [list(o.outputs[0].token_ids) for o in out]


def run(directory: Path, dtype: str, compiled: bool, prompts_1, prompts_16) -> dict:
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(model=str(directory), dtype=dtype, enforce_eager=not compiled, max_model_len=256, max_num_seqs=16,
              skip_tokenizer_init=True, seed=0)
    startup = time.perf_counter() - start
    try:
        generate(llm, prompts_1, 8)  # warm-up
        tps_1, tokens_1 = generate(llm, prompts_1, DECODE_1)
        tps_16, _ = generate(llm, prompts_16, DECODE_16)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return {"startup_s": round(startup, 1), "batch1_tok_s": round(tps_1, 2), "batch16_tok_s": round(tps_16, 2),
            "batch1_tokens": tokens_1[0][:16]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--compiled", action="store_true", help="vLLM's torch.compile mode instead of eager")
    parser.add_argument("--only", nargs="*", help="run only these providers")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import torch

    import vllm

    generator = torch.Generator().manual_seed(0)
    prompts_16 = [torch.randint(100, 40000, (PROMPT_LEN,), generator=generator).tolist() for _ in range(16)]
    prompts_1 = prompts_16[:1]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = build(Path(tmp))
        providers = {
            "vllm-fp32": (dirs["float"], "float32"),
            "vllm-bf16": (dirs["float"], "bfloat16"),
            "fourbit-fp32": (dirs["fourbit"], "float32"),
            "fourbit-bf16": (dirs["fourbit"], "bfloat16"),
            "vllm-w4a16-bf16": (dirs["compressed-tensors"], "bfloat16"),
        }
        results = {}
        for name, (directory, dtype) in providers.items():
            if args.only and name not in args.only:
                continue
            results[name] = run(directory, dtype, args.compiled, prompts_1, prompts_16)
            print(name, results[name], flush=True)

    base = results.get("vllm-bf16")
    mode = "compiled" if args.compiled else "eager"
    print(f"\nvLLM {vllm.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {mode}; SmolLM2-135M, prompt {PROMPT_LEN} tokens")
    print("| provider | batch 1 tok/s | batch 16 tok/s | vs vllm-bf16 (1 / 16) | startup s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        ratio = (f"{r['batch1_tok_s'] / base['batch1_tok_s']:.2f}x / {r['batch16_tok_s'] / base['batch16_tok_s']:.2f}x"
                 if base else "-")
        print(f"| {name} | {r['batch1_tok_s']:.1f} | {r['batch16_tok_s']:.1f} | {ratio} | {r['startup_s']} |")
    if args.json:
        args.json.write_text(json.dumps({"vllm": vllm.__version__, "torch": torch.__version__,
                                         "compiled": args.compiled, "results": results}, indent=1))


if __name__ == "__main__":
    main()
