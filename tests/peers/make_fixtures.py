"""Write the peer fixtures: tiny Llama checkpoints quantized to int4 by the real tools, and
what those tools say the checkpoints mean.

Run in the peer venv (`make peer-fixtures`), never in fourbit's: GPTQModel, llm-compressor
(compressed-tensors) and transformers, pinned by tests/peers/requirements.txt. fourbit is
not imported here; tests/peers/test_peer_checkpoints.py reads the result with fourbit.

For each case, .peers/fixtures/<case>/ holds:
    model/                 the tool's checkpoint directory exactly as the tool saved it
                           (config.json with quantization_config, *.safetensors, tokenizer);
                           what fourbit.load_model reads. A folder of its own: a reader that
                           globs *.safetensors must not see the reference tensors.
    reference.safetensors  "<HF module name>.weight" fp32 [N, K]: the tool's own
                           dequantization of every quantized linear layer, computed in fp32
                           (scales upcast, which is exact); "prompt_ids" int64 [P, T];
                           "logits" fp32 [P, T, vocab]: transformers' LlamaForCausalLM in fp32
                           with the checkpoint's float tensors and those dequantized weights;
                           "greedy" int64 [P, 8]: greedy continuations of that forward.
    case.json              {tool, version, method, group_size, sym, desc_act, format,
                           dequant_function, ...} and the cache stamp.

A case is rebuilt only when its case.json is missing or its stamp (this file's source and the
tools' versions) differs. `--cases a,b` builds only those; `--list` prints the case names.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
import torch._dynamo

TOOLS = ("torch", "transformers", "safetensors", "gptqmodel", "llmcompressor", "compressed-tensors", "optimum")
VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 512, 128, 320, 2, 4, 2
PROMPTS, PROMPT_LEN, NEW_TOKENS = 3, 12, 8
CALIB_SEQS, CALIB_LEN = 8, 64  # 512 calibration tokens

# name -> how to make it. intermediate 320 is no multiple of 128: down_proj's K has a
# partial last group at g128 (GPTQModel), or must be a multiple of the group (AWQ, g64).
CASES = {
    "gptqmodel-gptq-sym-g128": dict(tool="gptqmodel", method="gptq", format="gptq", group_size=128, sym=True,
                                    desc_act=False),
    "gptqmodel-gptq-asym-g64": dict(tool="gptqmodel", method="gptq", format="gptq", group_size=64, sym=False,
                                    desc_act=False),
    "gptqmodel-gptq-descact-g128": dict(tool="gptqmodel", method="gptq", format="gptq", group_size=128, sym=True,
                                        desc_act=True),
    "gptqmodel-gptqv2-asym-g128": dict(tool="gptqmodel", method="gptq", format="gptq_v2", group_size=128,
                                       sym=False, desc_act=False),
    "gptqmodel-awq-gemm-g64": dict(tool="gptqmodel", method="awq", format="gemm", group_size=64, sym=False,
                                   desc_act=False),
    # llm-compressor refuses a group that does not divide K (down_proj's 320 at g128): that
    # case leaves down_proj in bf16 (its `ignore`), a checkpoint with float and int4 layers.
    "llmcompressor-rtn-sym-g128": dict(tool="llmcompressor", method="rtn", format="pack-quantized",
                                       group_size=128, sym=True, strategy="group", float_layers=["mlp.down_proj"]),
    "llmcompressor-rtn-asym-g64": dict(tool="llmcompressor", method="rtn", format="pack-quantized",
                                       group_size=64, sym=False, strategy="group"),
    "llmcompressor-rtn-asym-channel": dict(tool="llmcompressor", method="rtn", format="pack-quantized",
                                           group_size=-1, sym=False, strategy="channel"),
    "llmcompressor-gptq-actorder-weight-g64": dict(tool="llmcompressor", method="gptq", format="pack-quantized",
                                                   group_size=64, sym=True, strategy="group", actorder="weight"),
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def versions() -> dict[str, str]:
    out = {}
    for name in TOOLS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def stamp() -> str:
    text = Path(__file__).read_text(encoding="utf-8") + json.dumps(versions(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_current(directory: Path) -> bool:
    try:
        return json.loads((directory / "case.json").read_text())["stamp"] == stamp()
    except (OSError, ValueError, KeyError):
        return False


def quantized_names(case: dict) -> list[str]:
    return [f"model.layers.{i}.{name}" for i in range(LAYERS) for name in LINEARS
            if name not in case.get("float_layers", ())]


# ---- the float model, its tokenizer, the calibration and prompt ids ----------------------------

def make_float_model(directory: Path) -> None:
    """A random Llama (fp32) and a word-level tokenizer over its vocabulary ("w4" .. "w511")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # spread the logits: greedy decisions with clear margins
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(directory)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(directory)


