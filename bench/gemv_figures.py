"""Static figures of the int4 GEMV kernel's main loop (kernels/int4_matmul.py,
int4_gemv_kernel), before and after its rework (issue 12), compiled offline: no GPU.

For each GPU target it compiles the kernel at commit BEFORE (read with `git show`) and the
kernel of the working tree for one config, and reads two things:
- TTGIR: the ops in the body of the K loop (scf.for) that move data between threads:
  tt.reduce, ttg.convert_layout, shared-memory loads/stores, gathers;
- SASS (nvdisasm of the cubin): the main loop, found as the longest backward branch, and the
  instructions in it per 16 bytes of packed weights one thread streams per iteration
  (loop instructions / (BLOCK_N * BLOCK_K / 2 / 16 / threads)), by opcode.

Every figure is a static estimate from compiled code, not a measurement: issue width,
latency, memory bandwidth and occupancy decide the speed, and nothing here ran on a GPU.

    .venv/bin/python bench/gemv_figures.py [--arch 80 86 89 90 120] [--dtype fp16]
        [--group 128] [--config 32x256x4 --config 128x256x4]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "24e6c08"
NUM_WARPS = 4
# Data movement between threads in a TTGIR loop body.
CROSS_THREAD = ("tt.reduce", "ttg.convert_layout", "ttg.local_load", "ttg.local_store", "ttg.local_alloc",
                "tt.gather", "gpu.barrier")


def _module_from_git(commit: str, path: str, tmp: str):
    source = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:{path}"], capture_output=True, text=True,
                            check=True).stdout
    file = os.path.join(tmp, f"int4_matmul_{commit}.py")
    with open(file, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"int4_matmul_{commit}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_gemv(fn, arch: int, dtype: str, group_len: int, block_n: int, block_k: int, split_k: int,
                 num_warps: int = NUM_WARPS, num_stages: int = 2, extra: dict | None = None):
    """The compiled kernel, as bench/kernel_check.py compiles it (pointers and strides
    16-divisible, M/N/K not)."""
    import triton
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    t = f"*{dtype}"
    ptrs = {"x_ptr": t, "qw_ptr": "*i32", "s_ptr": t, "m_ptr": t, "out_ptr": "*fp32"}
    constexprs = {"GROUP_LEN": group_len, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k,
                  **{k: v for k, v in (extra or {}).items() if k in fn.arg_names}}
    sig = {n: "constexpr" if n in constexprs else ptrs.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or (sig[n] == "i32" and n not in ("M", "N", "K"))}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def ttgir_loop_body(ttgir: str) -> list[str]:
    """The lines of the outermost scf.for body of a TTGIR module."""
    lines = ttgir.splitlines()
    for i, line in enumerate(lines):
        if re.search(r"\bscf\.for\b", line):
            indent = len(line) - len(line.lstrip())
            body = []
            for later in lines[i + 1:]:
                if later.strip().startswith("}") and len(later) - len(later.lstrip()) == indent:
                    return body
                body.append(later)
            return body
    return []


def cross_thread_ops(ttgir: str) -> dict:
    counts = collections.Counter()
    for line in ttgir_loop_body(ttgir):
        for op in CROSS_THREAD:
            if re.search(rf'(^|[\s"(]){re.escape(op)}(?![\w.])', line.strip()):
                counts[op] += 1
    return dict(counts)


def _nvdisasm():
    import triton

    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    for candidate in (here, "/usr/local/cuda/bin/nvdisasm"):
        if os.path.exists(candidate):
            return candidate
    return "nvdisasm"


def sass_main_loop(cubin: bytes) -> list[str]:
    """The instructions of the longest loop (a backward branch to a label) in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_nvdisasm(), "-c", f.name], capture_output=True, text=True, check=True).stdout
    instructions, labels = [], {}
    for line in text.splitlines():
        if (m := re.match(r"^(\.L_x_\d+):", line)):
            labels[m[1]] = len(instructions)
        elif (m := re.match(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)):
            instructions.append(m[1])
    best = []
    for j, ins in enumerate(instructions):
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", ins)
        if m and labels.get(m[1], j + 1) <= j and j + 1 - labels[m[1]] > len(best):
            best = instructions[labels[m[1]]:j + 1]
    return best


