"""Public functional ops, their fakes, and the dispatch to a backend.

Every op has one schema (csrc/registration.cpp, TORCH_LIBRARY(fourbit)), one fake (here,
for torch.compile and meta tensors), one reference (reference.py) and its backends:

    "torch"   reference.py: plain PyTorch, any device, the executable spec
    "cpu"     C++ kernel in csrc/cpu/ (AVX-512 / AVX2 / portable, chosen at run time)
    "triton"  Triton kernels in kernels/ (CUDA; on the CPU through TRITON_INTERPRET=1)
    "cuda"    CUDA kernels in csrc/cuda/ (tensor cores) - lands with the CUDA issue

`backend="auto"` asks choose_backend(); any other name forces that backend and raises
RuntimeError when it cannot run here.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from . import reference
from .format import COMPUTE_DTYPES, Int4Weight

try:
    _C = importlib.import_module(f"{__package__}._C")
except ImportError as _error:  # the package still works, on the reference backend
    _C = None
    warnings.warn(
        f"fourbit: the compiled extension fourbit._C is not available ({_error}); only the "
        "'torch' reference backend will run. Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning, stacklevel=2)

BACKENDS = ("torch", "cpu", "triton", "cuda")


def _unavailable(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run int4_mm on `device` here, or None when it can."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"it runs on CPU tensors and the inputs are on {device}"
        if _C is None:
            return "the compiled extension fourbit._C is not built"
        return None
    if backend == "triton":
        from . import triton_backend
        return triton_backend.unavailable(device)
    if backend == "cuda":
        return "it is not part of this version of fourbit yet"
    return f"it is not a backend; choose one of {('auto',) + BACKENDS}"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run int4_mm on `device` in this installation."""
    device = torch.device(device)
    return [b for b in BACKENDS if _unavailable(b, device) is None]


def choose_backend(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int) -> str:
    """The one place that decides which backend runs int4_mm for a call.

    CPU: the C++ kernel whenever it is built; it beat dequantize-then-matmul at every M
    measured, 1 to 256 (bench/results/cpu.md).
    CUDA: the Triton kernels where Triton runs (GEMV or GEMM by M, triton_backend.py).
    Elsewhere: the reference.
    """
    if device.type == "cpu" and _C is not None:
        return "cpu"
    if device.type == "cuda" and _unavailable("triton", device) is None:
        return "triton"
    return "torch"


def _resolve(backend: str, device: torch.device, dtype: torch.dtype, m: int, n: int, k: int) -> str:
    if backend == "auto":
        return choose_backend(device, dtype, m, n, k)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    reason = _unavailable(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run here: {reason}")
    return backend


def _run_backend(x, qweight, scales, offsets, group_len, bias, backend):
    if backend == "cpu":
        return _C.int4_mm_cpu(x, qweight, scales, offsets, group_len, bias)
    if backend == "triton":
        from . import triton_backend
        return triton_backend.int4_mm(x, qweight, scales, offsets, group_len, bias)
    return reference.int4_mm(x, qweight, scales, offsets, group_len, bias)


if _C is not None:
    # Implementations of the schema defined in C++. The op is opaque to torch.compile,
    # which sees only the fake below.
    _lib = torch.library.Library("fourbit", "IMPL")
    for _key in ("CPU", "CUDA"):
        _lib.impl("int4_mm", _run_backend, _key)

    @torch.library.register_fake("fourbit::int4_mm")
    def _int4_mm_fake(x, qweight, scales, offsets, group_len, bias, backend):
        return x.new_empty((x.shape[0], qweight.shape[0]))

    _int4_mm = torch.ops.fourbit.int4_mm
else:
    # Without the extension only the reference runs; it is plain PyTorch, so
    # torch.compile traces straight through it.
    _int4_mm = _run_backend


def check_activation(x: torch.Tensor, k: int, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have K = {k} features in its last dimension, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the int4 weight is on {device}")


def check_bias(bias: torch.Tensor | None, n: int, device: torch.device) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
        raise TypeError(f"bias must be a float tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"bias is on {bias.device} but the int4 weight is on {device}")


def linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
           group_len: int, bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """int4_linear on the tensors of an Int4Weight, with x already checked (Int4Linear's forward).

    x [..., K]; qweight, scales, offsets as in Int4Weight; group_len as Int4Weight.group_len.
    """
    n, k = qweight.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k)
    chosen = _resolve(backend, x.device, x.dtype, x2.shape[0], n, k)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], n))
    return _int4_mm(x2, qweight, scales, offsets, group_len, bias, chosen).reshape(*x.shape[:-1], n)


def int4_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """y = x @ weight.dequantize().T + bias, accumulated in fp32.

    Args:
        x: fp32, bf16 or fp16 [..., K], any strides, on weight's device.
        weight: Int4Weight of shape (N, K).
        bias: optional float [N].
        backend: "auto" (the fastest available for the device and shape), or one of
            "torch", "cpu", "triton", "cuda" to force it (RuntimeError if it cannot run here).
    Returns:
        [..., N] in x's dtype.
    """
    if not isinstance(weight, Int4Weight):
        raise TypeError(f"weight must be a fourbit.Int4Weight, got {type(weight).__name__}")
    n, k = weight.shape
    check_activation(x, k, weight.device)
    check_bias(bias, n, weight.device)
    return linear(x, weight.qweight, weight.scales, weight.offsets, weight.group_len, bias, backend)
