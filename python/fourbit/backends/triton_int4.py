"""The "triton" backend of int4_mm: launchers for kernels/int4_matmul.py.

Three paths, chosen by dispatch.py from the rows M of x: "gemv" (decode), "gemm" (tensor-
core GEMM, dequantizing tiles in registers) and "dense" (expand the weight once, then
torch.matmul). The kernels are plain @triton.jit functions; this module wraps them in
triton.autotune with its tuning policy:

- under Triton's CPU interpreter (TRITON_INTERPRET=1): one small config, no tuning;
- FOURBIT_TRITON_TUNE=quick: a small subset of the production lists (the test suite on a
  GPU: every config compiles once per shape it meets), pruned like them;
- otherwise the full lists of kernels/int4_matmul.py, pruned per shape and GPU.

Tests and production share the lists and the pruners: the pruners are pure functions of
the shape, dtype and the GPU's DeviceProps (devices.py), which never keep a config that
does not fit the GPU's shared memory (`make kernel-check` proves it for every supported
GPU from the compiled kernels).

Autotuning keeps its results in Triton's on-disk cache (fourbit.tune warms it).
"""

from __future__ import annotations

import functools
import os

import torch

from . import devices, interpreted

PATHS = ("gemv", "gemm", "dense")


def _tuning_policy() -> str:
    if interpreted():
        return "interpreter"
    return "quick" if os.environ.get("FOURBIT_TRITON_TUNE") == "quick" else "full"


# The quick subsets: (BLOCK_N, BLOCK_K, SPLIT_K) of the GEMV and (BLOCK_M, BLOCK_N, BLOCK_K,
# SPLIT_K) of the GEMM, one split-K config and one plain tile each.
_QUICK_GEMV = {(32, 256, 4), (16, 256, 1)}
_QUICK_GEMM = {(16, 64, 64, 2), (64, 64, 64, 1)}


@functools.cache
def _tuned_kernels(policy: str):
    """(gemv, gemm) autotuned over the configs of the policy. Built once per policy, the
    first time a launch needs them (importing triton is deferred until then)."""
    import triton

    from fourbit.kernels import int4_matmul as k

    def pick(configs, names, keep):
        return [c for c in configs if tuple(c.kwargs[n] for n in names) in keep]

    if policy == "interpreter":
        gemv, gemm = [k.GEMV_INTERPRETER_CONFIG], [k.GEMM_INTERPRETER_CONFIG]
    elif policy == "quick":
        gemv = pick(k.gemv_configs(), ("BLOCK_N", "BLOCK_K", "SPLIT_K"), _QUICK_GEMV)
        gemm = pick(k.gemm_configs(), ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"), _QUICK_GEMM)
    else:
        gemv, gemm = k.gemv_configs(), k.gemm_configs()
    def on_device(prune):
        # The pruners are pure functions of the device's properties: bind the launch's GPU.
        return lambda configs, named_args, **kw: prune(configs, named_args, _props(named_args["x_ptr"]), **kw)

    tune = functools.partial(triton.autotune, reset_to_zero=["out_ptr"], cache_results=True)
    return (tune(configs=gemv, key=["M", "N", "K", "GROUP_LEN"],
                 prune_configs_by={"early_config_prune": on_device(k.prune_gemv)})(k.int4_gemv_kernel),
            tune(configs=gemm, key=["M_BUCKET", "N", "K", "GROUP_LEN"],
                 prune_configs_by={"early_config_prune": on_device(k.prune_gemm)})(k.int4_gemm_kernel))


def _props(x: torch.Tensor) -> devices.DeviceProps:
    return devices.INTERPRETER if interpreted() else devices.current(x.device)


def dequantize(qweight, scales, offsets, group_len: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, k] in dtype, expanded on the device by int4_dequantize_kernel."""
    import triton

    from fourbit.kernels import int4_matmul as kernels

    n = qweight.shape[0]
    # Triton's interpreter truncates fp32 -> bf16 instead of rounding to nearest (triton 3.9
    # on the CPU): there the kernel writes fp32 and torch rounds. On a GPU it rounds itself.
    kernel_dtype = torch.float32 if dtype == torch.bfloat16 and interpreted() else dtype
    w = torch.empty((n, k), device=qweight.device, dtype=kernel_dtype)
    block_n, block_k = 16, 128
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    kernels.int4_dequantize_kernel[grid](qweight, scales, offsets, w, n, k, qweight.stride(0), scales.stride(0),
                                         w.stride(0), GROUP_LEN=group_len, BLOCK_N=block_n, BLOCK_K=block_k)
    return w.to(dtype)


def int4_mm(x, qweight, scales, offsets, group_len: int, bias=None, path: str = "gemv"):
    """x fp32/bf16/fp16 [M, K] @ canonical int4 weight [N, K] -> [M, N] in x's dtype
    (ops.int4_mm), on the kernel `path` ("gemv", "gemm" or "dense"; dispatch.py picks it)."""
    import triton

    if path not in PATHS:
        raise ValueError(f"unknown Triton int4 path {path!r}; choose one of {PATHS}")
    m, k = x.shape
    n = qweight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    scales, offsets = scales.contiguous(), offsets.contiguous()
    if path == "dense":
        # fp32 activations keep fp32 products (torch's default matmul precision is "highest").
        w = dequantize(qweight, scales, offsets, group_len, k, x.dtype)
        return x @ w.T if bias is None else torch.addmm(bias.to(x.dtype), x, w.T)
    gemv_kernel, gemm_kernel = _tuned_kernels(_tuning_policy())
    out = torch.zeros((m, n), device=x.device, dtype=torch.float32)  # split-K accumulates here
    args = (x, qweight, scales, offsets, out, m, n, k, x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0))
    if path == "gemv":
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], m)
        # EVEN_K: whole 16-byte vectors of words and of x are in bounds together (K and the
        # qweight row stride in whole vectors); FAST_DEQUANT: the inline-PTX nibble conversion,
        # which Triton's CPU interpreter cannot run (int4_gemv_kernel).
        even_k = k % 32 == 0 and qweight.stride(0) % 4 == 0
        gemv_kernel[grid](*args, GROUP_LEN=group_len, EVEN_K=even_k, FAST_DEQUANT=not interpreted())
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        # fp32 activations take exact fp32 products (not tf32). Triton's interpreter
        # mishandles bf16 (tl.dot gives garbage and fp32 -> bf16 truncates, triton 3.9 on the
        # CPU), so there bf16 tiles are multiplied in fp32 too; on a GPU bf16 runs on tensor cores.
        fp32_dot = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreted())
        gemm_kernel[grid](*args, triton.next_power_of_2(m), GROUP_LEN=group_len, FP32_DOT=fp32_dot)
    if bias is not None:
        out += bias
    return out.to(x.dtype)