def opcode(ins: str) -> str:
    return re.sub(r"^@!?U?P[T\d]+\s+", "", ins).split()[0].split(".")[0]


def figures(fn, arch, dtype, group_len, block_n, block_k, split_k, extra=None) -> dict:
    try:
        c = compile_gemv(fn, arch, dtype, group_len, block_n, block_k, split_k, extra=extra)
    except Exception as e:  # an arch this Triton cannot compile for
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
    loop = sass_main_loop(c.asm["cubin"])
    vectors_per_thread = block_n * block_k // 2 // 16 / (NUM_WARPS * 32)
    return {"loop": len(loop), "per16": len(loop) / vectors_per_thread, "ops": collections.Counter(map(opcode, loop)),
            "cross": cross_thread_ops(c.asm["ttgir"]), "shared": c.metadata.shared, **_resources(c.asm["cubin"])}


def _resources(cubin: bytes) -> dict:
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump if os.path.exists(cuobjdump) else "cuobjdump", "-res-usage", f.name],
                             capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return {"registers": int(regs[1]) if regs else None, "local": int(local[1]) if local else None}


def _ops_text(ops: collections.Counter, top: int = 8) -> str:
    return ", ".join(f"{n} {k}" for k, n in ops.most_common(top))


def _resource_job(job):
    from fourbit.kernels import int4_matmul as after

    arch, dtype, group_len, bn, bk, sk, even = job
    try:
        c = compile_gemv(after.int4_gemv_kernel, arch, dtype, group_len, bn, bk, sk,
                         extra={"EVEN_K": even, "FAST_DEQUANT": True})
    except Exception as e:
        return job, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
    return job, {**_resources(c.asm["cubin"]), "shared": c.metadata.shared,
                 "cross": cross_thread_ops(c.asm["ttgir"])}