def calibration_ids() -> torch.Tensor:
    return torch.randint(4, VOCAB, (CALIB_SEQS, CALIB_LEN), generator=torch.Generator().manual_seed(1))


def prompt_ids() -> torch.Tensor:
    return torch.randint(4, VOCAB, (PROMPTS, PROMPT_LEN), generator=torch.Generator().manual_seed(2))


# ---- the tools ---------------------------------------------------------------------------------

def quantize_gptqmodel(case: dict, float_dir: Path, out: Path) -> None:
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    kwargs = dict(bits=4, group_size=case["group_size"], sym=case["sym"], format=case["format"],
                  offload_to_disk=False)
    if case["method"] == "awq":
        kwargs["quant_method"] = "awq"
    else:
        kwargs["desc_act"] = case["desc_act"]
    config = QuantizeConfig(**kwargs)
    model = GPTQModel.load(str(float_dir), config, device="cpu", dtype=torch.float16)
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calibration_ids()]
    # AWQ on CPU: the torch kernel (GPTQModel's default AWQ backend, AWQ_GEMM, needs CUDA).
    backend = BACKEND.AWQ_TORCH if case["method"] == "awq" else BACKEND.AUTO
    model.quantize(calib, batch_size=1, backend=backend)
    model.save(str(out))


def quantize_llmcompressor(case: dict, float_dir: Path, out: Path) -> None:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(float_dir)
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=case["sym"], strategy=case["strategy"],
                               group_size=case["group_size"] if case["strategy"] == "group" else None,
                               actorder=case.get("actorder"))
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    modifier = GPTQModifier if case["method"] == "gptq" else QuantizationModifier
    ignore = ["lm_head"] + [f"re:.*{name}$" for name in case.get("float_layers", ())]
    recipe = modifier(config_groups={"group_0": scheme}, ignore=ignore)
    ids = calibration_ids()
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, recipe=recipe, dataset=dataset if case["method"] == "gptq" else None,
            num_calibration_samples=CALIB_SEQS, max_seq_length=CALIB_LEN)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)


# ---- the tools' own dequantization -------------------------------------------------------------

def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def dequant_gptqmodel(case: dict, model_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """GPTQ: PackableQuantLinear.dequantize_weight (the unpacking and (q - z) * s that
    TorchLinear runs, called eagerly) on the modules of the model GPTQModel loads (backend
    torch, v1 zero points already converted by its loader), scales upcast to fp32.
    AWQ GEMM: packing_utils.dequantize_gemm on the stored tensors, scales upcast."""
    if case["method"] == "awq":
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        tensors = read_tensors(model_dir)
        out = {}
        for name in quantized_names(case):
            w = dequantize_gemm(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"],
                                tensors[f"{name}.scales"].float(), 4, case["group_size"])
            out[f"{name}.weight"] = w.T.contiguous()
        return out, "gptqmodel.quantization.awq.utils.packing_utils.dequantize_gemm (scales upcast to fp32)"
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear

    model = gptqmodel_runtime(model_dir)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, PackableQuantLinear):
            scales = module.scales
            module.scales = scales.float()
            with torch.no_grad():
                out[f"{name}.weight"] = PackableQuantLinear.dequantize_weight(module).T.contiguous().float()
            module.scales = scales
            kind = type(module).__name__
    return out, (f"gptqmodel.nn_modules.qlinear.PackableQuantLinear.dequantize_weight on the {kind} modules of "
                 "GPTQModel.load(backend=BACKEND.TORCH) (scales upcast to fp32)")


