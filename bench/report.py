"""Turn a pytest-benchmark JSON of bench_int4.py into a table of µs and speedups.

    python bench/report.py results.json [--markdown out.md]

Speedups are over the baseline measured in the same run: torch's dense matmul in the same
dtype (fp32 on the CPU). The markdown file names the device, versions, commit and command.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [b["extra_info"] for b in json.load(f)["benchmarks"] if b.get("extra_info", {}).get("op")]


def table(rows: list[dict]) -> tuple[list[str], list[list[str]], dict]:
    by_case = defaultdict(dict)
    for r in rows:
        by_case[(r["shape"], r["dtype"], r["m"])][r["provider"]] = r
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (p != "torch", p))
    header = ["shape", "dtype", "M"] + [f"{p} µs" for p in providers] + \
             [f"{p} speedup" for p in providers if p != "torch"] + ["auto backend"]
    body, speedups = [], defaultdict(list)
    for (shape, dtype, m), case in sorted(by_case.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        base = case.get("torch", {}).get("us")
        line = [shape, dtype, str(m)] + [f"{case[p]['us']:.1f}" if p in case else "-" for p in providers]
        for p in providers:
            if p == "torch":
                continue
            if p in case and base:
                speedups[(p, dtype, m)].append(base / case[p]["us"])
                line.append(f"{base / case[p]['us']:.2f}x")
            else:
                line.append("-")
        line.append(next(iter(case.values())).get("auto_backend", "-"))
        body.append(line)
    medians = {key: statistics.median(v) for key, v in speedups.items()}
    return header, body, medians


def markdown(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json")
    parser.add_argument("--markdown", help="write the full table here")
    args = parser.parse_args()
    rows = load(args.json)
    if not rows:
        raise SystemExit(f"{args.json}: no int4_matmul results")
    env = rows[0]
    header, body, medians = table(rows)
    baseline = "torch fp32 matmul" if env["device_type"] == "cpu" else "torch matmul in the same dtype"
    title = (f"int4 matmul on {env['device']} (driver {env.get('driver') or '-'}, torch {env['torch']}, "
             f"triton {env.get('triton') or '-'}), commit {env.get('commit') or '-'}; group size 128; "
             f"speedup over {baseline}, measured in the same run")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"# {title}\n\nCommand: `pytest bench/bench_int4.py --benchmark-only "
                    f"--benchmark-json=...` then `python bench/report.py`. Weights rotate across copies that together exceed twice the "
                    f"largest cache, so every call reads them from memory.\n\n{markdown(header, body)}\n\n"
                    "Median speedup over the shapes:\n\n" +
                    markdown(["provider", "dtype", "M", "median speedup"],
                             [[p, d, str(m), f"{v:.2f}x"] for (p, d, m), v in sorted(medians.items())]) + "\n")
    print(title)
    print(markdown(["provider", "dtype", "M", "median speedup"],
                   [[p, d, str(m), f"{v:.2f}x"] for (p, d, m), v in sorted(medians.items())]))


if __name__ == "__main__":
    main()
