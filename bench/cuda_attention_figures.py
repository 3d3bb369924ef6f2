"""Static figures of the CUDA paged decode kernels (csrc/include/fourbit/paged_attention.cuh),
before and after a change, printed as markdown. Nothing runs on a GPU: every number is a
compile-time fact (ptxas, SASS) or an estimate derived from one, and is labelled so.

    .venv/bin/python bench/cuda_attention_figures.py [--before 24e6c08] [--after WORKTREE]
                                                     [--archs 80,86,89,90,120]

For each version (a git revision of the header, or the working tree) and architecture it
compiles paged_decode_kernel and paged_decode_merge_kernel for every dtype and head_dim
with nvcc -cubin (setup.py's flags) and reads:
  - ptxas -v: registers, spills, stack, static shared memory;
  - the SASS (cuobjdump -sass): the K loop (phase A) and the V loop (phase C) are the
    innermost loops holding 128-bit global loads before and after the block's third barrier;
    in each: 16-byte loads issued before the first instruction that uses one of them (loads in
    flight per thread), whether a 32-bit global load (the page table) precedes them in the same
    iteration (a dependent chain of two memory latencies), and instructions per 16-byte load,
    with nested head loops weighted by the group (4) and by the heads one iteration covers.
Then, for H100 (sm_90: 132 SMs, 3.35 TB/s) at B=1, Hkv=8, group 4, 4K context, in two
launches (page table 4K wide; page table 128K wide as in a CUDA graph captured for long
generations): resident blocks per SM from registers, shared memory and the grid, unique bytes
in flight per SM, and by Little's law the fraction of HBM bandwidth they sustain at 600 and
800 ns latency. The grid and partition rules of each version are restated below
(launch_model); they mirror csrc/cuda/paged_attention.cu at that version.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "csrc/include/fourbit/paged_attention.cuh"
DTYPES = {"fp32": ("float", 4), "fp16": ("__half", 2), "bf16": ("__nv_bfloat16", 2)}
HEAD_DIMS = (64, 80, 96, 128, 256)
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS (torch builds CUDA code with these) and setup.py's.
TORCH_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++20"]
# Per-SM limits by architecture: (max threads, max blocks, shared memory per SM in KiB).
SM_LIMITS = {80: (2048, 32, 164), 86: (1536, 16, 100), 89: (1536, 24, 100), 90: (2048, 32, 228), 120: (1536, 32, 100)}
H100_SMS, H100_BW = 132, 3.35e12
LATENCIES_NS = (600, 800)
GROUP = 4


def tool(name: str) -> str | None:
    """nvcc or cuobjdump: PATH, CUDA_HOME, /usr/local/cuda, then the copy Triton ships."""
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        return path if os.path.exists(path) else None
    except ImportError:
        return None


def header_text(version: str) -> str:
    if version == "WORKTREE":
        with open(os.path.join(ROOT, HEADER)) as f:
            return f.read()
    return subprocess.run(["git", "-C", ROOT, "show", f"{version}:{HEADER}"], check=True, capture_output=True,
                          text=True).stdout


def mangled(kernel: str, ctype: str, d: int) -> str:
    t = {"float": "f", "__half": "6__half", "__nv_bfloat16": "13__nv_bfloat16"}[ctype]
    name = {"decode": "19paged_decode_kernel", "merge": "25paged_decode_merge_kernel"}[kernel]
    return f"_ZN7fourbit4cuda{name}I{t}Li{d}EEEvNS0_17PagedDecodeParamsE"


def compile_version(nvcc: str, text: str, arch: int, workdir: str) -> tuple[str, str]:
    """Compile every instantiation into one cubin; returns (cubin path, ptxas log)."""
    os.makedirs(os.path.join(workdir, "fourbit"), exist_ok=True)
    with open(os.path.join(workdir, "fourbit", "paged_attention.cuh"), "w") as f:
        f.write(text)
    lines = ['#include "fourbit/paged_attention.cuh"']
    for ctype, _ in DTYPES.values():
        for d in HEAD_DIMS:
            for kernel in ("paged_decode_kernel", "paged_decode_merge_kernel"):
                lines.append(f"template __global__ void fourbit::cuda::{kernel}<{ctype}, {d}>"
                             "(const fourbit::cuda::PagedDecodeParams);")
    src = os.path.join(workdir, f"inst_{arch}.cu")
    with open(src, "w") as f:
        f.write("\n".join(lines) + "\n")
    cubin = os.path.join(workdir, f"k_{arch}.cubin")
    cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-Xptxas", "-v", *NVCC_FLAGS, *TORCH_FLAGS, f"-I{workdir}", src,
           "-o", cubin]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"nvcc failed for sm_{arch}:\n{result.stderr[-4000:]}")
    return cubin, result.stderr


def parse_ptxas(log: str) -> dict[str, dict]:
    out, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = out.setdefault(m[1], {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m[1]), spill_st=int(m[2]), spill_ld=int(m[3]))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m[1])
            s = re.search(r"(\d+) bytes smem", line)
            current["static_smem"] = int(s[1]) if s else 0
    return out


# ---- SASS -------------------------------------------------------------------------------------

INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def sass_functions(cuobjdump: str, cubin: str) -> dict[str, list[tuple[int, str]]]:
    text = subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True).stdout
    funcs, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = funcs.setdefault(m[1], [])
            continue
        m = INSN.search(line)
        if m and current is not None:
            current.append((int(m[1], 16), m[2].strip()))
    return funcs


def opcode(ins: str) -> str:
    body = re.sub(r"^@!?U?P\w+\s+", "", ins)
    return body.split()[0] if body else ""


def regs_of(operand: str, width: int = 1) -> set[int]:
    m = re.search(r"\bR(\d+)\b", operand)
    if not m:
        return set()
    base = int(m[1])
    if ".64" in operand:
        width = max(width, 2)
    return set(range(base, base + width))


def operands(ins: str) -> list[str]:
    body = re.sub(r"^@!?U?P\w+\s+", "", ins)
    parts = body.split(None, 1)
    return [p.strip() for p in parts[1].split(",")] if len(parts) > 1 else []


def loops(code: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first index, last index) of every backward branch's range."""
    index = {addr: i for i, (addr, _) in enumerate(code)}
    found = []
    for i, (addr, ins) in enumerate(code):
        if opcode(ins).startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", ins.split("BRA", 1)[1])
            if m and int(m[1], 16) < addr and int(m[1], 16) in index:
                found.append((index[int(m[1], 16)], i))
    return found


