"""Compile every csrc/cuda/*.cu for every target architecture with nvcc against torch's
headers, without linking or running: `make cuda-check`. It works on a CPU-only machine
where nvcc exists (a CPU build of torch ships the CUDA headers), so CI catches compile
errors in code that only a GPU machine can run.

Architectures: FOURBIT_CUDA_ARCHS (default "8.0;8.6;8.9;9.0", as setup.py).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, CUDA_HOME, include_paths

CSRC = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"
# What setup.py passes to nvcc (extra_compile_args["nvcc"]), plus what BuildExtension adds.
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo", "-std=c++20", "-DFOURBIT_WITH_CUDA=1",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-Xcompiler", "-fPIC",
              *COMMON_NVCC_FLAGS,
              # A CPU build of torch lacks the generated c10/cuda/impl/cuda_cmake_macros.h; it
              # only selects Windows DLL export attributes, so compile-only checks skip it.
              "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]


def gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        cc = arch.strip().replace(".", "")
        if cc:
            flags += ["-gencode", f"arch=compute_{cc},code=sm_{cc}"]
    return flags


def main() -> int:
    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    if nvcc is None or not os.path.exists(nvcc):
        print("cuda-check: nvcc not found, nothing to check")
        return 0
    archs = os.environ.get("FOURBIT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    includes = [f"-I{p}" for p in include_paths() + [os.path.join(CSRC, "include"), CSRC,
                                                      sysconfig.get_paths()["include"]]]
    sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    threads = str(max(1, min(4, os.cpu_count() or 1)))
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sources:
            start = time.time()
            cmd = [nvcc, "-c", source, "-o", os.path.join(tmp, os.path.basename(source) + ".o"), "--threads", threads,
                   *NVCC_FLAGS, *gencode_flags(archs), *includes]
            result = subprocess.run(cmd)
            status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
            print(f"cuda-check: {os.path.relpath(source, os.path.dirname(CSRC))} for {archs}: {status} "
                  f"in {time.time() - start:.0f} s", flush=True)
            if result.returncode:
                failed.append(source)
    if failed:
        print(f"cuda-check: {len(failed)} of {len(sources)} files failed to compile")
        return 1
    print(f"cuda-check: {len(sources)} files compiled for {archs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
