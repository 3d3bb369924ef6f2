"""Run the benchmark suites for this machine's device and write its report.

    python bench/run.py                      # bench_int4, bench_attention, bench_model (not slow)
    python bench/run.py --slow               # the slow cases only (Llama-2-7B), merged into the report
    python bench/run.py --out DIR --save     # results elsewhere; keep a copy for --benchmark-compare

Writes, for a device named e.g. "cpu" or "nvidia-h100-80gb-hbm3":
    DIR/<device>.json (and <device>-slow.json)   pytest-benchmark results with extra_info
    DIR/<device>.md                              tables (bench/report.py), from every JSON above
    DIR/<device>-int4.png, -attention.png        plots
`make bench` and `fourbit bench` call this; `make gpu-check` too, on a GPU machine.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SUITES = ["bench_int4.py", "bench_attention.py", "bench_model.py"]


def device_slug() -> str:
    import torch
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(BENCH / "results"))
    parser.add_argument("--slow", action="store_true", help="run the slow cases (marked slow) instead")
    parser.add_argument("--save", action="store_true", help="also save the run under bench/history for "
                        "pytest-benchmark's --benchmark-compare")
    parser.add_argument("--suites", nargs="+", default=SUITES)
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = device_slug()
    name = f"{slug}-slow" if args.slow else slug
    cmd = [sys.executable, "-m", "pytest", *[str(BENCH / s) for s in args.suites], "--benchmark-only", "-q",
           "-p", "no:cacheprovider", "-m", "slow" if args.slow else "not slow", f"--benchmark-json={out / name}.json",
           *args.pytest_args]
    if args.save:
        cmd += [f"--benchmark-storage=file://{BENCH / 'history'}", f"--benchmark-save={name}"]
    print(" ".join(cmd), flush=True)
    status = subprocess.call(cmd, cwd=ROOT)
    jsons = [str(p) for p in (out / f"{slug}.json", out / f"{slug}-slow.json") if p.exists()]
    if jsons:
        command = "python bench/run.py" + (" --slow" if len(jsons) > 1 else "")
        subprocess.call([sys.executable, str(BENCH / "report.py"), *jsons, "--markdown", str(out / f"{slug}.md"),
                         "--plots", str(out / slug), "--command", command], cwd=ROOT)
    return status


if __name__ == "__main__":
    sys.exit(main())
