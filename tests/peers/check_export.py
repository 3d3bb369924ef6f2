"""fourbit's compressed-tensors export, loaded by the real tool: transformers with the
compressed-tensors package (not collected by pytest: a script, in two steps and two venvs).

    # 1. in fourbit's venv: tiny random Llamas quantized by fourbit, exported with
    #    fourbit.save_model(..., format="compressed-tensors"), and fourbit's fp32 logits of each
    .venv/bin/python tests/peers/check_export.py write .peers/export
    # 2. in a venv with transformers + compressed-tensors (the peer venv; fourbit not imported)
    .peers/venv/bin/python tests/peers/check_export.py check .peers/export

`write OUT` makes OUT/<case>/model/ (the exported directory) and OUT/<case>/fourbit.safetensors:
"prompt_ids" int64 [P, T], "logits" fp32 [P, T, vocab] (fourbit.load_model of the exported
directory in fp32, so fourbit reads its own export), "greedy" int64 [P, NEW_TOKENS]
(fourbit.generate, greedy, no stop tokens).

`check DIR [DIR ...]` takes case directories (or one folder of them) and, for each, loads
model/ with transformers' AutoModelForCausalLM in fp32 on the CPU, asserts that every layer the
config quantizes was taken by compressed-tensors (its module has a quantization_scheme) and the
ignored ones were not, that max |peer - fourbit| / max |fourbit| <= 1e-3 over the logits, and
that the peer's greedy continuations equal fourbit's. It exits non-zero if any case fails.
`check MODEL_DIR LOGITS_FILE` checks one exported directory against one logits file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

LOGITS_RTOL = 1e-3
NEW_TOKENS = 8
VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 512, 128, 384, 2, 4, 2

# case -> (model dtype, what to do with the int4 layers). "sym": fourbit RTN symmetric;
# "intzero": asymmetric with integer zero points (what a GPTQ / AWQ import holds), random z;
# "mixed": layer 1 at group 64 with integer zero points (two config groups); "rtn-asym": layer 1
# fourbit RTN asymmetric (a float minimum), exported float with dense_fallback=True.
CASES = {
    "sym-g32-bf16": dict(dtype="bfloat16", group_size=32, kind="sym"),
    "sym-g64-fp32-down-float": dict(dtype="float32", group_size=64, kind="sym", skip=["lm_head", "down_proj"]),
    "intzero-g128-fp16": dict(dtype="float16", group_size=128, kind="intzero"),
    "intzero-channel-bf16": dict(dtype="bfloat16", group_size=-1, kind="intzero"),
    "mixed-schemes-bf16": dict(dtype="bfloat16", group_size=32, kind="mixed"),
    "rtn-asym-dense-fallback-fp32": dict(dtype="float32", group_size=32, kind="rtn-asym"),
    "sym-g32-lm_head-int4-bf16": dict(dtype="bfloat16", group_size=32, kind="sym", skip=[]),
}


# ---- step 1: fourbit (fourbit's venv) -------------------------------------------------------

def _integer_zero_weight(weight, generator):
    """The layer's Int4Weight with the same q and scales and random integer zero points z:
    offsets -z * s, exact in fp32."""
    from fourbit.format import Int4Weight

    z = torch.randint(0, 16, weight.scales.shape, generator=generator).to(torch.float32)
    offsets = -(z * weight.scales.to(torch.float32))
    return Int4Weight(weight.qweight, weight.scales, offsets, weight.group_size, weight.shape, False, weight.perm)


def write_cases(out: Path) -> None:
    from safetensors.torch import save_file

    import fourbit
    from fourbit.models.llama import LlamaConfig
    from fourbit.models.loader import build_model
    from fourbit.models.random_weights import RandomCheckpoint

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_layers=LAYERS,
                         num_heads=HEADS, num_kv_heads=KV_HEADS, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2)
    prompts = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    for name, case in CASES.items():
        dtype = getattr(torch, case["dtype"])
        symmetric = case["kind"] != "intzero"
        quantize = fourbit.Int4WeightOnlyConfig(group_size=case["group_size"], symmetric=symmetric,
                                                skip=tuple(case.get("skip", ["lm_head"])))
        model = build_model(RandomCheckpoint(config, seed=len(name)), "cpu", dtype, quantize)
        generator = torch.Generator().manual_seed(1)
        for module_name, module in model.named_modules():
            if not isinstance(module, fourbit.Int4Linear):
                continue
            if case["kind"] == "rtn-asym" and module_name.startswith("layers.1."):  # a float minimum
                module.load_weight(fourbit.quantize_weight(module.weight.dequantize(), case["group_size"], False,
                                                           dtype=dtype))
            elif case["kind"] == "intzero" or (case["kind"] == "mixed" and module_name.startswith("layers.1.")):
                weight = module.weight
                if case["kind"] == "mixed":  # another group size too: a second config group
                    from fourbit import quantize_weight
                    weight = quantize_weight(weight.dequantize(), 64, True, dtype=dtype)
                    layer = fourbit.Int4Linear(module.in_features, module.out_features, False, 64, False,
                                               dtype=dtype, device="cpu")
                    parent, _, attr = module_name.rpartition(".")
                    setattr(model.get_submodule(parent), attr, layer)
                    module = layer
                module.load_weight(_integer_zero_weight(weight, generator))
        directory = out / name
        fourbit.save_model(model, directory / "model", format="compressed-tensors",
                           dense_fallback=case["kind"] == "rtn-asym")
        exported = fourbit.load_model(directory / "model", device="cpu", dtype=torch.float32)
        with torch.no_grad():
            logits = exported(prompts).float()
        greedy = torch.tensor(fourbit.generate(exported, prompts.tolist(), NEW_TOKENS))
        save_file({"prompt_ids": prompts, "logits": logits.contiguous(), "greedy": greedy},
                  str(directory / "fourbit.safetensors"))
        (directory / "case.json").write_text(json.dumps(case))
        print(f"wrote {directory}")


# ---- step 2: the peer (transformers + compressed-tensors; fourbit not imported) ---------------

def check_case(model_dir: Path, logits_file: Path) -> list[str]:
    """The problems found (empty: the peer agrees with fourbit)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    expected = load_file(str(logits_file))
    config = json.loads((model_dir / "config.json").read_text())
    quant = config.get("quantization_config")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # fourbit generated without stop tokens
    problems = []
    ignore = set(quant["ignore"]) if quant else set()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, module in linears.items():
        taken = getattr(module, "quantization_scheme", None) is not None
        if quant and taken == (name in ignore):
            problems.append(f"{name}: {'quantized' if taken else 'float'} in the peer, but the config "
                            f"{'ignores' if name in ignore else 'quantizes'} it")
    ids = expected["prompt_ids"]
    with torch.no_grad():
        logits = model(ids).logits.float()
    ref = expected["logits"]
    rel = float((logits - ref).abs().max() / ref.abs().max())
    if not rel <= LOGITS_RTOL:
        problems.append(f"logits differ: max |peer - fourbit| / max |fourbit| = {rel:.2e} > {LOGITS_RTOL}")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                         min_new_tokens=NEW_TOKENS)[:, ids.shape[1]:]
    if not torch.equal(out, expected["greedy"]):
        problems.append(f"greedy continuations differ: peer {out.tolist()}, fourbit {expected['greedy'].tolist()}")
    quantized = sum(getattr(m, "quantization_scheme", None) is not None for m in linears.values())
    print(f"{model_dir}: {quantized} compressed-tensors layers, {len(linears) - quantized} float; logits relative "
          f"difference {rel:.2e}; greedy {'equal' if torch.equal(out, expected['greedy']) else 'DIFFERENT'}")
    return problems


def check(paths: list[Path]) -> int:
    if len(paths) == 2 and paths[1].is_file():
        cases = [(paths[0], paths[1])]
    else:
        dirs = [d for p in paths for d in ([p] if (p / "model").is_dir() else sorted(p.iterdir()))]
        cases = [(d / "model", d / "fourbit.safetensors") for d in dirs if (d / "model").is_dir()]
    if not cases:
        print(f"no exported cases under {paths}: run `check_export.py write` first", file=sys.stderr)
        return 2
    failed = 0
    for model_dir, logits_file in cases:
        problems = check_case(model_dir, logits_file)
        for problem in problems:
            print(f"  FAIL {problem}")
        failed += bool(problems)
    print(f"{len(cases) - failed} of {len(cases)} exported checkpoints agree with fourbit")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("write", help="fourbit's venv: export the cases and fourbit's logits")
    p.add_argument("out", type=Path)
    p = sub.add_parser("check", help="peer venv: load each export with transformers and compare")
    p.add_argument("paths", type=Path, nargs="+")
    args = parser.parse_args()
    if args.step == "write":
        write_cases(args.out)
        return 0
    return check(args.paths)


if __name__ == "__main__":
    raise SystemExit(main())
