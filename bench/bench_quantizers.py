"""How well the calibrated quantizers do (a script, not a timed pytest suite):

    python bench/bench_quantizers.py [--calib-seqs 16] [--eval-windows 16] [--group-sizes 128 64] [--no-peer]

The float model is the embedded SmolLM2-135M with its Q4_1 weights dequantized
(fourbit.load_model("smollm2-135m", quantize=False)). Each method quantizes it at each group
size (asymmetric, lm_head tied and float): RTN (fourbit's round to nearest), GPTQ in channel
order (with min/max grids and with searched grids), GPTQ with act-order "static" and "group",
AWQ scaling + RTN, AWQ scaling + GPTQ static, and llm-compressor 0.14's GPTQModifier (the
peer, in .peers/venv, its compressed-tensors checkpoint read by fourbit.load_model) on the same
calibration ids. Calibration text: the docstrings of the Python standard library
(fourbit.quantizers.default_calibration_text); held-out text: CPython's pydoc_data.topics (the
language reference, fourbit.evaluate.default_text), perplexity over 512-token windows.

Each fourbit method runs in its own process, so its time and peak memory (ru_maxrss above
the loaded float model) are its own. --layer-7b also times one Llama-2-7B-shaped decoder
layer (random weights) to estimate a 7B model. Results: bench/results/quantizers.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".peers" / "venv" / "bin" / "python"
SEQ_LEN = 512
# Runs in order, the ones the targets need first. llm-compressor requires every K to be a
# multiple of the group size: SmolLM2's K = 576 is not one of 128, so the peer runs at g64.
PLAN = ["rtn:128", "gptq-static:128", "gptq:128", "peer:64", "rtn:64", "gptq-static:64", "gptq:64",
        "gptq-minmax:128", "gptq-minmax:64", "gptq-act-order:128", "gptq-act-order:64",
        "awq+gptq-static:128", "awq+gptq-static:64", "awq+rtn:128", "awq+rtn:64"]
METHODS = {  # name -> Int4WeightOnlyConfig fields (grid_search is on unless named "minmax")
    "rtn": dict(method="rtn"),
    "gptq-minmax": dict(method="gptq", grid_search=False),
    "gptq": dict(method="gptq"),
    "gptq-act-order": dict(method="gptq", act_order=True),
    "gptq-static": dict(method="gptq", act_order="static"),
    "awq+rtn": dict(method="awq", awq_rounding="rtn"),
    "awq+gptq": dict(method="awq", awq_rounding="gptq"),
    "awq+gptq-static": dict(method="awq", awq_rounding="gptq", act_order="static"),
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def texts(calib_seqs: int, eval_windows: int):
    import fourbit
    from fourbit.evaluate import default_text
    from fourbit.quantizers import default_calibration_text
    tokenizer = fourbit.load_tokenizer("smollm2-135m")
    calib = tokenizer.encode(default_calibration_text(chars=calib_seqs * SEQ_LEN * 5))
    if len(calib) < calib_seqs * SEQ_LEN:
        raise SystemExit(f"only {len(calib)} calibration tokens")
    calib = torch.tensor(calib[: calib_seqs * SEQ_LEN]).view(calib_seqs, SEQ_LEN)
    held_out = tokenizer.encode(default_text())[: eval_windows * SEQ_LEN]
    return calib, held_out


def perplexity(model, held_out) -> float:
    import fourbit
    return fourbit.perplexity(model, held_out, window=SEQ_LEN, batch_size=4, progress=False)


def run_one(name: str, group_size: int, calib: torch.Tensor, held_out) -> dict:
    """Quantize the float model by one method (in this process) and score it."""
    import fourbit
    model = fourbit.load_model("smollm2-135m", device="cpu", quantize=False)
    if name == "float":
        return dict(method=name, group_size=None, ppl=perplexity(model, held_out))
    before = _current_rss_mib()
    config = fourbit.Int4WeightOnlyConfig(group_size=group_size, **METHODS[name])
    start = time.perf_counter()
    fourbit.quantize_(model, config, calibration=None if name == "rtn" else calib)
    seconds = time.perf_counter() - start
    peak = _rss_mib() - before
    return dict(method=name, group_size=group_size, seconds=seconds, peak_mib_above_model=peak,
                ppl=perplexity(model, held_out))


# ---- the peer: llm-compressor's GPTQModifier in its own venv --------------------------------

PEER_SCRIPT = r'''
import json, sys, time, torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM
src, ids_path, out, group_size, sym = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
torch.set_num_threads(int(sys.argv[6]))
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
ids = torch.load(ids_path)
weights = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=group_size)
recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                      ignore=["lm_head"])
dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
loaded = time.perf_counter()
oneshot(model=model, recipe=recipe, dataset=dataset, num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1])
done = time.perf_counter()
model.save_pretrained(out, save_compressed=True)
import importlib.metadata as md
print("PEER " + json.dumps(dict(load_s=loaded - start, oneshot_s=done - loaded,
                                 versions={p: md.version(p) for p in ("llmcompressor", "compressed-tensors",
                                                                      "transformers", "torch")})))
'''


def write_hf_float(model, directory: Path) -> None:
    """The float fourbit Llama as a plain Hugging Face Llama directory (fused q/k/v and
    gate/up split back; the tied head left to tie_word_embeddings)."""
    from safetensors.torch import save_file
    c = model.config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    tensors = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}"
        wq, wk, wv = layer.self_attn.qkv_proj.weight.split([q, kv, kv])
        gate, up = layer.mlp.gate_up_proj.weight.chunk(2)
        tensors.update({f"{p}.input_layernorm.weight": layer.input_layernorm.weight,
                        f"{p}.post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
                        f"{p}.self_attn.q_proj.weight": wq, f"{p}.self_attn.k_proj.weight": wk,
                        f"{p}.self_attn.v_proj.weight": wv,
                        f"{p}.self_attn.o_proj.weight": layer.self_attn.o_proj.weight,
                        f"{p}.mlp.gate_proj.weight": gate, f"{p}.mlp.up_proj.weight": up,
                        f"{p}.mlp.down_proj.weight": layer.mlp.down_proj.weight})
    if not c.tie_word_embeddings:
        tensors["lm_head.weight"] = model.lm_head.weight
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({**c.to_hf(), "torch_dtype": "float32"}, indent=1))


def run_peer(group_size: int, calib: torch.Tensor, held_out, work: Path) -> dict:
    import fourbit
    float_dir = work / "float-hf"
    if not float_dir.exists():
        model = fourbit.load_model("smollm2-135m", device="cpu", quantize=False)
        write_hf_float(model, float_dir)
        fourbit.load_tokenizer("smollm2-135m").to_hf(float_dir)
        del model
    ids_path = work / "calib.pt"
    torch.save(calib, ids_path)
    out = work / f"llmcompressor-g{group_size}"
    start = time.perf_counter()
    proc = subprocess.run([str(PEER_PYTHON), "-c", PEER_SCRIPT, str(float_dir), str(ids_path), str(out),
                           str(group_size), "0", str(torch.get_num_threads())],
                          capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"llm-compressor failed:\n{proc.stderr[-4000:]}")
    info = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("PEER "))[5:])
    model = fourbit.load_model(out, device="cpu", dtype=torch.float32)
    return dict(method="llm-compressor GPTQModifier", group_size=group_size, seconds=info["oneshot_s"],
                process_s=wall, ppl=perplexity(model, held_out), versions=info["versions"])


# ---- one Llama-2-7B-shaped layer -------------------------------------------------------------

def run_layer_7b(tokens: int) -> dict:
    """GPTQ on one Llama-2-7B decoder layer (random weights) over `tokens` calibration
    tokens: the time of the calibration forwards and of the GPTQ solves, and the peak memory."""
    import fourbit
    from fourbit.models.llama import CONFIGS
    from fourbit.models.loader import build_model
    from fourbit.models.random_weights import RandomCheckpoint
    from fourbit.quantizers import calibration as calibration_
    from fourbit.quantizers import gptq as gptq_
    config = dataclasses.replace(CONFIGS["llama-2-7b"], num_layers=1, vocab_size=1024)
    model = build_model(RandomCheckpoint(config), "cpu", torch.float32, quantize=False)
    ids = torch.randint(0, config.vocab_size, (max(1, tokens // SEQ_LEN), SEQ_LEN),
                        generator=torch.Generator().manual_seed(0))
    solve = [0.0]
    original = gptq_.gptq_quantize

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        solve[0] += time.perf_counter() - start
        return out
    before = _current_rss_mib()
    calibration_.gptq_quantize = timed
    try:
        start = time.perf_counter()
        fourbit.quantize_(model, fourbit.Int4WeightOnlyConfig(method="gptq"), calibration=ids)
        total = time.perf_counter() - start
    finally:
        calibration_.gptq_quantize = original
    return dict(tokens=int(ids.numel()), layer_s=total, solve_s=solve[0], forward_s=total - solve[0],
                peak_mib_above_model=_rss_mib() - before, layers=CONFIGS["llama-2-7b"].num_layers)


# ---- the report -------------------------------------------------------------------------------

def report(results: dict, path: Path) -> None:
    rows = results["rows"]
    float_ppl = next(r["ppl"] for r in rows if r["method"] == "float")
    lines = ["# Calibrated quantizers on SmolLM2-135M", "",
             f"Float model: SmolLM2-135M-Instruct's Q4_1 weights dequantized to fp32 (perplexity {float_ppl:.4f}). "
             f"Calibration: {results['calib_seqs']} x {SEQ_LEN} tokens of the Python standard library's docstrings; "
             f"held out: {results['eval_tokens']} tokens ({results['eval_tokens'] // SEQ_LEN} windows of {SEQ_LEN}) "
             "of CPython's pydoc_data.topics. Asymmetric int4, lm_head (tied) float. "
             f"{results['machine']}, torch {results['torch']}, {results['threads']} threads, "
             f"commit {results['commit']}.",
             "", "| group | method | perplexity | vs float | gap closed vs RTN | quantize s | peak MiB above model |",
             "|---|---|---|---|---|---|---|"]
    for group in results["group_sizes"]:
        rtn = next((r["ppl"] for r in rows if r["method"] == "rtn" and r["group_size"] == group), None)
        for r in rows:
            if r["group_size"] != group:
                continue
            closed = "" if rtn is None or r["method"] == "rtn" else f"{100 * (rtn - r['ppl']) / (rtn - float_ppl):.0f}%"
            peak = f"{r['peak_mib_above_model']:.0f}" if "peak_mib_above_model" in r else ""
            lines.append(f"| {group} | {r['method']} | {r['ppl']:.4f} | {100 * (r['ppl'] / float_ppl - 1):+.2f}% | "
                         f"{closed} | {r['seconds']:.1f} | {peak} |")
    if "layer_7b" in results:
        layer = results["layer_7b"]
        lines += ["", f"One Llama-2-7B-shaped decoder layer (random weights), GPTQ over {layer['tokens']} calibration "
                  f"tokens: {layer['layer_s']:.1f} s ({layer['forward_s']:.1f} s forwards and Hessians, "
                  f"{layer['solve_s']:.1f} s GPTQ solves), peak {layer['peak_mib_above_model']:.0f} MiB above the "
                  f"model. 32 layers: about {32 * layer['layer_s'] / 60:.0f} min at these tokens (the forwards "
                  "scale with the tokens, the solves do not)."]
    lines += ["", "Peer versions: " + json.dumps(results.get("peer_versions", {}))]
    lines += ["", "Notes:"] + [f"- {note}" for note in results["notes"]] if results.get("notes") else []
    lines.append("")
    path.with_suffix(".md").write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-seqs", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--plan", nargs="+", default=PLAN,
                        help="METHOD:GROUP runs in order (METHOD one of %(default)s's, 'peer' for llm-compressor)")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--layer-7b", type=int, default=0, help="time one 7B layer over this many tokens (0: no)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantizers"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every run, the peer's too (default 1: on a shared 2-core machine, "
                             "more threads wait on each other)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "GROUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calib, held_out = texts(args.calib_seqs, args.eval_windows)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one[0], int(args.one[1]), calib, held_out)), flush=True)
        return

    def child(method, group):
        proc = subprocess.run([sys.executable, __file__, "--calib-seqs", str(args.calib_seqs), "--eval-windows",
                               str(args.eval_windows), "--threads", str(args.threads), "--one", method, str(group)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{method} g{group} failed:\n{proc.stderr[-4000:]}")
        row = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        print(row, flush=True)
        return row

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    results = dict(calib_seqs=args.calib_seqs, eval_tokens=len(held_out), group_sizes=[],
                   machine=f"{platform.machine()} {os.cpu_count()} cores", torch=torch.__version__,
                   threads=torch.get_num_threads(), commit=commit.strip(), rows=[child("float", 0)])
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="bench-quantizers-"))
    for item in args.plan:
        method, group = item.split(":")
        if int(group) not in results["group_sizes"]:
            results["group_sizes"].append(int(group))
        if method != "peer":
            results["rows"].append(child(method, int(group)))
        elif not args.no_peer:
            peer = run_peer(int(group), calib, held_out, work)
            results["peer_versions"] = peer.pop("versions")
            print(peer, flush=True)
            results["rows"].append(peer)
        report(results, out)
    shutil.rmtree(work, ignore_errors=True)
    if args.layer_7b:
        results["layer_7b"] = run_layer_7b(args.layer_7b)
        report(results, out)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
