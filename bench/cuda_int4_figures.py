"""Static figures of the CUDA int4 matmul kernel (csrc/include/fourbit/int4_mma.cuh) before
and after a change, per target architecture and per template (dtype, M tiles): nothing runs,
so every figure is a static estimate read from ptxas and the SASS.

For each version the header is compiled alone (every int4_mma_kernel template instantiated)
with setup.py's nvcc flags to a cubin per architecture, and it reports:
- registers, shared memory (static, per block) and spill bytes, from `ptxas -v`;
- the main loop, found in the SASS as the outermost backward branch whose body holds the
  HMMA instructions: its static instruction count per 16 bytes of weights (a thread's share
  of one K chunk: the count divided by the chunks one trip covers, HMMA / (4 x M tiles)),
  and its global loads, LDG (plain loads: the warp waits for them) and LDGSTS (cp.async);
- resident blocks per SM from the registers and shared memory (and the thread and block
  limits of the architecture), and bytes in flight per SM: (stages - 1) stages issued ahead
  of the one being consumed, times the bytes one stage copies (weights 2048, x 128 per row
  of the tile, plus, when scales and offsets travel in the pipeline, 256 per group row: one
  row, or two at group_len 32), times the resident blocks.

Usage: .venv/bin/python bench/cuda_int4_figures.py [--before REV] [--after REV] [--archs 80,86,...]
(--after defaults to the working tree; nvcc from CUDA_HOME or PATH, cuobjdump from there or
from Triton's bundled copy.)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "csrc"))
import build_flags  # noqa: E402  (csrc/build_flags.py: setup.py's nvcc flags)

HEADER = "csrc/include/fourbit/int4_mma.cuh"
DTYPES = {"__half": "fp16", "__nv_bfloat16": "bf16"}
M_TILES = (1, 2, 4, 8)
THREADS = 128  # kMmaThreads
# Per-SM limits (CUDA programming guide, technical specifications per compute capability):
# max resident threads, max resident blocks, shared memory per SM at the largest carveout.
# Every block also takes 1 KB of shared memory for the system (compute capability >= 8.0).
SM_LIMITS = {
    "80": (2048, 32, 164 * 1024),
    "86": (1536, 16, 100 * 1024),
    "89": (1536, 24, 100 * 1024),
    "90": (2048, 32, 228 * 1024),
    "120": (1536, 32, 100 * 1024),
}
REGS_PER_SMSP = 16384   # 64 K registers per SM in four sub-partitions; a block's 4 warps take one each
REG_UNIT = 256          # registers are allocated per warp in units of 256


def tool(name: str) -> str:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    found = shutil.which(name) or next(iter(glob.glob(os.path.join(cuda_home, "bin", name))), None)
    if found is None and name == "cuobjdump":
        import triton  # Triton wheels bundle cuobjdump

        found = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if found is None or not os.path.exists(found):
        sys.exit(f"cuda_int4_figures: {name} not found")
    return found


def header_source(rev: str | None) -> str:
    if rev is None:
        with open(os.path.join(ROOT, HEADER)) as f:
            return f.read()
    return subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{HEADER}"], check=True, capture_output=True,
                          text=True).stdout


def instantiations() -> str:
    lines = ['#include "fourbit/int4_mma.cuh"', "namespace fourbit { namespace cuda {"]
    lines += [f"template __global__ void int4_mma_kernel<{t}, {m}>(const Int4MmaParams);"
              for t in DTYPES for m in M_TILES]
    return "\n".join([*lines, "}}", ""])


def parse_ptxas(log: str) -> dict:
    """{mangled name: {regs, smem, spill}} from ptxas -v."""
    out, name = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m[1]
            out[name] = {"spill": 0}
        elif name and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            out[name]["spill"] = int(m[1]) + int(m[2])
        elif name and (m := re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)):
            out[name].update(regs=int(m[1]), smem=int(m[2]))
    return out


def parse_sass(text: str) -> dict:
    """{mangled name: [(address, instruction text)]} from cuobjdump -sass."""
    out, name = {}, None
    for line in text.splitlines():
        if m := re.search(r"Function : (\w+)", line):
            name = m[1]
            out[name] = []
        elif name and (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)):
            out[name].append((int(m[1], 16), m[2]))
    return out


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def main_loop(instructions: list) -> list:
    """The instructions of the outermost loop (backward branch) that holds the HMMAs."""
    loops = []
    for addr, text in instructions:
        if opcode(text) == "BRA" and (m := re.search(r"0x([0-9a-f]+)\s*$", text)) and int(m[1], 16) < addr:
            body = [t for a, t in instructions if int(m[1], 16) <= a <= addr]
            if any(opcode(t).startswith("HMMA") for t in body):
                loops.append((int(m[1], 16), addr, body))
    outer = [lp for lp in loops if not any(o[0] <= lp[0] and lp[1] <= o[1] and o is not lp for o in loops)]
    if len(outer) != 1:
        sys.exit(f"cuda_int4_figures: expected one main loop, found {len(outer)}")
    return outer[0][2]


def figures(instructions: list, m_tiles: int) -> dict:
    body = [t for t in main_loop(instructions) if opcode(t) != "NOP"]
    ops = [opcode(t) for t in body]
    chunks_per_trip = sum(o.startswith("HMMA") for o in ops) / (4 * m_tiles)
    return {"loop_per_16B": len(body) / chunks_per_trip,
            "ldg": sum(o.startswith("LDG") and not o.startswith(("LDGSTS", "LDGDEPBAR")) for o in ops),
            "ldgsts": sum(o.startswith("LDGSTS") for o in ops)}


def occupancy(arch: str, regs: int, smem: int) -> tuple[int, str]:
    threads, blocks, smem_sm = SM_LIMITS[arch]
    per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    limits = {"regs": REGS_PER_SMSP // per_warp, "smem": smem_sm // (smem + 1024), "threads": threads // THREADS,
              "blocks": blocks}
    which = min(limits, key=limits.get)
    return limits[which], which


def compile_version(label: str, source: str, arch: str, work: str) -> dict:
    """{(dtype, m_tiles): figures} for one header source on one architecture."""
    d = os.path.join(work, f"{label}-{arch}")
    os.makedirs(os.path.join(d, "fourbit"))
    with open(os.path.join(d, "fourbit", "int4_mma.cuh"), "w") as f:
        f.write(source)
    with open(os.path.join(d, "inst.cu"), "w") as f:
        f.write(instantiations())
    cubin = os.path.join(d, "inst.cubin")
    result = subprocess.run([tool("nvcc"), "-cubin", f"-arch=sm_{arch}", *build_flags.NVCC_FLAGS, "-std=c++20",
                             f"-I{d}", "-Xptxas", "-v", os.path.join(d, "inst.cu"), "-o", cubin],
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"cuda_int4_figures: nvcc failed for {label} sm_{arch}:\n{result.stderr}")
    ptxas = parse_ptxas(result.stderr)
    sass = parse_sass(subprocess.run([tool("cuobjdump"), "-sass", cubin], check=True, capture_output=True,
                                     text=True).stdout)
    stages = int(re.search(r"kMmaStages\s*=\s*(\d+)", source)[1])
    pipelined_scales = "group_bits" in source  # scales and offsets copied with the stage
    out = {}
    for name, info in ptxas.items():
        m = re.search(r"int4_mma_kernelI(\w+?)Li(\d+)E", name)
        dtype = "fp16" if "half" in m[1] else "bf16"
        m_tiles = int(m[2])
        blocks, limiter = occupancy(arch, info["regs"], info["smem"])
        stage_bytes = 2048 + 128 * 8 * m_tiles
        group_rows = (1, 2) if pipelined_scales else (0, 0)
        in_flight = [(stages - 1) * (stage_bytes + 256 * r) * blocks for r in group_rows]
        out[(dtype, m_tiles)] = {**info, **figures(sass[name], m_tiles), "blocks": blocks, "limiter": limiter,
                                 "in_flight": in_flight}
    return out


def arrow(before, after, fmt="{}"):
    b, a = fmt.format(before), fmt.format(after)
    return b if b == a else f"{b} → {a}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="24e6c08", help="git revision of the 'before' header")
    parser.add_argument("--after", default=None, help="git revision of the 'after' header (default: working tree)")
    parser.add_argument("--archs", default="80,86,89,90,120")
    args = parser.parse_args()
    archs = args.archs.split(",")
    sources = {"before": header_source(args.before), "after": header_source(args.after)}
    with tempfile.TemporaryDirectory() as work, concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = {(label, arch): pool.submit(compile_version, label, src, arch, work)
                for arch in archs for label, src in sources.items()}
        results = {key: job.result() for key, job in jobs.items()}
    after = args.after or "working tree"
    print(f"# CUDA int4 matmul: static figures, {args.before} → {after}\n")
    print("Static estimates from ptxas -v and cuobjdump -sass (nvcc "
          f"{' '.join(build_flags.NVCC_FLAGS)}); nothing was run. Loop: the main K loop's static "
          "instruction count (every path of its body) per 16 bytes of weights a thread consumes. "
          "Blocks/SM: from registers, shared memory (+1 KB per block), threads and the block limit; "
          "the limiter in brackets. In flight: (stages - 1) x stage bytes x blocks/SM, the second "
          "figure at group_len 32 (two group rows per stage).\n")
    print("| arch | kernel | registers | smem B | spill B | blocks/SM | loop instr / 16 B | LDG in loop "
          "| LDGSTS in loop | bytes in flight / SM |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch in archs:
        b_all, a_all = results[("before", arch)], results[("after", arch)]
        for key in sorted(b_all):
            b, a = b_all[key], a_all[key]
            flight = lambda r: "/".join(str(v) for v in dict.fromkeys(r["in_flight"]))
            blocks = lambda r: f"{r['blocks']} ({r['limiter']})"
            print(f"| sm_{arch} | {key[0]} x {key[1]} | {arrow(b['regs'], a['regs'])} | {arrow(b['smem'], a['smem'])} "
                  f"| {arrow(b['spill'], a['spill'])} | {arrow(blocks(b), blocks(a))} "
                  f"| {arrow(b['loop_per_16B'], a['loop_per_16B'], '{:.0f}')} | {arrow(b['ldg'], a['ldg'])} "
                  f"| {arrow(b['ldgsts'], a['ldgsts'])} | {arrow(flight(b), flight(a))} |")
    if "90" in archs:
        _roofline(results[("before", "90")], results[("after", "90")])
    spills = [(k, arch) for (label, arch), r in results.items() if label == "after" for k, v in r.items() if v["spill"]]
    if spills:
        print(f"\nspills after the change: {spills}")
        return 1
    return 0


# H100 SXM, published figures (not measured here): 132 SMs, 4 warp schedulers issuing one
# instruction per clock each at about 1.98 GHz, 3.35 TB/s of HBM3, ~700 ns of DRAM latency.
H100 = {"sms": 132, "issue_per_clk": 4, "clock_hz": 1.98e9, "hbm_bytes_s": 3.35e12, "latency_s": 700e-9}


def _roofline(before: dict, after: dict) -> None:
    """Two ceilings on the weight stream of an H100 from the sm_90 figures: issue (a warp
    consumes 32 x 16 bytes of weights per loop_per_16B instructions; the SMs issue sms x
    issue_per_clk warp instructions per clock) and latency (Little's law: bytes in flight on
    every SM over the DRAM latency). Occupancy as computed above; a ceiling, not a forecast."""
    h = H100
    print("\nCeilings on an H100 from the sm_90 figures (published clock, SM count, bandwidth, ~700 ns latency; "
          "estimates, nothing measured), as % of HBM bandwidth:\n")
    print("| kernel | issue-bound before → after | latency-bound (bytes in flight) before → after |")
    print("|---|---|---|")
    rate = h["sms"] * h["issue_per_clk"] * h["clock_hz"]
    for key in sorted(after):
        def issue(r):
            return min(100.0, 100 * rate / r["loop_per_16B"] * 32 * 16 / h["hbm_bytes_s"])

        def latency(r):
            return min(100.0, 100 * min(r["in_flight"]) * h["sms"] / h["latency_s"] / h["hbm_bytes_s"])
        b, a = before[key], after[key]
        print(f"| {key[0]} x {key[1]} | {issue(b):.0f}% → {issue(a):.0f}% | {latency(b):.0f}% → {latency(a):.0f}% |")


if __name__ == "__main__":
    sys.exit(main())
