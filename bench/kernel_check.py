"""`make kernel-check`: every Triton kernel compiled offline, for every config its pruner
can select, for every supported GPU target, and every CUDA source through ptxas; no GPU.

For each recorded GPU (python/fourbit/backends/devices.py: RTX 3090 sm_86, RTX 4090 sm_89,
A100 sm_80, H100 sm_90, RTX 5090 sm_120) and dtype the launchers accept, it compiles:
- int4 GEMM and GEMV: every config of the production lists (kernels/int4_matmul.py) whose
  estimated shared memory fits the GPU, i.e. every config the pruner can ever return there
  (its selection only narrows that set), with every pointer and stride 16-divisible (the
  common launch, and the one that pipelines deepest);
- paged attention decode and prefill: the tiles attention_tiles() picks for every promised
  head_dim (64, 80, 96, 128, 256); the cache write, the decode merge and the dequantize
  kernel at the sizes their launchers use;
- csrc/cuda/*.cu: nvcc -Xptxas -v per architecture (registers, shared memory, spills).

It fails when a config the pruner can select does not fit the GPU's shared memory, when
compiled shared memory exceeds the estimate the pruner prunes by (the estimate must be an
upper bound), when a selected config spills registers, or when the pruner leaves no config
for some shape. Results: bench/results/kernels-static.md and .json. Compiled results are
cached in the .json by (kernel source hash, Triton version, target, constexprs, options),
so an unchanged kernel is not recompiled.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = {"fp16": 2, "bf16": 2, "fp32": 4}
# Exact imports keep fp32 offsets (and Q4_K fp32 scales) beside 16-bit activations
# (python/fourbit/format.py): the int4 kernels are also compiled with fp16 x and fp32 scales
# and offsets, at group length 32, the branch that stages scale tiles (bf16 x is the same size).
MIXED = {"fp16+fp32sm": ("fp16", "fp32")}
# Group lengths: 32 takes the several-groups-per-tile branch of every GEMM/GEMV tile wider
# than 32 (scales and offsets loaded per word: the heavier branch), 4096 the one-group branch.
GROUP_LENS = (32, 4096)


def _env():
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernel-check compiles for GPU targets: unset TRITON_INTERPRET")


def _signature(fn, pointers: dict, floats=(), constexprs=()):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _jobs():
    """Every (kernel, target, constexprs, options) to compile, with what the table says."""
    import torch
    import triton
    from fourbit.kernels import int4_matmul as mm
    from fourbit.kernels import paged_attention as pa

    from fourbit.backends import devices
    from fourbit.backends.triton_attention import attention_shared_bytes, attention_tiles

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    jobs = []

    def add(kernel, fn, device, dtype, constexprs, num_warps, num_stages, estimate, label, pointers, floats=()):
        jobs.append({"kernel": kernel, "module": fn.__module__, "fn": fn.__name__, "device": device,
                     "arch": devices.RECORDED[device].arch, "limit": devices.RECORDED[device].max_shared_mem,
                     "dtype": dtype, "constexprs": constexprs, "num_warps": num_warps, "num_stages": num_stages,
                     "estimate": estimate, "config": label,
                     "signature": _signature(fn, pointers, floats, constexprs)})

    for device, props in devices.RECORDED.items():
        for dtype, size in DTYPES.items():
            t = f"*{dtype}"
            io_ptrs = {"x_ptr": t, "qw_ptr": "*i32", "s_ptr": t, "m_ptr": t, "out_ptr": "*fp32"}
            _int4_jobs(add, mm, device, dtype, size, size, io_ptrs, GROUP_LENS)
            for label, (x, sm) in MIXED.items():
                if x == dtype:
                    ptrs = {**io_ptrs, "s_ptr": f"*{sm}", "m_ptr": f"*{sm}"}
                    _int4_jobs(add, mm, device, label, size, DTYPES[sm], ptrs, (32,))
            add("int4_dequantize", mm.int4_dequantize_kernel, device, dtype,
                {"GROUP_LEN": 32, "BLOCK_N": 16, "BLOCK_K": 128}, 4, 3, None, "16x128 w4",
                {"qw_ptr": "*i32", "s_ptr": t, "m_ptr": t, "w_ptr": t})
            kv = {"k_ptr": t, "v_ptr": t, "kc_ptr": t, "vc_ptr": t, "slot_ptr": "*i64"}
            add("write_kv", pa.write_kv_kernel, device, dtype, {"HD": 4096, "BLOCK": 4096}, 4, 3, None, "4096", kv)
            for head_dim in HEAD_DIMS:
                block_d = max(16, triton.next_power_of_2(head_dim))
                bm, bn, w, st = attention_tiles("prefill", head_dim, torch_dtype[dtype], props)
                ce = {"GROUP": 4, "HEAD_DIM": head_dim, "BLOCK_D": block_d, "PAGE": 16, "BLOCK_M": bm,
                      "BLOCK_N": bn, "FP32_DOT": dtype == "fp32"}
                ptrs = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "bt_ptr": "*i32", "sl_ptr": "*i32", "qsl_ptr": "*i32",
                        "out_ptr": t}
                add("paged_prefill", pa.paged_prefill_kernel, device, dtype, ce, w, st,
                    attention_shared_bytes(bm, bn, st, head_dim, size), f"D{head_dim} {bm}x{bn} w{w} s{st}", ptrs,
                    ("scale",))
                bg, bn, w, st = attention_tiles("decode", head_dim, torch_dtype[dtype], props, group=8)
                ce = {"GROUP": 8, "BLOCK_G": bg, "HEAD_DIM": head_dim, "BLOCK_D": block_d, "PAGE": 16,
                      "BLOCK_N": bn, "FP32_DOT": dtype == "fp32"}
                ptrs = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "bt_ptr": "*i32", "sl_ptr": "*i32", "out_ptr": "*fp32",
                        "lse_ptr": "*fp32"}
                add("paged_decode", pa.paged_decode_kernel, device, dtype, ce, w, st,
                    attention_shared_bytes(bg, bn, st, head_dim, size), f"D{head_dim} {bg}x{bn} w{w} s{st}", ptrs,
                    ("scale",))
                add("decode_merge", pa.paged_decode_merge_kernel, device, dtype,
                    {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_S": 64, "BLOCK_N": bn}, 4, 3, None,
                    f"D{head_dim} S64", {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": t, "sl_ptr": "*i32"})
    return jobs


def _int4_jobs(add, mm, device: str, dtype: str, size: int, s_size: int, io_ptrs: dict, group_lens) -> None:
    """The int4 GEMM and GEMV compiles of one activation dtype (size bytes) with scales and
    offsets of s_size bytes: every config the pruner may keep (fits by its estimate)."""
    from fourbit.backends import devices

    props = devices.RECORDED[device]
    for group_len in group_lens:
        for c in mm.gemm_configs_for(mm.gemm_configs(), size):
            kw = c.kwargs
            estimate = mm.gemm_shared_bytes(c, size, group_len, s_size)
            if estimate > props.max_shared_mem:
                continue
            ce = {"GROUP_LEN": group_len, "FP32_DOT": size == 4, **kw}
            label = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K} sk{SPLIT_K}".format(**kw) + f" w{c.num_warps} s{c.num_stages}"
            add("int4_gemm", mm.int4_gemm_kernel, device, dtype, ce, c.num_warps, c.num_stages, estimate,
                f"{label} g{group_len}", io_ptrs)
        for c in mm.gemv_configs():
            kw = c.kwargs
            estimate = mm.gemv_shared_bytes(c, size, s_size)
            if estimate > props.max_shared_mem:
                continue
            # The launch on a GPU: whole vectors in bounds (K % 32 == 0), PTX nibble conversion.
            ce = {"GROUP_LEN": group_len, "EVEN_K": True, "FAST_DEQUANT": True, **kw}
            label = "{BLOCK_N}x{BLOCK_K} sk{SPLIT_K}".format(**kw) + f" w{c.num_warps} s{c.num_stages}"
            add("int4_gemv", mm.int4_gemv_kernel, device, dtype, ce, c.num_warps, c.num_stages, estimate,
                f"{label} g{group_len}", io_ptrs)


def _fn(job):
    import importlib

    return getattr(importlib.import_module(job["module"]), job["fn"])


@functools.cache
def _kernel_source_hash(module_name: str) -> str:
    """The hash of every @triton.jit function's source in a kernels module (a kernel and the
    helpers it calls live in one module). Config lists, pruners and line numbers are not part
    of it: editing those recompiles nothing that did not change."""
    import importlib
    import inspect

    import triton

    module = importlib.import_module(module_name)
    sources = [f"{name}\n{inspect.getsource(obj.fn)}" for name, obj in sorted(vars(module).items())
               if isinstance(obj, triton.runtime.jit.JITFunction)]
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()


def _cache_key(job) -> str:
    import triton

    ident = {k: job[k] for k in ("fn", "arch", "constexprs", "num_warps", "num_stages", "signature")}
    return hashlib.sha256(json.dumps([_kernel_source_hash(job["module"]), triton.__version__, ident],
                                     sort_keys=True).encode()).hexdigest()


def _compile(job) -> dict:
    """Compile one job offline; shared memory from Triton, registers and spills from ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget

    _env()
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # ptxas's log is only printed by a real compile
    fn = _fn(job)
    sig = job["signature"]
    # Every pointer and integer argument 16-divisible (tt.divisibility), as a launch with
    # aligned tensors and strides specializes them.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or (sig[name] == "i32" and name not in ("M", "N", "K", "num_slots"))}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=job["constexprs"], attrs=attrs)
    log = io.StringIO()
    start = time.time()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                                      options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    except Exception as e:  # an arch Triton cannot compile this for, or a compiler error
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    text = log.getvalue()
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", text)]
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", text)]
    return {"shared": compiled.metadata.shared, "registers": max(regs) if regs else None,
            "spills": max(spills) if spills else None, "seconds": round(time.time() - start, 2)}


