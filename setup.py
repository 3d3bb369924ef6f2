"""Builds fourbit._C from csrc/ and maps kernels/ to the subpackage fourbit.kernels.

C++ sources (csrc/registration.cpp, csrc/cpu/*.cpp) are always built. CUDA sources
(csrc/cuda/*.cu) are built when torch has CUDA and nvcc is found. Flags, include paths and
target architectures come from csrc/build_flags.py, which `make cuda-check` uses too.

Switches (environment variables):
  FOURBIT_CUDA=0/1           force the CUDA sources off / on (1 fails loudly without CUDA)
  FOURBIT_CUDA_ARCHS="..."   compute capabilities, default "8.0;8.6;8.9;9.0"; the newest
                             also gets PTX, so that later GPUs can run the kernels (JIT)
"""

import os
import shutil
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "csrc"))
import build_flags  # noqa: E402  (csrc/build_flags.py, found through the line above)


def _nvcc_found() -> bool:
    return CUDA_HOME is not None or shutil.which("nvcc") is not None


def _build_cuda() -> bool:
    flag = os.environ.get("FOURBIT_CUDA")
    cuda_possible = torch.version.cuda is not None and _nvcc_found()
    if flag == "1":
        if not cuda_possible:
            raise RuntimeError(
                "FOURBIT_CUDA=1 but CUDA cannot be built here: "
                f"torch.version.cuda={torch.version.cuda!r}, nvcc found={_nvcc_found()}"
            )
        return True
    if flag == "0":
        return False
    return cuda_possible


def _extension():
    sources = build_flags.cpp_sources()
    cuda_sources = build_flags.cuda_sources()
    # Copies: torch's BuildExtension appends its own flags to these lists.
    common = dict(include_dirs=list(build_flags.INCLUDE_DIRS), extra_link_args=list(build_flags.LINK_FLAGS))
    cxx_flags = list(build_flags.CXX_FLAGS)
    if _build_cuda() and cuda_sources:
        # Explicit -gencode flags: torch then adds none of its own (TORCH_CUDA_ARCH_LIST is
        # not read), so the build targets exactly what `make cuda-check` compiles.
        nvcc_flags = build_flags.NVCC_FLAGS + build_flags.gencode_flags(build_flags.cuda_archs())
        return CUDAExtension(
            "fourbit._C",
            sources + cuda_sources,
            define_macros=list(build_flags.CUDA_DEFINES),
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            **common,
        )
    return CppExtension("fourbit._C", sources, extra_compile_args={"cxx": cxx_flags}, **common)


setup(
    # Every package under python/ (fourbit and its subpackages), and kernels/ as fourbit.kernels.
    packages=find_packages("python") + ["fourbit.kernels"],
    package_dir={"fourbit": "python/fourbit", "fourbit.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
