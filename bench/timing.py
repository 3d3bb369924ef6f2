"""Timing that measures the device, not the host, and the record every suite stores.

CPU: pytest-benchmark's own timer (the work is synchronous), each call on the next of
several weight copies that together exceed twice the last-level cache.
CUDA: the calls are captured in a CUDA graph that cycles through several copies of the
weights (together more than twice the L2, so every call reads them from DRAM), the graph
is replayed between CUDA events after warm-up, and the median over replays is kept.
Launch overhead is left out: this is the kernel's time, as under CUDA graphs.

FOURBIT_BENCH_SMOKE=1 (CI, with --benchmark-disable) shrinks every suite to its smallest
case so that the suites keep working; those numbers mean nothing.
"""

from __future__ import annotations

import glob
import itertools
import os
import statistics
import subprocess
import time
from functools import cache

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMOKE = os.environ.get("FOURBIT_BENCH_SMOKE") == "1"


def cache_bytes(device: torch.device) -> int:
    """The largest cache in front of memory: the GPU's L2, or the CPU's last-level cache."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(path).read().strip()
        sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text))
    return max(sizes, default=32 << 20)


def copies_to_rotate(bytes_per_copy: int, device: torch.device) -> int:
    """How many copies make the working set exceed twice the cache, so that every call reads
    its operands from memory (DRAM or HBM), as a model's layers do."""
    return max(2, -(-2 * cache_bytes(device) // max(bytes_per_copy, 1)) + 1)


def cuda_time_us(calls: list, replays: int = 20, warmup: int = 3) -> float:
    """Median time in µs of one call, for calls = [fn on copy 0, fn on copy 1, ...]."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls * warmup:  # compile, autotune, allocate outside the graph
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    per_graph = max(len(calls), 20)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(per_graph):
            calls[i % len(calls)]()
    times = []
    for _ in range(replays + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / per_graph)
    return statistics.median(times[2:])


def measure_us(benchmark, make) -> tuple[float, int]:
    """Time of one call in µs, and the bytes of one operand copy. make() returns (a function
    running the op on a fresh copy of its operands, bytes of that copy); it is called as
    many times as copies_to_rotate asks, and the calls cycle through the copies."""
    fn, nbytes = make()
    calls = [fn] + [make()[0] for _ in range(copies_to_rotate(nbytes, DEVICE) - 1)]
    if benchmark.disabled:  # --benchmark-disable: run once, time loosely
        start = time.perf_counter()
        benchmark(fn)
        return (time.perf_counter() - start) * 1e6, nbytes
    if DEVICE.type == "cuda":
        us = cuda_time_us(calls)
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=3, warmup_rounds=1)
        return us, nbytes
    rotation = itertools.cycle(calls)
    benchmark(lambda: next(rotation)())
    return benchmark.stats.stats.median * 1e6, nbytes


@cache
def copy_bandwidth_gbs(device_str: str) -> float:
    """Copy bandwidth (bytes read + written per second) of this device, measured now: the
    reference for "% of copy bandwidth" in every table."""
    device = torch.device(device_str)
    size = (256 << 20) if device.type == "cuda" else max(256 << 20, 4 * cache_bytes(device))
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        us = cuda_time_us([lambda: dst.copy_(src)], replays=10, warmup=2)
    else:
        dst.copy_(src)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
        us = statistics.median(times) * 1e6
    return 2 * size / (us * 1e-6) / 1e9


@cache
def environment(device_str: str) -> dict:
    """Device, driver, versions and commit, stored with every result."""
    device = torch.device(device_str)
    info = {"torch": torch.__version__, "device_type": device.type}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     "cpu") if os.path.exists("/proc/cpuinfo") else "cpu"
        info["device"] = f"{model}, {torch.get_num_threads()} threads"
        info["driver"] = None
    # The GPU machine gets a copy of the tree without .git: the caller passes FOURBIT_COMMIT.
    info["commit"] = os.environ.get("FOURBIT_COMMIT")
    if not info["commit"]:
        try:
            info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
        except OSError:
            info["commit"] = None
    return info


_BASELINES: dict[tuple, float] = {}


def record(benchmark, op: str, provider: str, us: float, bytes_moved: int, key: dict, flops: int | None = None,
           baseline: str = "torch", **fields) -> None:
    """Store one result in benchmark.extra_info: the case (op and key), µs, GB/s, % of the copy
    bandwidth, TFLOP/s, and the speedup over the baseline provider of the same case, which
    every suite measures just before the others (its first provider)."""
    case = (op, *sorted(key.items()))
    if provider == baseline:
        _BASELINES[case] = us
    base = _BASELINES.get(case)
    gbs = bytes_moved / us / 1e3
    copy_bw = copy_bandwidth_gbs(str(DEVICE))
    benchmark.extra_info.update(
        op=op, provider=provider, **key, us=us, bytes_moved=bytes_moved, gbs=gbs, copy_gbs=copy_bw,
        pct_copy_bw=100 * gbs / copy_bw, tflops=flops / us / 1e6 if flops else None,
        speedup=base / us if base else None, baseline=baseline, smoke=SMOKE, **fields, **environment(str(DEVICE)))