def _save_partial(json_path, cache):
    # An interrupted run keeps what it compiled (the final write replaces this).
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path + ".tmp", "w") as f:
        json.dump({"cache": cache}, f)
    os.replace(json_path + ".tmp", json_path)


def _check_selection(failures):
    """The pruners leave configs for every shape on every GPU (M 5..511 on the GEMM)."""
    from fourbit.kernels import int4_matmul as mm

    from fourbit.backends import devices

    counts = {}
    for device, props in devices.RECORDED.items():
        variants = [(dtype, size, size) for dtype, size in DTYPES.items()] + \
            [(label, DTYPES[x], DTYPES[sm]) for label, (x, sm) in MIXED.items()]
        for dtype, size, s_size in variants:
            for group_len in (32, 64, 128, 256, 4096):
                for n in (512, 1000, 4096, 11008, 14336, 128256):
                    for k in (576, 4096, 14336):
                        kept = mm.select_gemv(mm.gemv_configs(), n, k, size, props, s_size)
                        counts.setdefault((device, "int4_gemv"), set()).update(map(str, kept))
                    for m_bucket in (8, 16, 32, 64, 128, 256, 512):
                        try:
                            kept = mm.select_gemm(mm.gemm_configs(), m_bucket, n, size, group_len, props, s_size)
                        except RuntimeError as e:
                            failures.append(f"int4_gemm {device} {dtype} M_BUCKET={m_bucket} N={n}: {e}")
                            continue
                        bad = [c for c in kept
                               if mm.gemm_shared_bytes(c, size, group_len, s_size) > props.max_shared_mem]
                        if bad:
                            failures.append(f"int4_gemm {device} {dtype}: pruner kept non-fitting {bad}")
                        counts.setdefault((device, "int4_gemm"), set()).update(map(str, kept))
    return {f"{d} {k}": len(v) for (d, k), v in counts.items()}


