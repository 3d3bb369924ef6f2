"""Public functional ops, the Python side of their schemas, and their fakes.

Every op has one schema (csrc/registration.cpp, TORCH_LIBRARY(fourbit)), one fake (here,
for torch.compile and meta tensors), one reference (reference.py) and its backends
(backends/), chosen per call by dispatch.py:

    "torch"   reference.py: plain PyTorch, any device, the executable spec
    "cpu"     C++ kernels in csrc/cpu/ (AVX-512 / AVX2 / portable, chosen at run time)
    "cpu-a8"  int4_mm only: the C++ CPU kernel on int8-quantized activations (W4A8; its
              numerics are reference.int4_mm_a8's, not the reference's). Never chosen by "auto".
    "cpu-int" int4_mm only: that kernel on fixed-point activations, 24 bits for fp32 x and 16
              for bf16 / fp16 per block of 32 (reference.fixed_point_digits); "auto" on the
              CPU for up to dispatch.CPU_INT_MAX_M rows.
    "triton"  Triton kernels in kernels/ (CUDA; on the CPU through TRITON_INTERPRET=1)
    "cuda"    CUDA kernels in csrc/cuda/ (built when torch has CUDA and nvcc exists)

The ops: int4_mm (int4_linear), int8_mm (int8_linear), write_kv, paged_attention,
paged_prefill_attention. The
paged ops take a PagedBatch (kv_cache.py): its index values were validated once when the
step was planned, so a call checks only what the host knows (shapes, dtypes, devices).

`backend="auto"` asks dispatch.py; any other name forces that backend and raises
RuntimeError when it cannot run here.
"""

from __future__ import annotations

import torch

from . import dispatch, reference
from .backends import _C, BACKENDS, available_backends, check_backend_name, unavailable
from .dispatch import choose_attention_backend, choose_backend, choose_int8_backend
from .format import (
    COMPUTE_DTYPES,
    Int4Weight,
    Int8Weight,
    dequantize,
    dequantize_int8,
    prepack_mma_weight,
    unpack_mma_weight,
)
from .kv_cache import PagedBatch

__all__ = ["BACKENDS", "available_backends", "choose_attention_backend", "choose_backend", "int4_linear",
           "int8_linear", "linear", "paged_attention", "paged_prefill_attention", "write_kv"]


def resolve(backend: str, device: torch.device, op: str, auto) -> str:
    """The backend that runs op: auto() for "auto", else the forced one if it can run here."""
    if check_backend_name(backend) == "auto":
        return auto()
    reason = unavailable(backend, device, op)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run here: {reason}")
    return backend


# ---- One implementation per op: route to the backend. Registered below for the CUDA
# dispatch key of the schemas in csrc/registration.cpp, and handed to csrc/cpu/routes.cpp,
# the CPU implementation, for the calls it does not run in C++. Backend modules are imported
# when first used: triton is optional and slow to import.

def _int4_mm_impl(x, qweight, scales, offsets, group_len, bias, backend):
    if backend == "cpu":
        from .backends import cpu_int4
        path = dispatch.cpu_int4_path(x.dtype, x.shape[0])
        return cpu_int4.int4_mm(x, qweight, scales, offsets, group_len, bias, path)
    if backend in ("cpu-a8", "cpu-int"):
        from .backends import cpu_int4
        return cpu_int4.int4_mm_a8(x, qweight, scales, offsets, group_len, bias, 0 if backend == "cpu-int" else 1)
    if backend == "triton":
        from .backends import triton_int4
        return triton_int4.int4_mm(x, qweight, scales, offsets, group_len, bias, dispatch.triton_int4_path(x.shape[0]))
    if backend == "cuda":  # qweight, scales, offsets in the kernel's layout (format.prepack_mma_weight)
        from .backends import cuda_int4
        return cuda_int4.int4_mm(x, qweight, scales, offsets, group_len, bias)
    return reference.int4_mm(x, qweight, scales, offsets, group_len, bias)


def _int8_mm_impl(x, qweight, scales, group_len, bias, backend):
    if backend == "cpu":
        from .backends import cpu_int8
        return cpu_int8.int8_mm(x, qweight, scales, group_len, bias)
    return reference.int8_mm(x, qweight, scales, group_len, bias)


