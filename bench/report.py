"""Tables and plots from pytest-benchmark JSON files written by the bench/ suites.

    python bench/report.py results.json [more.json ...] --markdown out.md [--plots PREFIX]

Every table names the device, versions, commit and command; speedups are over the baseline
measured in the same run (int4 matmul: the dense matmul in the same dtype, fp32 on the CPU;
paged attention: SDPA over contiguous K/V; decode: the same model with float weights).
Plots (PNG, matplotlib): speedup over the baseline against M for each layer shape, with the
memory-bound ideal as a line; decode-attention GB/s against context, with the copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def load(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [b["extra_info"] for b in json.load(f)["benchmarks"] if b.get("extra_info", {}).get("op")]
    return rows


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _providers(rows, baseline: str) -> list[str]:
    return sorted({r["provider"] for r in rows}, key=lambda p: (p != baseline, p))


def int4_table(rows: list[dict]) -> str:
    """µs per provider, and speedups over the dense matmul, per (shape, dtype, M)."""
    cases = defaultdict(dict)
    for r in rows:
        cases[(r["shape"], r["dtype"], r["m"])][r["provider"]] = r
    providers = _providers(rows, "torch")
    others = [p for p in providers if p != "torch"]
    header = ["shape", "dtype", "M"] + [f"{p} µs" for p in providers] + [f"{p} speedup" for p in others] + \
        ["fourbit GB/s (% copy)", "auto backend"]
    body = []
    for (shape, dtype, m), case in sorted(cases.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        best = min((r for p, r in case.items() if p.startswith("fourbit")), key=lambda r: r["us"], default=None)
        body.append([shape, dtype, str(m)] + [_fmt(case[p]["us"], ".1f") if p in case else "-" for p in providers]
                    + [f"{case[p]['speedup']:.2f}x" if p in case and case[p].get("speedup") else "-" for p in others]
                    + [f"{best['gbs']:.0f} ({best['pct_copy_bw']:.0f}%)" if best else "-",
                       next(iter(case.values())).get("auto_backend", "-")])
    return markdown(header, body)


def int4_medians(rows: list[dict]) -> str:
    speedups = defaultdict(list)
    for r in rows:
        if r["provider"] != "torch" and r.get("speedup"):
            speedups[(r["provider"], r["dtype"], r["m"])].append(r["speedup"])
    return markdown(["provider", "dtype", "M", "median speedup over the shapes"],
                    [[p, d, str(m), f"{statistics.median(v):.2f}x"] for (p, d, m), v in sorted(speedups.items())])


def attention_table(rows: list[dict]) -> str:
    cases = defaultdict(dict)
    for r in rows:
        cases[(r["heads"], r["batch"], r["context"], r["dtype"])][r["provider"]] = r
    providers = _providers(rows, "sdpa")
    header = ["heads", "B", "context", "dtype"] + [f"{p} µs" for p in providers] + \
        [f"{p} GB/s (% copy)" for p in providers] + [f"{p} vs sdpa" for p in providers if p != "sdpa"]
    body = []
    for key, case in sorted(cases.items()):
        body.append([key[0], str(key[1]), str(key[2]), key[3]]
                    + [_fmt(case[p]["us"], ".1f") if p in case else "-" for p in providers]
                    + [f"{case[p]['gbs']:.0f} ({case[p]['pct_copy_bw']:.0f}%)" if p in case else "-" for p in providers]
                    + [f"{case[p]['speedup']:.2f}x" if p in case and case[p].get("speedup") else "-"
                       for p in providers if p != "sdpa"])
    return markdown(header, body)


def decode_table(rows: list[dict]) -> str:
    body = []
    for r in sorted(rows, key=lambda r: (r["model"], r["batch"], r["provider"] != "float", r["provider"])):
        extra = f"RSS +{r['rss_gb']:.1f} GB, weights {r['weight_gb']:.1f} GB (fp16: {r['fp16_weight_gb']:.1f} GB), " \
                f"built in {r['build_s']:.0f} s, commit {r.get('commit')}" if r["op"] == "model_memory" else ""
        body.append([r["model"], str(r["batch"]), r["dtype"], r["provider"], f"{r['tokens_per_s']:.1f}",
                     f"{r['speedup']:.2f}x" if r.get("speedup") else "-", f"{r['gbs']:.1f}", extra])
    return markdown(["model", "batch", "float dtype", "provider", "tokens/s per sequence", "vs float",
                     "weights GB/s", "notes"], body)


def _panels(count: int):
    """A figure with `count` panels, four to a row (matplotlib without a display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(4, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return plt, fig, list(axes.flat)[:count]


def _save(plt, fig, axes, path: str) -> None:
    """One legend for the figure (every provider of every panel), then the PNG."""
    labels = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    fig.legend(labels.values(), labels.keys(), loc="lower right", fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_int4(rows: list[dict], path: str) -> None:
    """Speedup over the baseline against M, one panel per shape (first dtype), with the
    memory-bound ideal: baseline weight bytes / int4 weight bytes."""
    dtype = sorted({r["dtype"] for r in rows})[0]
    rows = [r for r in rows if r["dtype"] == dtype]
    shapes = sorted({r["shape"] for r in rows})
    plt, fig, axes = _panels(len(shapes))
    for ax, shape in zip(axes, shapes):
        mine = [r for r in rows if r["shape"] == shape]
        base = {r["m"]: r["weight_bytes"] for r in mine if r["provider"] == "torch"}
        for provider in _providers(mine, "torch")[1:]:
            pts = sorted((r["m"], r["speedup"]) for r in mine if r["provider"] == provider and r.get("speedup"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=provider)
        int4 = [r["weight_bytes"] for r in mine if r["provider"].startswith("fourbit")]
        if base and int4:
            ax.axhline(next(iter(base.values())) / int4[0], color="gray", linestyle="--", label="ideal (bytes)")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape} ({dtype})")
        ax.set_xlabel("M (rows)")
        ax.set_ylabel("speedup over dense")
    _save(plt, fig, axes, path)


def plot_attention(rows: list[dict], path: str) -> None:
    """Decode attention GB/s against context per (heads, B), with the copy bandwidth."""
    groups = sorted({(r["heads"], r["batch"]) for r in rows})
    plt, fig, axes = _panels(len(groups))
    for ax, (heads, batch) in zip(axes, groups):
        mine = [r for r in rows if (r["heads"], r["batch"]) == (heads, batch)]
        for provider in _providers(mine, "sdpa"):
            pts = sorted((r["context"], r["gbs"]) for r in mine if r["provider"] == provider)
            ax.plot(*zip(*pts), marker="o", label=provider)
        ax.axhline(mine[0]["copy_gbs"], color="gray", linestyle="--", label="copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{heads}, B={batch}")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("K/V GB/s")
    _save(plt, fig, axes, path)


def report(rows: list[dict], command: str, plots: str | None) -> str:
    env = rows[0]
    commits = sorted({r.get("commit") or "-" for r in rows})
    by_op = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    parts = [f"# fourbit benchmarks on {env['device']}\n",
             f"Driver {env.get('driver') or '-'}, torch {env['torch']}, triton {env.get('triton') or '-'}, "
             f"commit {', '.join(commits)} (each row's in the JSON); copy bandwidth measured in the run: "
             f"{env['copy_gbs']:.0f} GB/s.\n",
             f"Command: `{command}`. Every provider reads its operands from memory (copies rotated past "
             "twice the largest cache); speedups are over the baseline measured in the same run.\n"]
    if any(r.get("smoke") for r in rows):
        parts.append("**Smoke run (FOURBIT_BENCH_SMOKE=1): the smallest cases only; the numbers mean nothing.**\n")
    if by_op["int4_matmul"]:
        parts += ["## int4 matmul (group size 128)\n", "Baseline: the dense matmul in the same dtype (`torch`).\n",
                  int4_table(by_op["int4_matmul"]), "\nMedian over the shapes:\n", int4_medians(by_op["int4_matmul"])]
        if plots:
            plot_int4(by_op["int4_matmul"], f"{plots}-int4.png")
            parts.append(f"\n![int4 speedup against M]({plots.rsplit('/', 1)[-1]}-int4.png)\n")
    if by_op["paged_attention"]:
        parts += ["\n## Paged decode attention\n", "Baseline: SDPA over contiguous K/V (`sdpa`). GB/s counts the "
                  "K and V that must be read.\n", attention_table(by_op["paged_attention"])]
        if plots:
            plot_attention(by_op["paged_attention"], f"{plots}-attention.png")
            parts.append(f"\n![decode attention GB/s against context]({plots.rsplit('/', 1)[-1]}-attention.png)\n")
    decode = by_op["decode"] + by_op["model_memory"]
    if decode:
        parts += ["\n## End-to-end decode\n", "Tokens per second per sequence, decoding 64 tokens (4 for the 7B memory "
                  "case) after a 32-token prompt, prefill excluded; baseline: the same model with float weights.\n",
                  decode_table(decode)]
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+")
    parser.add_argument("--markdown", help="write the report here")
    parser.add_argument("--plots", help="write PNG plots as PREFIX-int4.png, PREFIX-attention.png")
    parser.add_argument("--command", default="make bench", help="the command named in the report")
    args = parser.parse_args()
    rows = load(args.json)
    if not rows:
        raise SystemExit(f"{args.json}: no fourbit results")
    text = report(rows, args.command, args.plots)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if rows and rows[0]["op"] == "int4_matmul":
        print(int4_medians([r for r in rows if r["op"] == "int4_matmul"]))
    print(text if not args.markdown else f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
