"""Builds fourbit._C from csrc/ and maps kernels/ to the subpackage fourbit.kernels.

C++ sources (csrc/registration.cpp, csrc/cpu/*.cpp) are always built. CUDA sources
(csrc/cuda/*.cu) are built when torch has CUDA and nvcc is found.

Switches (environment variables):
  FOURBIT_CUDA=0/1           force the CUDA sources off / on (1 fails loudly without CUDA)
  FOURBIT_CUDA_ARCHS="..."   compute capabilities, default "8.0;8.6;8.9;9.0"
"""

import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


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


def _sources(pattern: str) -> list[str]:
    # Relative paths keep the build reproducible and the ninja file short.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    sources = ["csrc/registration.cpp"] + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-DNDEBUG", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    cuda_sources = _sources("csrc/cuda/*.cu")
    if _build_cuda() and cuda_sources:
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("FOURBIT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        return CUDAExtension(
            "fourbit._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("FOURBIT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "fourbit._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=["fourbit", "fourbit.models", "fourbit.kernels"],
    package_dir={"fourbit": "python/fourbit", "fourbit.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
