"""The launchers of fourbit's kernels: check what the kernel needs, allocate, launch.

One module per engine and op family; nothing here chooses between them (dispatch.py does)
and no user imports them (the ops in ops.py do):

    cpu_int4.py          int4_mm on the C++ CPU kernels (csrc/cpu/, AVX-512 / AVX2 / portable):
                         "cpu" (W4A16), "cpu-a8" (int8 activations, W4A8) and "cpu-int"
                         (fixed-point activations at x's precision)
    cpu_int8.py          int8_mm (int8 weight-only: GGUF Q8_0, int8 heads) on the C++ CPU kernel
    triton_int4.py       int4_mm on the Triton GEMV / GEMM / dequantize kernels (kernels/)
    triton_attention.py  write_kv, paged decode and prefill attention on Triton (kernels/)
    cuda_int4.py         int4_mm on the CUDA tensor-core kernel, its prepacked layout
    cuda_attention.py    write_kv and paged decode attention on CUDA (csrc/cuda/)
    cpu_attention.py     write_kv, paged decode and prefill attention on the C++ CPU kernels

The "torch" backend is reference.py, the executable spec; it runs everywhere.
This module says which backends exist, which op each implements, and whether one can run
on a device in this installation.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

try:
    _C = importlib.import_module("fourbit._C")
except ImportError as _error:  # the package still works, on the reference backend
    _C = None
    warnings.warn(
        f"fourbit: the compiled extension fourbit._C is not available ({_error}); only the "
        "'torch' reference backend will run. Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning, stacklevel=2)

# "cpu-a8" is the CPU int4 kernel on activations quantized to int8 per block of 32 (W4A8,
# reference.int4_mm_a8): other numerics than the rest, so only ever chosen by name.
# "cpu-int" is the same kernel on fixed-point activations (two or three int8 digits per
# value by x's dtype, reference.fixed_point_digits).
BACKENDS = ("torch", "cpu", "triton", "cuda", "cpu-a8", "cpu-int")
OPS = ("int4_mm", "write_kv", "paged_attention", "paged_prefill_attention", "int8_mm")

# The backends that implement each op, besides the reference ("torch", every op).
KERNELS = {
    "int4_mm": ("cpu", "triton", "cuda", "cpu-a8", "cpu-int"),
    "write_kv": ("cpu", "triton", "cuda"),
    "paged_attention": ("cpu", "triton", "cuda"),
    "paged_prefill_attention": ("cpu", "triton"),
    "int8_mm": ("cpu",),
}


# Whether triton (an optional dependency) is installed: looked up once, without importing it
# (importing is slow, and must follow TRITON_INTERPRET). A constant, so torch.compile traces
# through unavailable() without graph breaks.
_TRITON_MISSING = None if importlib.util.find_spec("triton") else "no module named 'triton'"


def check_backend_name(backend: str) -> str:
    """backend itself when it is "auto" or one of BACKENDS; ValueError naming it otherwise.
    The one check every place that takes a backend name uses."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    return backend


def triton_import_error() -> str | None:
    """Why triton cannot be used here (it is not installed), or None."""
    return _TRITON_MISSING


def interpreted() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1, which
    must be set before triton is first imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable(backend: str, device: torch.device, op: str = "int4_mm") -> str | None:
    """Why `backend` cannot run `op` on `device` here, or None when it can."""
    device = torch.device(device)
    if backend == "torch":
        return None
    if backend not in BACKENDS:
        return f"it is not a backend; choose one of {('auto',) + BACKENDS}"
    if backend not in KERNELS[op]:
        return f"fourbit has no {backend!r} kernel for {op} (yet)"
    if backend in ("cpu", "cpu-a8", "cpu-int"):
        if device.type != "cpu":
            return f"it runs on CPU tensors and the inputs are on {device}"
        if _C is None:
            return "the compiled extension fourbit._C is not built"
        entry = f"{op}_cpu" if backend == "cpu" else "int4_a8_mm_cpu"
        return None if hasattr(_C, entry) else f"fourbit._C predates its {backend} {op} kernel; rebuild it"
    if backend == "cuda":
        if device.type != "cuda":
            return f"it runs on CUDA tensors and the inputs are on {device}"
        if _C is None or not hasattr(_C, f"{op}_cuda"):
            return "fourbit._C was built without its CUDA kernels (FOURBIT_CUDA=1 and nvcc build them)"
        return None
    # backend == "triton"
    if triton_import_error() is not None:
        return f"triton is not importable ({triton_import_error()})"
    if device.type == "cuda":
        return None if torch.cuda.get_device_capability(device) >= (8, 0) else "it needs an Ampere or newer GPU"
    if device.type == "cpu" and interpreted():
        return None
    return f"it runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1), the inputs are on {device}"


def available_backends(device: torch.device | str = "cpu", op: str = "int4_mm") -> list[str]:
    """The backends that can run `op` (default int4_mm) on `device` in this installation."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose one of {OPS}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a torch device ({error})") from None
    return [b for b in BACKENDS if unavailable(b, device, op) is None]