def _write_kv_impl(k, v, k_cache, v_cache, slot_mapping, backend):
    if backend == "cpu":
        from .backends import cpu_attention
        return cpu_attention.write_kv(k, v, k_cache, v_cache, slot_mapping)
    if backend == "cuda":
        from .backends import cuda_attention
        return cuda_attention.write_kv(k, v, k_cache, v_cache, slot_mapping)
    if backend == "triton":
        from .backends import triton_attention
        return triton_attention.write_kv(k, v, k_cache, v_cache, slot_mapping)
    return reference.write_kv(k, v, k_cache, v_cache, slot_mapping)


def _paged_attention_impl(q, k_cache, v_cache, block_tables, seq_lens, scale, backend):
    if backend == "cpu":
        from .backends import cpu_attention
        return cpu_attention.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
    if backend == "cuda":
        from .backends import cuda_attention
        return cuda_attention.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
    if backend == "triton":
        from .backends import triton_attention
        return triton_attention.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)


def _paged_prefill_attention_impl(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len,
                                  scale, backend):
    if backend == "cpu":
        from .backends import cpu_attention
        return cpu_attention.paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                                     max_query_len, scale)
    if backend == "triton":
        from .backends import triton_attention
        return triton_attention.paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                                        query_start_loc, max_query_len, scale)
    return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                             max_query_len, scale)


# ---- Autograd of int4_mm: gradients for x and bias, the int4 weight frozen ----
# What adapter fine-tuning (LoRA / QLoRA) over a frozen int4 model needs. Every backend
# shares one backward, through dequantization: grad_x = grad_out @ W, with W = q s + m
# dequantized to fp32 (as reference.int4_mm does) and the product accumulated in fp32, then
# returned in x's dtype; grad_bias = grad_out summed over the rows. W is transient (one fp32
# [N, K] matrix per backward call; nothing is cached). The "cuda" backend's weight is in its
# own layout, converted back to canonical exactly (format.unpack_mma_weight) first.

def _int4_mm_setup_context(ctx, inputs, output):
    x, qweight, scales, offsets, group_len, bias, backend = inputs
    ctx.save_for_backward(qweight, scales, offsets)
    ctx.group_len, ctx.backend, ctx.k, ctx.x_dtype = group_len, backend, x.shape[1], x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _int4_mm_backward(ctx, grad_out):
    qweight, scales, offsets = ctx.saved_tensors
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise RuntimeError("int4_mm: the int4 weight is frozen, its scales and offsets get no gradient; "
                           "detach them (Int4Linear holds them as buffers) and train an adapter instead")
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        if ctx.backend == "cuda":  # the kernel's layout: scales, offsets [groups, N]
            groups, n = scales.shape
            qweight, scales, offsets = unpack_mma_weight(qweight, scales, offsets, n, ctx.k, groups * ctx.group_len)
        w = dequantize(qweight, scales, offsets, ctx.group_len, ctx.k, torch.float32)
        grad_x = (grad_out.to(torch.float32) @ w).to(ctx.x_dtype)
    if ctx.needs_input_grad[5]:
        grad_bias = grad_out.to(torch.float32).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias, None


# int8_mm's backward, the same way: grad_x = grad_out @ (q * s) in fp32; the weight frozen.

def _int8_mm_setup_context(ctx, inputs, output):
    x, qweight, scales, group_len, bias, backend = inputs
    ctx.save_for_backward(qweight, scales)
    ctx.group_len, ctx.x_dtype = group_len, x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _int8_mm_backward(ctx, grad_out):
    qweight, scales = ctx.saved_tensors
    if ctx.needs_input_grad[2]:
        raise RuntimeError("int8_mm: the int8 weight is frozen, its scales get no gradient; detach them")
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = (grad_out.to(torch.float32) @ dequantize_int8(qweight, scales, ctx.group_len)).to(ctx.x_dtype)
    if ctx.needs_input_grad[4]:
        grad_bias = grad_out.to(torch.float32).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_bias, None


_IMPLS = {"int4_mm": _int4_mm_impl, "int8_mm": _int8_mm_impl, "write_kv": _write_kv_impl,
          "paged_attention": _paged_attention_impl, "paged_prefill_attention": _paged_prefill_attention_impl}