def is_ldg128(ins: str) -> bool:
    return opcode(ins).startswith("LDG") and ".128" in opcode(ins)


def in_flight(code: list[tuple[int, str]], lo: int, hi: int) -> tuple[int, bool]:
    """16-byte loads issued in [lo, hi] before an instruction reads one of their registers; and
    whether they wait behind a narrower global load (a page-table entry) issued before them in
    the same iteration with no 16-byte load outstanding (a chain of two memory latencies; a
    table load issued while a 16-byte load is outstanding overlaps it and does not count)."""
    pending, count, narrow_first, overlapped = set(), 0, False, False
    for _, ins in code[lo:hi + 1]:
        op = opcode(ins)
        ops = operands(ins)
        sources = ops if (op.startswith("ST") or op.startswith("BRA") or not ops) else ops[1:]
        if any(regs_of(s) & pending for s in sources):
            break
        if is_ldg128(ins):
            pending |= regs_of(ops[0], 4)
            count += 1
        elif op.startswith("LDG"):
            narrow_first |= count == 0
            overlapped |= count > 0
    return count, narrow_first and not overlapped


def loop_figures(code: list[tuple[int, str]], phase: str, tokens_per_iter: int, team_log2: int) -> dict:
    """The K (phase='K') or V loop: innermost loop with 128-bit global loads before (K) or after (V)
    the third barrier, its loads in flight, instructions per 16-byte load at group GROUP."""
    bars = [i for i, (_, ins) in enumerate(code) if opcode(ins).startswith("BAR")]
    split_at = bars[2] if len(bars) >= 3 else len(code)
    all_loops = loops(code)
    cands = [(lo, hi) for lo, hi in all_loops if any(is_ldg128(ins) for _, ins in code[lo:hi + 1])
             and ((hi < split_at) if phase == "K" else (lo > split_at))]
    if not cands:
        return {}
    # innermost: no other candidate inside it; then the one with the most loads
    inner = [c for c in cands if not any(o != c and c[0] <= o[0] and o[1] <= c[1] for o in cands)]
    lo, hi = max(inner, key=lambda c: sum(is_ldg128(ins) for _, ins in code[c[0]:c[1] + 1]))
    loads = sum(is_ldg128(ins) for _, ins in code[lo:hi + 1])
    flight, chained = in_flight(code, lo, hi)
    # nested loops without global loads: the per-head loops of phase A
    children = [(a, b) for a, b in all_loops if lo < a and b < hi]
    children = [c for c in children if not any(o != c and o[0] <= c[0] and c[1] <= o[1] for o in children)]
    inside = set()
    weighted = 0.0
    heads_main = 1
    for a, b in children:
        shfl = sum(opcode(ins).startswith("SHFL") for _, ins in code[a:b + 1])
        if team_log2:  # a per-head loop of phase A: GROUP heads, `heads` per iteration
            heads = max(1, round(shfl / max(1, tokens_per_iter * team_log2)))
            heads_main = max(heads_main, heads)
            weighted += (b - a + 1) * GROUP / heads
        else:
            weighted += b - a + 1
        inside |= set(range(a, b + 1))
    # forward-skipped remainder code of an unrolled head loop (shuffles outside every child):
    # executed only when the group is not a multiple of the unroll.
    skipped = set()
    if children:
        for i in range(lo, hi + 1):
            ins = code[i][1]
            if i in inside or not opcode(ins).startswith("BRA"):
                continue
            m = re.search(r"0x([0-9a-f]+)", ins.split("BRA", 1)[1])
            if not m:
                continue
            target = next((j for j in range(i, hi + 1) if code[j][0] == int(m[1], 16)), None)
            if target is None or target <= i:
                continue
            region = range(i + 1, target)
            if (not any(j in inside for j in region) and any(opcode(code[j][1]).startswith("SHFL") for j in region)
                    and not any(is_ldg128(code[j][1]) for j in region)):
                skipped |= set(region)
    remainder = 0 if GROUP % heads_main == 0 else 1
    outer = sum(1 for i in range(lo, hi + 1) if i not in inside and (i not in skipped or remainder))
    per_iter = outer + weighted
    return dict(loads=loads, in_flight=flight, chained=chained, per_load=per_iter / max(1, loads), body=hi - lo + 1)