def _resources_table(after, args) -> int:
    import concurrent.futures

    tiles = sorted({(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in after.gemv_configs()})
    jobs = [(arch, dtype, g, bn, bk, sk, even) for arch in args.arch for dtype in ("fp16", "bf16", "fp32")
            for g in args.groups for bn, bk in tiles for sk in args.splits for even in (True, False)]
    print("| arch | dtype | EVEN_K | compiles | max regs | spilling (local > 0) | errors | max shared | "
          "loops with cross-thread ops |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        for job, r in pool.map(_resource_job, jobs):
            results[job] = r
    bad = 0
    for arch in args.arch:
        for dtype in ("fp16", "bf16", "fp32"):
            for even in (True, False):
                rs = [(j, r) for j, r in results.items() if j[0] == arch and j[1] == dtype and j[6] == even]
                ok = [r for _, r in rs if "error" not in r]
                spills = [j for j, r in rs if r.get("local")]
                cross = [j for j, r in rs if r.get("cross")]
                errors = [j for j, r in rs if "error" in r]
                bad += len(spills) + len(errors) + (len(cross) if even else 0)
                regs = max(((r["registers"] or 0) for r in ok), default="-")
                shared = max((r["shared"] for r in ok), default="-")
                print(f"| sm_{arch} | {dtype} | {even} | {len(rs)} | {regs} | {len(spills)} | {len(errors)} | "
                      f"{shared} | {len(cross)} |")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 86, 89, 90, 120])
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--config", action="append", help="BLOCK_NxBLOCK_KxSPLIT_K of the new kernel")
    parser.add_argument("--resources", action="store_true",
                        help="instead: registers and local memory (spills) of every tile of gemv_configs() for "
                             "every --arch, fp16/bf16/fp32, --groups and --splits, EVEN_K True and False")
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128, 4096])
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("gemv_figures compiles for GPU targets: unset TRITON_INTERPRET")
    sys.path.insert(0, os.path.join(ROOT, "python"))
    from fourbit.kernels import int4_matmul as after

    if args.resources:
        return _resources_table(after, args)

    # The before kernel's config shared by both lists (and the launcher's quick list); the
    # after kernel at that config and at the widest tile of its list.
    before_config = (32, 256, 4)
    configs = [tuple(map(int, c.split("x"))) for c in args.config] if args.config else [(32, 256, 4), (128, 256, 4)]
    with tempfile.TemporaryDirectory() as tmp:
        before = _module_from_git(BEFORE, "kernels/int4_matmul.py", tmp)
        rows = []
        for arch in args.arch:
            rows.append((arch, f"before ({BEFORE})", before_config,
                         figures(before.int4_gemv_kernel, arch, args.dtype, args.group, *before_config)))
            for config in configs:
                rows.append((arch, "after", config,
                             figures(after.int4_gemv_kernel, arch, args.dtype, args.group, *config,
                                     extra={"EVEN_K": True, "FAST_DEQUANT": True})))
    print(f"# int4 GEMV main loop, {args.dtype} activations, group {args.group} "
          "(static estimate from compiled code, not a measurement)\n")
    print("Compiled offline with Triton for each target (4 warps); SASS by nvdisasm. *SASS/16 B*: instructions "
          "of the main loop per 16 bytes of packed weights a thread streams per iteration. *Cross-thread in "
          "loop*: TTGIR ops in the K loop body that move data between threads.\n")
    print("| arch | kernel | BLOCK_N x BLOCK_K, SPLIT_K | SASS in loop | SASS/16 B (static) | regs | local | "
          "cross-thread in loop (TTGIR) | loop by opcode |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arch, kernel, (bn, bk, sk), r in rows:
        if "error" in r:
            print(f"| sm_{arch} | {kernel} | {bn}x{bk}, {sk} | - | - | - | - | - | {r['error']} |")
            continue
        cross = ", ".join(f"{n} {k}" for k, n in sorted(r["cross"].items())) or "none"
        print(f"| sm_{arch} | {kernel} | {bn}x{bk}, {sk} | {r['loop']} | {r['per16']:.0f} | {r['registers']} | "
              f"{r['local']} | {cross} | {_ops_text(r['ops'])} |")
    _roofline([(kernel, config, r) for arch, kernel, config, r in rows if arch == 90 and "error" not in r])
    return 0


# H100 SXM: 132 SMs, 4 warp schedulers per SM issuing one instruction per clock each at
# about 1.98 GHz boost, 3.35 TB/s of HBM3 (published figures, not measured here).
H100 = {"sms": 132, "issue_per_clk": 4, "clock_hz": 1.98e9, "hbm_bytes_s": 3.35e12}


def _roofline(rows) -> None:
    """Issue-bound ceiling of the GEMV on an H100 from the loop's instruction count: a warp
    streams 32 x 16 bytes per `per16` instructions; the SMs issue sms x issue_per_clk warp
    instructions per clock. Latency and occupancy are left out: a ceiling, not a forecast."""
    if not rows:
        return
    print("\nIssue-bound ceiling on an H100 (sm_90 figures; published clock, SM count and HBM bandwidth; an "
          "estimate, nothing measured):\n")
    print("| kernel | tile | weight bytes/s the issue rate allows | % of HBM |")
    print("|---|---|---|---|")
    rate = H100["sms"] * H100["issue_per_clk"] * H100["clock_hz"]
    for kernel, (bn, bk, sk), r in rows:
        bytes_s = rate / r["per16"] * 32 * 16
        print(f"| {kernel} | {bn}x{bk}, {sk} | {bytes_s / 1e12:.2f} TB/s | "
              f"{min(100.0, 100 * bytes_s / H100['hbm_bytes_s']):.0f}% |")


if __name__ == "__main__":
    sys.exit(main())
