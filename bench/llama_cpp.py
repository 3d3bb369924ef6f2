"""llama.cpp as a benchmark peer: its own llama-bench and llama-batched-bench, run on the
same GGUF file with the same thread count as fourbit.

The binaries are found through FOURBIT_LLAMA_BENCH (the path of llama-bench; its
llama-batched-bench is looked for beside it) or on PATH. `make llama-bench` builds both from
the llama.cpp source vendored in the PyPI sdist of llama-cpp-python (no network beyond
PyPI), with -DGGML_NATIVE=ON, into .peers/llama.cpp/build/bin/. Nothing here is imported by
fourbit itself; without a binary the llama.cpp providers skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILT = ROOT / ".peers" / "llama.cpp" / "build" / "bin"


def binary(name: str = "llama-bench") -> Path | None:
    """The llama.cpp tool `name` ("llama-bench" or "llama-batched-bench"): beside
    $FOURBIT_LLAMA_BENCH when it is set (the variable names llama-bench itself), else on PATH,
    else in the `make llama-bench` build; None if there is none."""
    given = os.environ.get("FOURBIT_LLAMA_BENCH")
    if given:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"FOURBIT_LLAMA_BENCH={given} is not a file")
        candidate = path if name == "llama-bench" else path.with_name(name)
        return candidate if candidate.is_file() else None
    found = shutil.which(name)
    if found:
        return Path(found)
    candidate = BUILT / name
    return candidate if candidate.is_file() else None


def _run(command: list[str]) -> str:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{command[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def bench(gguf: Path, threads: int, prompt: int = 32, new_tokens: int = 64, repeats: int = 3) -> dict:
    """llama-bench's prompt processing and decode rates for one sequence.

    Returns {"prompt_tok_s", "decode_tok_s", "threads", "build", "cpu"}: tokens per second
    averaged over `repeats` runs, of a `prompt`-token prompt and of `new_tokens` generated
    tokens (llama-bench times the two apart, as -p and -n)."""
    tool = binary("llama-bench")
    if tool is None:
        raise FileNotFoundError("no llama-bench: set FOURBIT_LLAMA_BENCH or run `make llama-bench`")
    rows = json.loads(_run([str(tool), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(new_tokens),
                            "-r", str(repeats), "-o", "json"]))
    pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == new_tokens and r["n_prompt"] == 0)
    return dict(prompt_tok_s=pp["avg_ts"], decode_tok_s=tg["avg_ts"], threads=tg["n_threads"],
                build=tg.get("build_commit"), cpu=tg.get("cpu_info"))


def batched_bench(gguf: Path, threads: int, batches: list[int], prompt: int = 32, new_tokens: int = 64) -> dict:
    """llama-batched-bench's decode rate in total (all sequences) for each batch size: B
    sequences of a `prompt`-token prompt each, then `new_tokens` tokens for each.

    Returns {B: total decode tokens per second}."""
    tool = binary("llama-batched-bench")
    if tool is None:
        raise FileNotFoundError("no llama-batched-bench beside llama-bench: run `make llama-bench`")
    context = max(batches) * (prompt + new_tokens) + 64
    out = _run([str(tool), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-c", str(context),
                "-npp", str(prompt), "-ntg", str(new_tokens), "-npl", ",".join(map(str, batches)),
                "--output-format", "jsonl"])
    rates = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            row = json.loads(line)
            rates[int(row["pl"])] = float(row["speed_tg"])
    missing = [b for b in batches if b not in rates]
    if missing:
        raise RuntimeError(f"llama-batched-bench printed no row for batch {missing}:\n{out[-2000:]}")
    return rates


# ---- the side-by-side CPU report: python bench/llama_cpp.py ---------------------------------

PROMPT = [1] + list(range(300, 331))  # 32 tokens, as bench_model.py
BATCHES = [1, 4, 8, 16]


def fourbit_rates(model, new_tokens: int, batches: list[int], repeats: int = 3, compile: bool = False,
                  backend: str = "auto") -> dict:
    """fourbit's prompt processing (one 32-token prompt: generate of one token, median of 5)
    and decode rates in total over each batch size (evaluate.decode_tokens_per_second), the
    decode step compiled (generate(compile=True), after a warm-up that compiles it) or eager,
    the int4 layers on `backend` ("cpu-a8": int8 activations, as llama.cpp computes Q4 x Q8)."""
    import statistics
    import time

    from fourbit.evaluate import decode_tokens_per_second
    from fourbit.generate import generate
    from fourbit.nn import Int4Linear
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.backend = backend
    generate(model, [PROMPT], 1)

    def prefill():
        start = time.perf_counter()
        generate(model, [PROMPT], 1)
        return time.perf_counter() - start
    prompt_s = statistics.median(prefill() for _ in range(5))
    decode = {b: b * decode_tokens_per_second(model, PROMPT, new_tokens, repeats=repeats, batch=b, compile=compile)
              for b in batches}
    return dict(prompt_tok_s=len(PROMPT) / prompt_s, decode_tok_s=decode[batches[0]] if batches[0] == 1 else None,
                batched=decode)


def paired_batch1(model, gguf: Path, threads: int, pairs: int, new_tokens: int) -> dict:
    """Batch-1 decode rates measured in alternation, seconds apart, so that both sides see the
    same moments of a shared machine: `pairs` times one fourbit measurement of each compiled
    setting (W4A16 "auto", W4A8 "cpu-a8"; evaluate.decode_tokens_per_second, one repeat, no
    warm-up: the graphs were compiled by fourbit_rates) then one llama-bench run (-r 1).

    Returns {"fourbit_compiled": [...], "fourbit_compiled_a8": [...], "llama_cpp": [...]},
    tokens/s per pair, in order."""
    from fourbit.evaluate import decode_tokens_per_second
    from fourbit.nn import Int4Linear

    def use(backend):
        for module in model.modules():
            if isinstance(module, Int4Linear):
                module.backend = backend

    def rate(backend):
        use(backend)
        return decode_tokens_per_second(model, PROMPT, new_tokens, repeats=1, warmup=False, compile=True)
    out = {"fourbit_compiled": [], "fourbit_compiled_a8": [], "llama_cpp": []}
    for _ in range(pairs):
        out["fourbit_compiled"].append(rate("auto"))
        out["fourbit_compiled_a8"].append(rate("cpu-a8"))
        out["llama_cpp"].append(bench(gguf, threads, len(PROMPT), new_tokens, repeats=1)["decode_tok_s"])
    use("auto")
    return out


def main() -> None:
    import argparse
    import platform
    import statistics
    import subprocess as sp

    import torch

    import fourbit
    parser = argparse.ArgumentParser(description="fourbit against llama.cpp on the embedded SmolLM2 GGUF, CPU")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both (default 2)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--pairs", type=int, default=10, help="alternations of the paired batch-1 decode (default 10)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu-llama-cpp"))
    args = parser.parse_args()
    gguf = fourbit.models.resolve_source("smollm2-135m")
    threads = torch.get_num_threads()
    model = fourbit.load_model(gguf, device="cpu")
    rounds = []
    for _ in range(args.rounds):  # alternate, so that a busy moment hits all alike
        eager = fourbit_rates(model, args.new_tokens, args.batches)
        compiled = fourbit_rates(model, args.new_tokens, args.batches, compile=True)
        a8 = fourbit_rates(model, args.new_tokens, args.batches, compile=True, backend="cpu-a8")
        theirs = bench(gguf, threads, len(PROMPT), args.new_tokens)
        theirs["batched"] = batched_bench(gguf, threads, args.batches, len(PROMPT), args.new_tokens)
        rounds.append(dict(fourbit=eager, fourbit_compiled=compiled, fourbit_compiled_a8=a8, llama_cpp=theirs))
        print(json.dumps(rounds[-1]), flush=True)
    paired = paired_batch1(model, gguf, threads, args.pairs, args.new_tokens)
    print(json.dumps(paired), flush=True)

    def best(side, key, batch=None):
        values = [r[side]["batched"][batch] if batch else r[side][key] for r in rounds]
        return max(values)
    commit = sp.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    cpu = rounds[0]["llama_cpp"]["cpu"] or platform.processor()
    lines = ["# fourbit against llama.cpp on the CPU (SmolLM2-135M-Instruct Q4_1 GGUF)", "",
             f"Machine: {cpu}, {os.cpu_count()} logical CPUs; {threads} threads for both. fourbit commit {commit}, "
             f"torch {torch.__version__}; llama.cpp build {rounds[0]['llama_cpp']['build']} (the source in the "
             "llama-cpp-python 0.3.36 sdist, -DGGML_NATIVE=ON without AMX, `make llama-bench`). Command: "
             "`python bench/llama_cpp.py`. Best of "
             f"{args.rounds} alternating rounds; a {len(PROMPT)}-token prompt, {args.new_tokens} new tokens. "
             "fourbit eager is `generate(...)`, compiled `generate(..., compile=True)` (its graphs compiled in a "
             "warm-up, not timed), both W4A16 (backend \"auto\"); W4A8 is compiled with backend \"cpu-a8\" "
             "(activations quantized to int8 per 32 columns, as llama.cpp's Q4 x Q8 dot products do). Decode rates "
             "from llama-batched-bench, and for batch 1 also llama-bench -n.", "",
             "| measure | fourbit eager | fourbit compiled | fourbit compiled W4A8 | llama.cpp "
             "| best W4A16 / llama.cpp | W4A8 / llama.cpp |",
             "|---|---|---|---|---|---|---|"]
    rows = [("prompt processing, tokens/s", "prompt_tok_s", None, best("llama_cpp", "prompt_tok_s"))]
    rows += [(f"decode, batch {b}, tokens/s in total", None, b, best("llama_cpp", None, b)) for b in args.batches]
    if 1 in args.batches:
        rows.append(("decode, batch 1 (llama-bench -n)", None, 1, best("llama_cpp", "decode_tok_s")))
    for name, key, batch, theirs in rows:
        eager, compiled = best("fourbit", key, batch), best("fourbit_compiled", key, batch)
        a8 = best("fourbit_compiled_a8", key, batch)
        lines.append(f"| {name} | {eager:.1f} | {compiled:.1f} | {a8:.1f} | {theirs:.1f} "
                     f"| {max(eager, compiled) / theirs:.2f}x | {a8 / theirs:.2f}x |")
    median = statistics.median
    theirs = paired["llama_cpp"]
    lines += ["", f"Batch-1 decode in {args.pairs} alternations seconds apart (`--pairs`; each: one fourbit "
              "measurement of each setting, then one `llama-bench -r 1`), tokens/s; the ratio is the median of the "
              "per-alternation ratios:", "",
              "| setting | fourbit median | fourbit range | llama.cpp median | llama.cpp range | fourbit / llama.cpp |",
              "|---|---|---|---|---|---|"]
    for side, name in (("fourbit_compiled", "compiled W4A16"), ("fourbit_compiled_a8", "compiled W4A8")):
        ours = paired[side]
        ratio = median(a / b for a, b in zip(ours, theirs))
        lines.append(f"| {name} | {median(ours):.1f} | {min(ours):.0f}-{max(ours):.0f} | {median(theirs):.1f} "
                     f"| {min(theirs):.0f}-{max(theirs):.0f} | {ratio:.2f}x |")
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(dict(commit=commit, threads=threads, rounds=rounds, paired=paired),
                                                   indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
