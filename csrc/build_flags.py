"""The build facts, in one place: how fourbit._C is compiled (setup.py builds it,
csrc/cuda_check.py compile-checks the CUDA half with the same flags) and which packages a
development environment needs (the Makefile installs what pyproject.toml lists).

It imports nothing outside the standard library, so it works before torch is installed.

Target architectures: FOURBIT_CUDA_ARCHS, compute capabilities separated by ";" (or "," or
spaces), default DEFAULT_CUDA_ARCHS. Each one gets its SASS (code=sm_XY). The newest also
gets its PTX (code=compute_XY), which the driver compiles at load time for GPUs newer than
every listed one (sm_100, sm_120); an entry written "X.Y+PTX" picks that one instead.

As a command, for the Makefile: `python csrc/build_flags.py requirements EXTRA...` prints
pyproject.toml's build requirements, dependencies and the named extras, one a line.
"""

from __future__ import annotations

import os
import re
import sys

CSRC = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(CSRC)

DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"
# Headers: csrc/include/fourbit/*.cuh (torch-free device code) and csrc/*.h.
INCLUDE_DIRS = [os.path.join(CSRC, "include"), CSRC]
CXX_FLAGS = ["-O3", "-DNDEBUG", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
# Defined when the CUDA sources are part of the build (registration.cpp registers them).
CUDA_DEFINES = [("FOURBIT_WITH_CUDA", "1")]
# -lineinfo: compute-sanitizer and Nsight map device code back to source lines.
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]


def cpp_sources() -> list[str]:
    """The C++ sources of fourbit._C, relative to the repository root."""
    return ["csrc/registration.cpp"] + _sources("csrc/cpu/*.cpp")


def cuda_sources() -> list[str]:
    """The CUDA sources of fourbit._C, relative to the repository root."""
    return _sources("csrc/cuda/*.cu")


def _sources(pattern: str) -> list[str]:
    import glob

    # Relative paths keep the build reproducible and the ninja file short.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def cuda_archs() -> list[str]:
    """FOURBIT_CUDA_ARCHS (or the default) as a list: ["8.0", "8.6", "8.9", "9.0+PTX"].

    Unless an entry already says "+PTX", the newest architecture gets it.
    """
    archs = [a for a in re.split(r"[;,\s]+", os.environ.get("FOURBIT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)) if a]
    if not archs:
        raise ValueError("FOURBIT_CUDA_ARCHS names no architecture")
    versions = [_version(a) for a in archs]
    if not any(a.endswith("+PTX") for a in archs):
        archs[versions.index(max(versions))] += "+PTX"
    return archs


def _version(arch: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\.(\d+)[a-z]?(\+PTX)?", arch)
    if match is None:
        raise ValueError(f"FOURBIT_CUDA_ARCHS: {arch!r} is not a compute capability such as 8.6, 9.0a or 9.0+PTX")
    return int(match[1]), int(match[2])


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc's -gencode flags for cuda_archs(): SASS for each, PTX where "+PTX" says."""
    flags = []
    for arch in archs:
        cc = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if arch.endswith("+PTX"):
            # Arch-specific features (9.0a) do not carry forward: the PTX is the plain one.
            plain = cc.rstrip("abcdefghijklmnopqrstuvwxyz")
            flags.append(f"-gencode=arch=compute_{plain},code=compute_{plain}")
    return flags


def requirements(*extras: str) -> list[str]:
    """pyproject.toml's [build-system] requires, [project] dependencies and the named
    extras (following references such as "fourbit[test]"), in order, without repeats."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the copy of tomli that pip carries
        from pip._vendor import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    name = pyproject["project"]["name"]
    optional = pyproject["project"].get("optional-dependencies", {})
    found = list(pyproject["build-system"]["requires"]) + list(pyproject["project"]["dependencies"])
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r} (it has: {', '.join(optional)})")
        seen.add(extra)
        for req in optional[extra]:
            self_ref = re.fullmatch(rf"{re.escape(name)}\s*\[([^\]]*)\]", req.strip())
            if self_ref:
                todo += [e.strip() for e in self_ref[1].split(",")]
            else:
                found.append(req)
    return list(dict.fromkeys(found))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "requirements":
        sys.exit("usage: python csrc/build_flags.py requirements [EXTRA...]")
    print("\n".join(requirements(*sys.argv[2:])))