def _cuda(cache: dict, failures: list) -> list[dict]:
    """ptxas's registers, shared memory and spills for every kernel of csrc/cuda/*.cu per arch."""
    import shutil
    import tempfile

    sys.path.insert(0, os.path.join(ROOT, "csrc"))
    from torch.utils.cpp_extension import include_paths

    import build_flags
    import cuda_check

    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        print("kernel-check: nvcc not found, CUDA sources not checked")
        return []
    includes = [f"-I{p}" for p in [*include_paths(), *build_flags.INCLUDE_DIRS, sysconfig.get_paths()["include"]]]
    archs = [80, 86, 89, 90, 120]
    # What the .cu files can include: the device headers (.cuh), csrc/cuda's own, and csrc/ops.h;
    # not the CPU kernels' .h headers beside the .cuh ones, which would only void the cache.
    headers = sorted(os.path.join(d, f) for d, suffixes in ((os.path.join(ROOT, "csrc", "include", "fourbit"), ".cuh"),
                                                           (os.path.join(ROOT, "csrc", "cuda"), (".cuh", ".h")))
                     for f in os.listdir(d) if f.endswith(suffixes)) + [os.path.join(ROOT, "csrc", "ops.h")]
    rows = []
    for rel in build_flags.cuda_sources():
        source = os.path.join(ROOT, rel)
        digest = hashlib.sha256()
        for path in [source, *headers]:
            with open(path, "rb") as f:
                digest.update(f.read())
        digest.update(json.dumps([cuda_check.NVCC_FLAGS, archs, subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True).stdout]).encode())
        key = "nvcc:" + digest.hexdigest()
        if key not in cache:
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            with tempfile.TemporaryDirectory() as tmp:
                result = subprocess.run([nvcc, "-c", source, "-o", os.path.join(tmp, "k.o"), "--threads", "2",
                                         "-Xptxas", "-v", *cuda_check.NVCC_FLAGS, *gencode, *includes],
                                        capture_output=True, text=True)
            if result.returncode:
                failures.append(f"{rel}: nvcc failed\n{result.stderr[-2000:]}")
                continue
            cache[key] = _parse_ptxas(result.stderr)
        for row in cache[key]:
            rows.append({"source": rel, "key": key, **row})
            if row["spills"]:
                failures.append(f"{rel} {row['function']} sm_{row['arch']}: spills {row['spills']} bytes")
    return rows