# ---- the kernels' own shapes (restated from each version's source) ---------------------------

def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 2 * next_pow2((x + 1) // 2)


def shape(version: str, elem: int, d: int, group: int) -> dict:
    """Threads per K row, tokens per thread per K-loop iteration, threads in phase C and the
    loads each V vector takes (from the source's constexprs)."""
    vec = 16 // elem
    row_vecs = d // vec
    if version == "before":
        team = 32 if row_vecs >= 32 else next_pow2(row_vecs)
        return dict(k_team=team, k_tokens=1, v_threads=min(group * row_vecs, 128),
                    v_unique_threads=min(row_vecs, 128), v_loads_per_vec=group)
    v_vecs = (row_vecs + 31) // 32
    v_team = cdiv(row_vecs, v_vecs)
    v_teams = 128 // v_team
    k_vecs = cdiv(row_vecs, 8)
    return dict(k_team=8, k_tokens=max(1, 4 // k_vecs), v_threads=v_teams * v_team, v_unique_threads=v_teams * v_team,
                v_loads_per_vec=cdiv(group, 4))


def smem_bytes(version: str, elem: int, d: int, group: int, partition: int, block_size: int) -> int:
    if version == "before":
        return group * (d + partition) * 4
    row_vecs = d * elem // 16
    v_vecs = (row_vecs + 31) // 32
    teams = 128 // cdiv(row_vecs, v_vecs)
    front = max(group * d, teams * 4 * d)
    return (front + group * partition + partition // block_size + 2) * 4


def launch_model(version: str, batch: int, hkv: int, capacity: int, seq_len: int, sms: int, elem: int, d: int,
                 group: int, block_size: int) -> dict:
    """Grid blocks and the blocks that hold tokens, by each version's partition rules."""
    target_bps = 2 if version == "before" else 4
    partition = 512
    while partition > 64 and batch * hkv * cdiv(capacity, partition) < target_bps * sms:
        partition //= 2
    while partition > 64 and smem_bytes(version, elem, d, group, partition, block_size) > 96 * 1024:
        partition //= 2
    splits = cdiv(capacity, partition)
    if version == "before":
        working, tokens = cdiv(seq_len, partition), partition
    else:
        target = min(splits, max(1, cdiv(target_bps * sms, batch * hkv)))
        want = min(splits, max(min(cdiv(seq_len, 64), target), cdiv(seq_len, partition)))
        tokens = min(partition, cdiv(cdiv(seq_len, want), 16) * 16)
        working = cdiv(seq_len, tokens)
    return dict(partition=partition, grid=splits * hkv * batch, working=working * hkv * batch, tokens=tokens,
                smem=smem_bytes(version, elem, d, group, partition, block_size))


def blocks_per_sm(arch: int, regs: int, smem: int, threads: int = 128) -> int:
    max_threads, max_blocks, smem_kib = SM_LIMITS[arch]
    warps = threads // 32
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = (65536 // per_warp) // warps
    by_smem = (smem_kib * 1024) // (smem + 1024) if smem else max_blocks
    return max(0, min(by_regs, by_smem, max_threads // threads, max_blocks))


# ---- report ------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="24e6c08")
    parser.add_argument("--after", default="WORKTREE")
    parser.add_argument("--archs", default="80,86,89,90,120")
    args = parser.parse_args()
    nvcc, cuobjdump = tool("nvcc"), tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        print("cuda_attention_figures: needs nvcc and cuobjdump (CUDA toolkit, or the copy Triton ships)")
        return 1
    supported = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    archs = [int(a) for a in args.archs.split(",") if f"compute_{int(a)}" in supported]
    versions = {"before": args.before, "after": args.after}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {(v, a): (header_text(rev), a, os.path.join(tmp, v)) for v, rev in versions.items() for a in archs}
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            built = dict(zip(jobs, pool.map(lambda j: compile_version(nvcc, *j), jobs.values())))
        ptx = {k: parse_ptxas(log) for k, (_, log) in built.items()}
        sass = {k: sass_functions(cuobjdump, cubin) for k, (cubin, _) in built.items()}

    print(f"# CUDA paged decode: static figures, {versions['before']} (before) vs {versions['after']} (after)\n")
    print("Compile-time facts (nvcc -cubin -O3 --use_fast_math, ptxas -v, cuobjdump -sass) and estimates derived "
          "from them. Nothing here ran on a GPU.\n")
    print("## Registers / spills / shared memory (ptxas; decode kernel, merge kernel)\n")
    print("Dynamic shared memory of the decode kernel at group 4, block size 16, partition 64 / 512 (from each "
          "version's layout formula); spills are bytes stored + loaded.\n")
    print("| arch | dtype | D | regs before | regs after | spills before/after | merge regs before/after | "
          "merge smem after | decode smem B (p=64 / p=512) before | after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for a in archs:
        for dname, (ctype, elem) in DTYPES.items():
            for d in HEAD_DIMS:
                b = ptx[("before", a)].get(mangled("decode", ctype, d), {})
                n = ptx[("after", a)].get(mangled("decode", ctype, d), {})
                mb = ptx[("before", a)].get(mangled("merge", ctype, d), {})
                mn = ptx[("after", a)].get(mangled("merge", ctype, d), {})
                sb = [smem_bytes("before", elem, d, GROUP, p, 16) for p in (64, 512)]
                sn = [smem_bytes("after", elem, d, GROUP, p, 16) for p in (64, 512)]
                print(f"| sm_{a} | {dname} | {d} | {b.get('regs')} | {n.get('regs')} | "
                      f"{b.get('spill_st', 0) + b.get('spill_ld', 0)}/{n.get('spill_st', 0) + n.get('spill_ld', 0)} | "
                      f"{mb.get('regs')}/{mn.get('regs')} | {mn.get('static_smem')} | {sb[0]} / {sb[1]} | "
                      f"{sn[0]} / {sn[1]} |")
    print()
    print("## Main loops (SASS), fp16, group 4\n")
    print("In flight: 16-byte loads a thread issues before it first uses one (static, from the instruction order). "
          "Chained: a 32-bit global load (the page-table entry) precedes them in the iteration with nothing "
          "else outstanding, so each batch of K/V loads waits a memory latency first (the bandwidth estimate "
          "halves it). Instr/16B: instructions per 16-byte load instruction, the head loops "
          "weighted by group 4 / heads per iteration; per unique 16 B of V multiply by the loads each V vector "
          "takes (before: one per query head; after: one per 4 heads).\n")
    print("| arch | D | version | K: in flight | K: chained | K: instr/16B | V: in flight | V: chained | "
          "V: instr/16B load | V: instr/unique 16B | V: threads active / 128 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    loop_data = {}
    for a in archs:
        for d in (64, 128, 256):
            for v in versions:
                code = sass[(v, a)].get(mangled("decode", "__half", d), [])
                s = shape(v, 2, d, GROUP)
                k = loop_figures(code, "K", s["k_tokens"], int(math.log2(s["k_team"])))
                vv = loop_figures(code, "V", 1, 0)
                loop_data[(v, a, d)] = (k, vv, s)
                print(f"| sm_{a} | {d} | {v} | {k.get('in_flight')} | {k.get('chained')} | "
                      f"{k.get('per_load', 0):.1f} | {vv.get('in_flight')} | {vv.get('chained')} | "
                      f"{vv.get('per_load', 0):.1f} | "
                      f"{vv.get('per_load', 0) * s['v_loads_per_vec']:.1f} | {s['v_threads']} |")
    print()
    if 90 not in archs:
        return 0
    print("## Roofline estimate (static): H100 SXM, 132 SMs, 3.35 TB/s; B=1, Hkv=8, group 4, 4K context, fp16\n")
    print("Resident blocks per SM: min(occupancy from registers and shared memory, working blocks / 132). Unique "
          "bytes in flight per SM = resident blocks x threads with distinct addresses x loads in flight x 16 B "
          "(halved when each load waits behind a page-table load). By Little's law the % column is bytes in "
          "flight on all SMs / latency / 3.35 TB/s: under 100% the loads cannot keep HBM busy, at 100% or more "
          "they can (the kernel is then limited elsewhere: HBM itself, instruction issue, the merge, the tail of "
          "a 16 MB read). The 128K-wide table is how a CUDA graph captured for long generations launches at a "
          "4K step.\n")
    print("| D | table width | version | partition | grid blocks | blocks with tokens | regs | smem B | blocks/SM | "
          "K: bytes in flight/SM | K: % of HBM, 600/800 ns | V: bytes in flight/SM | V: % of HBM, 600/800 ns |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d in (64, 128, 256):
        for width in (4096, 131072):
            for v in versions:
                k, vv, s = loop_data[(v, 90, d)]
                regs = ptx[(v, 90)].get(mangled("decode", "__half", d), {}).get("regs", 255)
                lm = launch_model(v, 1, 8, width, 4096, H100_SMS, 2, d, GROUP, 16)
                occ = blocks_per_sm(90, regs, lm["smem"])
                resident = min(occ, lm["working"] / H100_SMS)
                cells = []
                for loop, threads in ((k, 128), (vv, s["v_unique_threads"])):
                    flight = loop.get("in_flight") or 0
                    per_sm = resident * threads * flight * 16 / (2 if loop.get("chained") else 1)
                    pct = [per_sm * H100_SMS / (ns * 1e-9) / H100_BW * 100 for ns in LATENCIES_NS]
                    cells += [f"{per_sm / 1024:.1f} KiB", f"{pct[0]:.0f}% / {pct[1]:.0f}%"]
                print(f"| {d} | {width // 1024}K | {v} | {lm['partition']} | {lm['grid']} | {lm['working']} | {regs} | "
                      f"{lm['smem']} | {resident:.2f} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
