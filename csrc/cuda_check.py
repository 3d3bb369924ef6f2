"""Compile every csrc/cuda/*.cu for every target architecture with nvcc against torch's
headers, without linking or running: `make cuda-check`. It works on a CPU-only machine
where nvcc exists (a CPU build of torch ships the CUDA headers), so CI catches compile
errors in code that only a GPU machine can run.

Flags, include paths and architectures are setup.py's own, from csrc/build_flags.py:
FOURBIT_CUDA_ARCHS (default "8.0;8.6;8.9;9.0"), SASS for each and PTX for the newest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, CUDA_HOME, include_paths

import build_flags  # csrc/build_flags.py, next to this file

# setup.py's nvcc flags, plus what BuildExtension adds to them.
NVCC_FLAGS = [*build_flags.NVCC_FLAGS, *(f"-D{name}={value}" for name, value in build_flags.CUDA_DEFINES),
              "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              "-Xcompiler", "-fPIC", *COMMON_NVCC_FLAGS,
              # A CPU build of torch lacks the generated c10/cuda/impl/cuda_cmake_macros.h; it
              # only selects Windows DLL export attributes, so compile-only checks skip it.
              "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]


def main() -> int:
    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    if nvcc is None or not os.path.exists(nvcc):
        print("cuda-check: nvcc not found, nothing to check")
        return 0
    archs = build_flags.cuda_archs()
    gencode = build_flags.gencode_flags(archs)
    label = ";".join(archs)
    includes = [f"-I{p}" for p in [*include_paths(), *build_flags.INCLUDE_DIRS, sysconfig.get_paths()["include"]]]
    sources = [os.path.join(build_flags.ROOT, s) for s in build_flags.cuda_sources()]
    print(f"cuda-check: nvcc {' '.join(gencode)}", flush=True)
    threads = str(max(1, min(4, os.cpu_count() or 1)))
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sources:
            start = time.time()
            cmd = [nvcc, "-c", source, "-o", os.path.join(tmp, os.path.basename(source) + ".o"), "--threads", threads,
                   *NVCC_FLAGS, *gencode, *includes]
            result = subprocess.run(cmd)
            status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
            print(f"cuda-check: {os.path.relpath(source, build_flags.ROOT)} for {label}: {status} "
                  f"in {time.time() - start:.0f} s", flush=True)
            if result.returncode:
                failed.append(source)
    if failed:
        print(f"cuda-check: {len(failed)} of {len(sources)} files failed to compile")
        return 1
    print(f"cuda-check: {len(sources)} files compiled for {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