def _parse_ptxas(log: str) -> list[dict]:
    rows, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            current = {"function": m[1], "arch": int(m[2]), "registers": 0, "shared": 0, "spills": 0}
            rows.append(current)
        elif current is not None:
            if (m := re.search(r"(\d+) bytes spill stores", line)):
                current["spills"] = int(m[1])
            if (m := re.search(r"Used (\d+) registers", line)):
                current["registers"] = int(m[1])
            if (m := re.search(r"(\d+) bytes smem", line)):
                current["shared"] = int(m[1])
    return rows


def _demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
        return [re.sub(r"\(.*", "", o) for o in out]
    except OSError:
        return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc half")
    args = parser.parse_args()
    _env()
    import triton

    start = time.time()
    json_path = os.path.join(args.out, "kernels-static.json")
    cache = {}
    if os.path.exists(json_path):
        with open(json_path) as f:
            cache = json.load(f).get("cache", {})
    jobs = _jobs()
    failures = []
    for job in jobs:
        job["key"] = _cache_key(job)
    todo = [j for j in jobs if j["key"] not in cache]
    print(f"kernel-check: {len(jobs)} Triton compiles, {len(jobs) - len(todo)} cached, {len(todo)} to do "
          f"({args.jobs} processes)", flush=True)
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        for i, (job, result) in enumerate(zip(todo, pool.map(_compile, todo, chunksize=4))):
            cache[job["key"]] = result
            if (i + 1) % 50 == 0:
                _save_partial(json_path, cache)
                print(f"kernel-check: {i + 1}/{len(todo)} compiled, {time.time() - start:.0f} s", flush=True)
    rows = []
    for job in jobs:
        result = cache[job["key"]]
        row = {k: job[k] for k in ("kernel", "device", "arch", "dtype", "config", "num_warps", "num_stages",
                                   "estimate", "limit", "key")}
        row.update(result)
        rows.append(row)
        where = f"{job['kernel']} {job['device']} (sm_{job['arch']}) {job['dtype']} {job['config']}"
        if "error" in result:
            failures.append(f"{where}: does not compile: {result['error']}")
            continue
        if result["shared"] > job["limit"]:
            failures.append(f"{where}: {result['shared']} B shared > {job['limit']} B")
        if job["estimate"] is not None and result["shared"] > job["estimate"]:
            failures.append(f"{where}: {result['shared']} B shared > the pruner's estimate {job['estimate']} B")
        if result["spills"]:
            failures.append(f"{where}: spills {result['spills']} bytes")
    selected = _check_selection(failures)
    cuda_rows = [] if args.no_cuda else _cuda(cache, failures)
    used = {r["key"] for r in rows} | {r["key"] for r in cuda_rows}
    elapsed = time.time() - start
    # No run time in the files: a run that changes nothing leaves the committed table as it is.
    report = {"triton": triton.__version__, "failures": failures,
              "selected_configs": selected, "triton_rows": rows, "cuda_rows": cuda_rows,
              "cache": {k: v for k, v in cache.items() if k in used}}
    os.makedirs(args.out, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    with open(os.path.join(args.out, "kernels-static.md"), "w") as f:
        f.write(_markdown(report))
    for failure in failures:
        print("kernel-check: FAIL", failure)
    print(f"kernel-check: {len(rows)} Triton compiles, {len(cuda_rows)} CUDA kernels; {len(failures)} failures; "
          f"{elapsed:.0f} s", flush=True)
    return 1 if failures else 0


def _markdown(report) -> str:
    lines = ["# Static kernel check (`make kernel-check`)", "",
             f"Triton {report['triton']}, compiled offline (no GPU); every pointer and stride 16-divisible. "
             "Shared memory in bytes (Triton's metadata), registers and spill stores from ptxas; "
             "GEMM/GEMV configs count once per group-length branch (g32, g4096). "
             "Nothing here is measured on a GPU.", "",
             "## Triton kernels per GPU", "",
             "| kernel | GPU | dtype | configs | max shared | limit | max compiled/estimate | max regs | spills "
             "| errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in report["triton_rows"]:
        groups.setdefault((r["kernel"], r["device"], r["dtype"]), []).append(r)
    for (kernel, device, dtype), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        ratio = [r["shared"] / r["estimate"] for r in ok if r["estimate"]]
        ratio_text = f"{max(ratio):.2f}" if ratio else "-"
        regs = max((r["registers"] or 0 for r in ok), default="-")
        lines.append(f"| {kernel} | {device} (sm_{rs[0]['arch']}) | {dtype} | {len(rs)} | "
                     f"{max((r['shared'] for r in ok), default='-')} | {rs[0]['limit']} | {ratio_text} | {regs} | "
                     f"{sum(r['spills'] or 0 for r in ok)} | {len(rs) - len(ok)} |")
    lines += ["", "## Attention tiles (attention_tiles)", "",
              "| kernel | GPU | dtype | tile | shared | regs | spills |", "|---|---|---|---|---|---|---|"]
    for r in report["triton_rows"]:
        if r["kernel"] in ("paged_prefill", "paged_decode"):
            lines.append(f"| {r['kernel']} | {r['device']} | {r['dtype']} | {r['config']} | {r.get('shared', '-')} | "
                         f"{r.get('registers', '-')} | {r.get('spills', '-')} |")
    if report["cuda_rows"]:
        names = _demangle([r["function"] for r in report["cuda_rows"]])
        lines += ["", "## CUDA kernels (nvcc -Xptxas -v)", "", "| source | kernel | arch | regs | shared | spills |",
                  "|---|---|---|---|---|---|"]
        for r, name in zip(report["cuda_rows"], names):
            lines.append(f"| {r['source']} | `{name[:90]}` | sm_{r['arch']} | {r['registers']} | {r['shared']} | "
                         f"{r['spills']} |")
    lines += ["", f"Configs the pruners select over the checked shapes: {report['selected_configs']}", "",
              f"Failures: {len(report['failures'])}", *[f"- {f}" for f in report["failures"]], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