@functools.lru_cache(maxsize=1)
def gptqmodel_runtime(model_dir: Path, method: str = "gptq"):
    """The HF model inside GPTQModel.load(model_dir) in fp16 on its CPU (torch) kernels."""
    from gptqmodel import BACKEND, GPTQModel

    backend = BACKEND.AWQ_TORCH if method == "awq" else BACKEND.TORCH
    return GPTQModel.load(str(model_dir), backend=backend, device="cpu", dtype=torch.float16).model.eval()


def dequant_compressed_tensors(case: dict, model_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """PackedQuantizationCompressor.decompress of each layer's tensors (weight_scale upcast)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    config = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    scheme = QuantizationScheme.model_validate(group)
    tensors = read_tensors(model_dir)
    out = {}
    for name in quantized_names(case):
        state = {key[len(name) + 1:]: value for key, value in tensors.items() if key.startswith(name + ".")}
        state["weight_scale"] = state["weight_scale"].float()
        out[f"{name}.weight"] = PackedQuantizationCompressor.decompress(state, scheme)["weight"].float()
    return out, ("compressed_tensors.compressors.pack_quantized.base.PackedQuantizationCompressor.decompress "
                 "(unpack_from_int32 + quantization.lifecycle.forward.dequantize; weight_scale upcast to fp32)")


# ---- the reference forward ---------------------------------------------------------------------

def reference_model(model_dir: Path, weights: dict[str, torch.Tensor]):
    """transformers' LlamaForCausalLM in fp32: the checkpoint's float tensors, cast, and the
    dequantized weights of its quantized layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config)).eval()
    state = {key: value.float() for key, value in read_tensors(model_dir).items()
             if key in model.state_dict()}
    state.update(weights)
    model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def greedy(model, prompts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """NEW_TOKENS greedy tokens after each prompt (full forwards) and the smallest top-1 margin."""
    ids, margin = prompts, float("inf")
    for _ in range(NEW_TOKENS):
        logits = model(ids).logits[:, -1].float()
        top = logits.topk(2, dim=-1).values
        margin = min(margin, (top[:, 0] - top[:, 1]).min().item())
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:], margin


@torch.no_grad()
def tool_forward_error(case: dict, model_dir: Path, reference: torch.Tensor, prompts: torch.Tensor):
    """max |tool logits - reference| / max |reference| of the tool's own runtime (fp16/bf16),
    a check that the reference weights are what the tool computes with; None where the tool
    has no CPU runtime for the format."""
    try:
        if case["tool"] == "gptqmodel":
            model = gptqmodel_runtime(model_dir, case["method"])
        elif case["tool"] == "llmcompressor":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        else:
            return None
        logits = model(prompts).logits.float()
    except Exception as error:  # noqa: BLE001 -- a check of the reference, not the reference
        return f"tool runtime failed: {type(error).__name__}: {error}"[:300]
    return ((logits - reference).abs().max() / reference.abs().max()).item()


# ---- one case ----------------------------------------------------------------------------------

