"""The int8 weight-only CPU kernel's figures (bench/results/cpu-int8.md).

1. kernels: int8_mm on the C++ CPU kernel against torch's fp32 matmul of the same weights
   dequantized (what the GGUF loader used before), on the SmolLM2 head (49152 x 576) and a
   4096 x 4096 layer; every call on the next of several weight copies that together exceed
   twice the last-level cache; providers round-robin so that load from other jobs falls on
   both; min / median µs, the int8 GB/s (q and scales read per call / min time) and its share
   of the copy bandwidth measured in the same run.
2. model: decode tokens/s of the embedded SmolLM2-135M (fourbit.evaluate.decode_tokens_per_second,
   batch 1) with its tied Q8_0 embedding as int8 (the default) and as fp32 (int8=False),
   interleaved, and perplexity over the first windows of the default text for both.

    python bench/cpu_int8_figures.py [kernels] [model] [--rounds N] [--windows N]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fourbit  # noqa: E402
from fourbit.backends import _C  # noqa: E402
from timing import cache_bytes, copy_bandwidth_gbs  # noqa: E402

SHAPES = [(49152, 576), (4096, 4096)]
ROWS = [1, 4, 16, 64]


def interleaved(fns: dict, rounds: int) -> tuple[dict, dict]:
    """(min, median) µs of each function, called round-robin `rounds` times after one warm-up."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e6)
    return {n: min(t) for n, t in times.items()}, {n: statistics.median(t) for n, t in times.items()}


def rotating(fn, operands: list) -> callable:
    """A call of fn on the next of the operand tuples each time (weights read from memory)."""
    turn = [0]

    def call():
        turn[0] = (turn[0] + 1) % len(operands)
        fn(*operands[turn[0]])
    return call


def kernels(rounds: int) -> None:
    copy_gbs = copy_bandwidth_gbs("cpu")
    print(f"threads {torch.get_num_threads()}, ISA {_C.int8_mm_cpu_isa()}, copy bandwidth {copy_gbs:.1f} GB/s "
          f"(read + write, {torch.get_num_threads()} threads)\n")
    print("| N x K | M | int8 µs min / median | fp32 matmul µs min / median | int8 speedup (min) "
          "| int8 GB/s (% copy) |")
    print("|---|---|---|---|---|---|")
    llc = cache_bytes(torch.device("cpu"))
    for n, k in SHAPES:
        int8_bytes = n * k + n * (k // 32) * 2
        copies8, copies32 = (max(2, -(-2 * llc // size) + 1) for size in (int8_bytes, 4 * n * k))
        qs = [(torch.randint(-128, 128, (n, k), dtype=torch.int8), (0.005 + 0.01 * torch.rand(n, k // 32)).half())
              for _ in range(copies8)]
        ws = [fourbit.Int8Weight(*qs[i % copies8], 32).dequantize() for i in range(copies32)]
        for m in ROWS:
            x = torch.randn(m, k)
            low, mid = interleaved({"int8": rotating(lambda q, s, x=x: _C.int8_mm_cpu(x, q, s, 32), qs),
                                    "fp32": rotating(lambda w, x=x: torch.mm(x, w.T), [(w,) for w in ws])}, rounds)
            gbs = int8_bytes / (low["int8"] * 1e-6) / 1e9
            print(f"| {n}x{k} | {m} | {low['int8']:.0f} / {mid['int8']:.0f} | {low['fp32']:.0f} / {mid['fp32']:.0f} "
                  f"| {low['fp32'] / low['int8']:.2f}x | {gbs:.1f} ({100 * gbs / copy_gbs:.0f}%) |", flush=True)
        del qs, ws


def model(rounds: int, windows: int) -> None:
    models = {"int8": fourbit.load_model("smollm2-135m", device="cpu"),
              "fp32": fourbit.load_model("smollm2-135m", device="cpu", int8=False)}
    tokenizer = fourbit.load_tokenizer("smollm2-135m")
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    rates = {name: [] for name in models}
    for _ in range(rounds):
        for name, m in models.items():
            rates[name].append(fourbit.evaluate.decode_tokens_per_second(m, prompt, new_tokens=64, repeats=3))
    print(f"\ndecode tokens/s, batch 1, prompt {len(prompt)} tokens, 64 new, {rounds} interleaved rounds of "
          "decode_tokens_per_second (median of 3 each):\n")
    print("| lm_head | tokens/s median | min | max | all |")
    print("|---|---|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.1f} | {min(r):.1f} | {max(r):.1f} | "
              f"{', '.join(f'{v:.1f}' for v in r)} |")
    print(f"\nspeedup (medians): {statistics.median(rates['int8']) / statistics.median(rates['fp32']):.3f}x")
    ids = tokenizer.encode(fourbit.evaluate.default_text())
    print(f"\nperplexity, first {windows} windows of 512 tokens of the default text:\n")
    ppl = {name: fourbit.perplexity(m, ids, 512, windows, progress=False) for name, m in models.items()}
    for name, p in ppl.items():
        print(f"- {name}: {p:.6f}")
    print(f"- relative difference: {abs(ppl['int8'] - ppl['fp32']) / ppl['fp32']:.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="*", default=["kernels", "model"], choices=["kernels", "model"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    if "kernels" in args.parts:
        kernels(args.rounds)
    if "model" in args.parts:
        model(max(3, args.rounds // 3), args.windows)