if _C is not None:
    # The ops are opaque to torch.compile, which sees only the fakes below. CUDA tensors reach
    # the Python routers above; CPU tensors reach csrc/cpu/routes.cpp, which runs the C++ CPU
    # kernels without a Python hop and hands every other call to the same routers. It takes
    # "cpu" int4_mm calls below the rows where dispatch.cpu_int4_path may leave the kernel.
    if not hasattr(_C, "install_cpu_routes"):
        raise ImportError("fourbit._C predates this fourbit (it has no install_cpu_routes); rebuild it with "
                          "`pip install --no-build-isolation -e .`")
    _lib = torch.library.Library("fourbit", "IMPL")
    for _name, _impl in _IMPLS.items():
        _lib.impl(_name, _impl, "CUDA")
    _C.install_cpu_routes(_IMPLS, min(dispatch.CPU_DENSE_MIN_M.values(), default=2**62))

    @torch.library.register_fake("fourbit::int4_mm")
    def _int4_mm_fake(x, qweight, scales, offsets, group_len, bias, backend):
        n = scales.shape[1] if backend == "cuda" else qweight.shape[0]  # the cuda layout is [groups, N]
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("fourbit::int8_mm")
    def _int8_mm_fake(x, qweight, scales, group_len, bias, backend):
        return x.new_empty((x.shape[0], qweight.shape[0]))

    @torch.library.register_fake("fourbit::write_kv")
    def _write_kv_fake(k, v, k_cache, v_cache, slot_mapping, backend):
        return None

    @torch.library.register_fake("fourbit::paged_attention")
    def _paged_attention_fake(q, k_cache, v_cache, block_tables, seq_lens, scale, backend):
        return torch.empty_like(q)

    @torch.library.register_fake("fourbit::paged_prefill_attention")
    def _paged_prefill_attention_fake(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len,
                                      scale, backend):
        return torch.empty_like(q)

    torch.library.register_autograd("fourbit::int4_mm", _int4_mm_backward, setup_context=_int4_mm_setup_context)
    torch.library.register_autograd("fourbit::int8_mm", _int8_mm_backward, setup_context=_int8_mm_setup_context)

    _int4_mm = torch.ops.fourbit.int4_mm
    _int8_mm = torch.ops.fourbit.int8_mm
    _write_kv = torch.ops.fourbit.write_kv
    _paged_attention = torch.ops.fourbit.paged_attention
    _paged_prefill_attention = torch.ops.fourbit.paged_prefill_attention
else:
    # Without the extension the ops are plain Python; torch.compile traces into them. int4_mm
    # and int8_mm keep the same backward (a kernel backend's output has no autograd history).
    class _Int4MM(torch.autograd.Function):
        forward = staticmethod(_int4_mm_impl)
        setup_context = staticmethod(_int4_mm_setup_context)
        backward = staticmethod(_int4_mm_backward)

    class _Int8MM(torch.autograd.Function):
        forward = staticmethod(_int8_mm_impl)
        setup_context = staticmethod(_int8_mm_setup_context)
        backward = staticmethod(_int8_mm_backward)

    _int4_mm, _int8_mm, _write_kv = _Int4MM.apply, _Int8MM.apply, _write_kv_impl
    _paged_attention, _paged_prefill_attention = _paged_attention_impl, _paged_prefill_attention_impl


# ---- int4 weight-only matmul ----

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


def linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, n: int,
           group_len: int, bias: torch.Tensor | None = None, backend: str = "auto",
           layout: str = "canonical") -> torch.Tensor:
    """int4_linear on weight tensors, with x already checked (Int4Linear's forward).

    Args:
        x: [..., K] on the weight's device.
        qweight, scales, offsets: the weight in `layout`: "canonical" (Int4Weight's tensors)
            or "mma" (format.prepack_mma_weight: the "cuda" kernel's own, which then runs).
            Forcing "cuda" on a canonical weight converts it for this call only (Int4Linear
            converts once, at load).
        n: output features; group_len: as Int4Weight.group_len.
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if layout == "mma":
        chosen = resolve(backend, x.device, "int4_mm", lambda: "cuda")
        if chosen != "cuda":
            raise RuntimeError(f"this weight is prepacked for the 'cuda' backend, not {chosen!r}")
    else:
        chosen = resolve(backend, x.device, "int4_mm",
                         lambda: choose_backend(x.device, x.dtype, x2.shape[0], n, k, group_len))
        if chosen == "cuda":
            qweight, scales, offsets = prepack_mma_weight(qweight, scales, offsets, k)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], n))
    return _int4_mm(x2, qweight, scales, offsets, group_len, bias, chosen).reshape(*x.shape[:-1], n)


def int4_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """y = x @ weight.dequantize().T + bias, accumulated in fp32.

    Args:
        x: fp32, bf16 or fp16 [..., K], any strides, on weight's device.
        weight: Int4Weight of shape (N, K), canonical layout.
        bias: optional float [N].
        backend: "auto" (dispatch.choose_int4_kernel), or one of "torch", "cpu", "triton",
            "cuda" to force it (RuntimeError if it cannot run here); "cpu-a8" / "cpu-int" run
            the CPU kernel on int8 / fixed-point activations (reference.int4_mm_a8's
            numerics). "cuda" converts the weight to its layout on every call:
            for repeated calls use Int4Linear, which prepacks once.
    Returns:
        [..., N] in x's dtype. Differentiable in x and bias on every backend (the weight is
        frozen): the backward is the transposed product through dequantization (above the
        fakes, _int4_mm_backward), what training an adapter over int4 layers needs.
    """
    if not isinstance(weight, Int4Weight):
        raise TypeError(f"weight must be a fourbit.Int4Weight, got {type(weight).__name__}")
    n, k = weight.shape
    check_activation(x, k, weight.device)
    check_bias(bias, n, weight.device)
    return linear(x, weight.qweight, weight.scales, weight.offsets, n, weight.group_len, bias, backend)


# ---- int8 weight-only matmul (GGUF Q8_0, int8 embeddings and heads) ----

def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_len: int,
                bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """int8_linear on weight tensors, with x and the weight already checked (Int8Linear's forward)."""
    n, k = qweight.shape
    x2 = x.reshape(-1, k)
    chosen = resolve(backend, x.device, "int8_mm", lambda: choose_int8_backend(x.device, x.dtype, x2.shape[0], n, k))
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], n))
    return _int8_mm(x2, qweight, scales, group_len, bias, chosen).reshape(*x.shape[:-1], n)


def int8_linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """y = x @ weight.dequantize().T + bias, accumulated in fp32.

    Args:
        x: fp32, bf16 or fp16 [..., K], any strides, on weight's device.
        weight: Int8Weight of shape (N, K): int8 q and a scale per group (format.py).
        bias: optional float [N].
        backend: "auto" (dispatch.choose_int8_backend: the C++ kernel on the CPU), or "torch" /
            "cpu" to force one (RuntimeError if it cannot run here).
    Returns:
        [..., N] in x's dtype; differentiable in x and bias (the weight is frozen).
    """
    if not isinstance(weight, Int8Weight):
        raise TypeError(f"weight must be a fourbit.Int8Weight, got {type(weight).__name__}")
    n, k = weight.shape
    check_activation(x, k, weight.device)
    check_bias(bias, n, weight.device)
    return linear_int8(x, weight.qweight, weight.scales, weight.group_len, bias, backend)


# ---- Paged KV cache ops (layout: kv_cache.py) ----
# Only host-side facts are checked per call; the index values were checked when the
# PagedBatch was planned. Nothing here reads a tensor back to the host.

def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, batch: PagedBatch) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in COMPUTE_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [num_blocks, block_size, num_kv_heads, head_dim], "
                             f"got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the pages of a PagedKVCache are)")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype or k_cache.device != v_cache.device:
        raise ValueError(f"k_cache and v_cache must match: {k_cache.dtype} {tuple(k_cache.shape)} on "
                         f"{k_cache.device} vs {v_cache.dtype} {tuple(v_cache.shape)} on {v_cache.device}")
    block_size = k_cache.shape[1]
    if block_size < 8 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 8, got {block_size}")
    if not isinstance(batch, PagedBatch):
        raise TypeError(f"batch must be a fourbit.PagedBatch (PagedKVCache.plan or PagedBatch.from_tensors), "
                        f"got {type(batch).__name__}")
    if (batch.num_blocks, batch.block_size) != tuple(k_cache.shape[:2]):
        raise ValueError(f"the batch was planned for {batch.num_blocks} blocks of {batch.block_size} tokens, "
                         f"the cache has {k_cache.shape[0]} of {k_cache.shape[1]}")
    if batch.device != k_cache.device:
        raise ValueError(f"the batch is on {batch.device} but the cache is on {k_cache.device}")