def describe(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """{tensor name: [dtype, shape]} of layer 0's tensors and the non-layer ones."""
    return {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in sorted(tensors.items())
            if ".layers." not in k or ".layers.0." in k}


def build_case(name: str, case: dict, float_dir: Path, root: Path) -> dict:
    start = time.perf_counter()
    seconds = {}
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model_dir = tmp / "model"
    if case["tool"] == "gptqmodel":
        quantize_gptqmodel(case, float_dir, model_dir)
        seconds["quantize"] = time.perf_counter() - start
        weights, function = dequant_gptqmodel(case, model_dir)
    else:
        quantize_llmcompressor(case, float_dir, model_dir)
        seconds["quantize"] = time.perf_counter() - start
        weights, function = dequant_compressed_tensors(case, model_dir)
    seconds["dequantize"] = time.perf_counter() - start - seconds["quantize"]
    missing = sorted(set(f"{n}.weight" for n in quantized_names(case)) - set(weights))
    if missing:
        raise RuntimeError(f"{name}: no dequantized weight for {missing}")
    prompts = prompt_ids()
    model = reference_model(model_dir, weights)
    with torch.no_grad():
        logits = model(prompts).logits.float()
    continuation, margin = greedy(model, prompts)
    from safetensors.torch import save_file

    save_file({**weights, "prompt_ids": prompts, "logits": logits.contiguous(), "greedy": continuation.contiguous()},
              tmp / "reference.safetensors")
    info = {**case, "version": versions()[case["tool"]], "dequant_function": function,
            "quantization_config": json.loads((model_dir / "config.json").read_text()).get("quantization_config"),
            "tensors": describe(read_tensors(model_dir)),
            "greedy_min_margin": margin,
            "tool_forward_rel_error": tool_forward_error(case, model_dir, logits, prompts),
            "versions": versions(), "seconds": round(time.perf_counter() - start, 1),
            "phase_seconds": {k: round(v, 1) for k, v in seconds.items()}, "stamp": stamp()}
    (tmp / "case.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(root / name, ignore_errors=True)
    tmp.rename(root / name)
    return info


SUMMARY_KEYS = ("tool", "version", "method", "format", "group_size", "sym", "desc_act", "strategy", "actorder",
                "float_layers", "dequant_function", "quantization_config", "tensors", "greedy_min_margin",
                "tool_forward_rel_error", "seconds")


def summary(root: Path) -> str:
    """FIXTURES.md: what each case's checkpoint holds (layer 0 and the non-layer tensors), one
    JSON object per case, from the case.json files under root."""
    lines = ["# Peer fixtures (written by tests/peers/make_fixtures.py --summary)", "",
             "Each case: `.peers/fixtures/<case>/model/` (the tool's checkpoint as saved), `reference.safetensors`",
             "(`<HF module>.weight` fp32 [N, K] for every quantized layer, `prompt_ids` int64 [3, 12],",
             "`logits` fp32 [3, 12, 512], `greedy` int64 [3, 8]) and `case.json`. The model: Llama, vocab 512,",
             "hidden 128, intermediate 320, 2 layers, 4 heads, 2 KV heads (head_dim 32), untied lm_head.",
             "`tensors`: [dtype, shape] of layer 0's q_proj (K 128) and down_proj (K 320) tensors (the other",
             "layers' are alike) and of the non-layer tensors; the quantization_config's GPTQModel `meta`",
             "block is left out here.", ""]
    for name in CASES:
        info = json.loads((root / name / "case.json").read_text())
        config = dict(info.get("quantization_config") or {})
        config.pop("meta", None)
        info["quantization_config"] = config
        info["tensors"] = {k: v for k, v in info["tensors"].items()
                           if ".layers." not in k or any(p in k for p in ("q_proj", "down_proj"))}
        body = ",\n".join(f" {json.dumps(k)}: {json.dumps(info[k])}" for k in SUMMARY_KEYS if k in info)
        lines += [f"## {name}", "", "```json", "{\n" + body + "\n}", "```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".peers/fixtures"))
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--summary", type=Path, help="write the fixtures' summary (FIXTURES.md) there and exit")
    args = parser.parse_args()
    # The tools are imported later, in the functions that use them.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel crashes on 2 cores without it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch._dynamo.config.disable = True  # GPTQModel's TorchLinear compiles its dequant: minutes on 2 cores
    if args.list:
        print("\n".join(CASES))
        return 0
    if args.summary:
        args.summary.write_text(summary(args.out))
        return 0
    names = [n for n in args.cases.split(",") if n] or list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {list(CASES)}")
    root = args.out.resolve()
    root.mkdir(parents=True, exist_ok=True)
    float_dir = root / "_float"
    if not float_dir.joinpath("stamp.txt").is_file() or float_dir.joinpath("stamp.txt").read_text() != stamp():
        shutil.rmtree(float_dir, ignore_errors=True)
        make_float_model(float_dir)
        float_dir.joinpath("stamp.txt").write_text(stamp())
    start, failed = time.perf_counter(), []
    for name in names:
        if is_current(root / name):
            print(f"{name}: current")
            continue
        try:
            info = build_case(name, CASES[name], float_dir, root)
        except Exception as error:  # noqa: BLE001 -- report every case, then fail
            failed.append(name)
            traceback.print_exc()
            print(f"{name}: FAILED: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        print(f"{name}: built in {info['seconds']} s (greedy margin {info['greedy_min_margin']:.3g}, "
              f"tool forward rel error {info['tool_forward_rel_error']})")
    print(f"fixtures in {root}: {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