def _check_tokens(name: str, t, k_cache: torch.Tensor, heads: int | None, tokens: int) -> None:
    """t must be [tokens, heads (any multiple of the kv heads if None), head_dim] in the cache's dtype."""
    if not isinstance(t, torch.Tensor) or t.dtype != k_cache.dtype:
        raise TypeError(f"{name} must be a tensor of the cache's dtype {k_cache.dtype}, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    kv_heads, head_dim = k_cache.shape[2:]
    want = f"[{tokens}, {heads if heads else 'num_heads'}, head_dim = {head_dim}]"
    if t.dim() != 3 or t.shape[0] != tokens or t.shape[2] != head_dim or (heads and t.shape[1] != heads):
        raise ValueError(f"{name} must be {want}, got {tuple(t.shape)}")
    if t.shape[1] % kv_heads:
        raise ValueError(f"the {t.shape[1]} query heads must be a multiple of the {kv_heads} kv heads")
    if t.device != k_cache.device:
        raise ValueError(f"{name} is on {t.device} but the cache is on {k_cache.device}")


def _scale(scale, head_dim: int) -> float:
    return head_dim ** -0.5 if scale is None else float(scale)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             batch: PagedBatch, backend: str = "auto") -> None:
    """Write the keys and values of a step's new tokens into the paged cache, in place.

    Args:
        k, v: [num_tokens, num_kv_heads, head_dim] in the cache's dtype, any strides.
        k_cache, v_cache: contiguous [num_blocks, block_size, num_kv_heads, head_dim] (NHD pages).
        batch: the step's PagedBatch; token t goes to slot batch.slot_mapping[t] (page
            slot // block_size, row slot % block_size), nowhere for -1.
        backend: "auto", "torch", "cpu", "triton" or "cuda".
    """
    _check_cache(k_cache, v_cache, batch)
    _check_tokens("k", k, k_cache, k_cache.shape[2], batch.num_tokens)
    _check_tokens("v", v, k_cache, k_cache.shape[2], batch.num_tokens)
    chosen = resolve(backend, k.device, "write_kv", lambda: choose_attention_backend(k.device, k.dtype))
    if batch.num_tokens:
        _write_kv(k.contiguous(), v.contiguous(), k_cache, v_cache, batch.slot_mapping, chosen)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: PagedBatch,
                    scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Decode attention over the paged cache: one query token per sequence.

    Args:
        q: [B, Hq, D] in the cache's dtype; query head h reads kv head h // (Hq / Hkv) (GQA).
        k_cache, v_cache: contiguous [num_blocks, block_size, Hkv, D] (NHD pages).
        batch: a decode PagedBatch (batch.decode: one new token per sequence); sequence b
            attends to its tokens 0 .. seq_lens[b] - 1 through block_tables[b].
        scale: softmax scale, default D ** -0.5.
        backend: "auto", "torch", "cpu", "triton" or "cuda".
    Returns:
        [B, Hq, D] in q's dtype.
    """
    _check_cache(k_cache, v_cache, batch)
    if not batch.decode and batch.batch_size:
        raise ValueError(f"paged_attention decodes one new token per sequence; this batch has {batch.num_tokens} "
                         f"for {batch.batch_size} sequences (use paged_prefill_attention)")
    _check_tokens("q", q, k_cache, None, batch.batch_size)
    chosen = resolve(backend, q.device, "paged_attention", lambda: choose_attention_backend(q.device, q.dtype))
    if batch.batch_size == 0:
        return torch.empty_like(q)
    return _paged_attention(q.contiguous(), k_cache, v_cache, batch.block_tables, batch.seq_lens,
                            _scale(scale, q.shape[2]), chosen)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: PagedBatch,
                            scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Prefill (and chunked prefill) attention over the paged cache.

    Args:
        q: [num_tokens, Hq, D] in the cache's dtype: the new tokens of every sequence, back to
            back; their keys and values are already written to the cache.
        k_cache, v_cache: contiguous [num_blocks, block_size, Hkv, D] (NHD pages).
        batch: the step's PagedBatch: sequence b's new tokens are
            q[query_start_loc[b]:query_start_loc[b + 1]], the last of its seq_lens[b] tokens;
            each attends causally to every token of its sequence up to its own position.
        scale: softmax scale, default D ** -0.5.
        backend: "auto", "torch", "cpu" or "triton".
    Returns:
        [num_tokens, Hq, D] in q's dtype.
    """
    _check_cache(k_cache, v_cache, batch)
    _check_tokens("q", q, k_cache, None, batch.num_tokens)
    chosen = resolve(backend, q.device, "paged_prefill_attention",
                     lambda: choose_attention_backend(q.device, q.dtype))
    if batch.num_tokens == 0:
        return torch.empty_like(q)
    return _paged_prefill_attention(q.contiguous(), k_cache, v_cache, batch.block_tables, batch.seq_lens,
                                    batch.query_start_loc, batch.max_query_len, _scale(scale, q.shape[2]), chosen)
