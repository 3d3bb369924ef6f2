"""Public functional ops, their fakes, and the dispatch to a backend.

Every op has one schema (csrc/registration.cpp, TORCH_LIBRARY(fourbit)), one fake (here,
for torch.compile and meta tensors), one reference (reference.py) and its backends:

    "torch"   reference.py: plain PyTorch, any device, the executable spec
    "cpu"     C++ kernels in csrc/cpu/ (int4_mm: AVX-512 / AVX2 / portable, chosen at run time)
    "triton"  Triton kernels in kernels/ (CUDA; on the CPU through TRITON_INTERPRET=1)
    "cuda"    CUDA kernels in csrc/cuda/ (built when torch has CUDA and nvcc exists)

The ops: int4_mm (int4_linear), write_kv, paged_attention, paged_prefill_attention.

`backend="auto"` asks choose_backend(); any other name forces that backend and raises
RuntimeError when it cannot run here.
"""

from __future__ import annotations

import importlib
import warnings

import torch
from torch.utils.weak import WeakIdKeyDictionary

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


# The backends that implement each op, besides the reference ("torch", every op).
_KERNELS = {
    "int4_mm": ("cpu", "triton", "cuda"),
    "write_kv": ("triton", "cuda"),
    "paged_attention": ("triton", "cuda"),
    "paged_prefill_attention": ("triton",),
}


def _unavailable(backend: str, device: torch.device, op: str = "int4_mm") -> str | None:
    """Why `backend` cannot run `op` on `device` here, or None when it can."""
    if backend == "torch":
        return None
    if backend not in BACKENDS:
        return f"it is not a backend; choose one of {('auto',) + BACKENDS}"
    if backend not in _KERNELS[op]:
        return f"fourbit has no {backend!r} kernel for {op} (yet)"
    if backend == "cpu":
        if device.type != "cpu":
            return f"it runs on CPU tensors and the inputs are on {device}"
        if _C is None:
            return "the compiled extension fourbit._C is not built"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"it runs on CUDA tensors and the inputs are on {device}"
        if _C is None or not hasattr(_C, f"{op}_cuda"):
            return "fourbit._C was built without its CUDA kernels (FOURBIT_CUDA=1 and nvcc build them)"
        return None
    from . import triton_backend  # backend == "triton"
    return triton_backend.unavailable(device)


def available_backends(device: torch.device | str = "cpu", op: str = "int4_mm") -> list[str]:
    """The backends that can run `op` (default int4_mm) on `device` in this installation."""
    device = torch.device(device)
    return [b for b in BACKENDS if _unavailable(b, device, op) is None]


def choose_backend(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int) -> str:
    """The one place that decides which backend runs int4_mm for a call.

    CPU: the C++ kernel whenever it is built; it beat torch's fp32 matmul at every M measured
    (1, 16, 64 over seven layer shapes: bench/results/cpu.md).
    CUDA: the Triton kernels where Triton runs (GEMV, GEMM or dense by M, triton_backend.py).
    The CUDA kernel ("cuda") is picked only once a GPU run has measured it faster: none has.
    Elsewhere: the reference.
    """
    if device.type == "cpu" and _C is not None:
        return "cpu"
    if device.type == "cuda" and _unavailable("triton", device) is None:
        return "triton"
    return "torch"


def choose_attention_backend(device: torch.device) -> str:
    """What "auto" runs write_kv and the paged attention ops with: the Triton kernels on a
    GPU where Triton runs, else the reference (there is no C++ CPU attention kernel). The
    CUDA decode kernel is forced-only until a GPU run has measured it against Triton."""
    if device.type == "cuda" and _unavailable("triton", device, "paged_attention") is None:
        return "triton"
    return "torch"


def _resolve(backend: str, device: torch.device, op: str, auto) -> str:
    """The backend that runs op: auto() for "auto", else the forced one if it can run here."""
    if backend == "auto":
        return auto()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    reason = _unavailable(backend, device, op)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run here: {reason}")
    return backend


# One implementation per op: route to the chosen backend. Registered below for the CPU and
# CUDA dispatch keys of the schemas in csrc/registration.cpp.

def _int4_mm_impl(x, qweight, scales, offsets, group_len, bias, backend):
    if backend == "cpu":
        return _C.int4_mm_cpu(x, qweight, scales, offsets, group_len, bias)
    if backend == "triton":
        from . import triton_backend
        return triton_backend.int4_mm(x, qweight, scales, offsets, group_len, bias)
    if backend == "cuda":
        from . import cuda_backend
        return cuda_backend.int4_mm(_C, x, qweight, scales, offsets, group_len, bias)
    return reference.int4_mm(x, qweight, scales, offsets, group_len, bias)


def _write_kv_impl(k, v, k_cache, v_cache, slot_mapping, backend):
    if backend == "cuda":
        return _C.write_kv_cuda(k, v, k_cache, v_cache, slot_mapping)
    if backend == "triton":
        from . import triton_attention
        return triton_attention.write_kv(k, v, k_cache, v_cache, slot_mapping)
    return reference.write_kv(k, v, k_cache, v_cache, slot_mapping)


def _paged_attention_impl(q, k_cache, v_cache, block_tables, seq_lens, scale, backend):
    if backend == "cuda":
        return _C.paged_attention_cuda(q, k_cache, v_cache, block_tables, seq_lens, scale)
    if backend == "triton":
        from . import triton_attention
        return triton_attention.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)


def _paged_prefill_attention_impl(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, backend):
    if backend == "triton":
        from . import triton_attention
        return triton_attention.paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                                        query_start_loc, scale)
    return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


_IMPLS = {"int4_mm": _int4_mm_impl, "write_kv": _write_kv_impl, "paged_attention": _paged_attention_impl,
          "paged_prefill_attention": _paged_prefill_attention_impl}

if _C is not None:
    # The ops are opaque to torch.compile, which sees only the fakes below.
    _lib = torch.library.Library("fourbit", "IMPL")
    for _name, _impl in _IMPLS.items():
        for _key in ("CPU", "CUDA"):
            _lib.impl(_name, _impl, _key)

    @torch.library.register_fake("fourbit::int4_mm")
    def _int4_mm_fake(x, qweight, scales, offsets, group_len, bias, backend):
        return x.new_empty((x.shape[0], qweight.shape[0]))

    @torch.library.register_fake("fourbit::write_kv")
    def _write_kv_fake(k, v, k_cache, v_cache, slot_mapping, backend):
        return None

    @torch.library.register_fake("fourbit::paged_attention")
    def _paged_attention_fake(q, k_cache, v_cache, block_tables, seq_lens, scale, backend):
        return torch.empty_like(q)

    @torch.library.register_fake("fourbit::paged_prefill_attention")
    def _paged_prefill_attention_fake(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                      backend):
        return torch.empty_like(q)

    _int4_mm = torch.ops.fourbit.int4_mm
    _write_kv = torch.ops.fourbit.write_kv
    _paged_attention = torch.ops.fourbit.paged_attention
    _paged_prefill_attention = torch.ops.fourbit.paged_prefill_attention
else:
    # Without the extension the ops are plain Python; torch.compile traces into them.
    _int4_mm, _write_kv = _int4_mm_impl, _write_kv_impl
    _paged_attention, _paged_prefill_attention = _paged_attention_impl, _paged_prefill_attention_impl


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
    chosen = _resolve(backend, x.device, "int4_mm", lambda: choose_backend(x.device, x.dtype, x2.shape[0], n, k))
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


# ---- Paged KV cache ops (layout: kv_cache.py) ----

def _values_checkable(*tensors: torch.Tensor) -> bool:
    """Whether the values of index tensors can be checked now: reading a CUDA tensor waits
    for the GPU, which a CUDA graph capture or a torch.compile trace cannot do. There the
    kernels still clamp every index they read, so bad values cannot reach outside memory."""
    if torch.compiler.is_compiling():
        return False
    return not any(t.is_cuda for t in tensors) or not torch.cuda.is_current_stream_capturing()


# Index tensors whose values passed their checks, and what they were checked with. A model
# hands the same block_tables, seq_lens, slot_mapping and query_start_loc to every layer of
# a step, so each is checked once per step rather than once per layer (on a GPU every check
# reads the device from the host). An in-place change bumps a tensor's version, and it is
# checked again; tensors made in inference mode track no version and are always checked.
_CHECKED = WeakIdKeyDictionary()


def _versioned(*values) -> bool:
    return all(not isinstance(v, torch.Tensor) or not v.is_inference() for v in values)


def _already_checked(tensor: torch.Tensor, *context) -> bool:
    """Whether tensor's values passed their check with this context (tensors compared by
    identity and version, other values by equality) and are unchanged since."""
    if not _versioned(tensor, *context):
        return False
    seen = _CHECKED.get(tensor)
    if seen is None or seen[0] != tensor._version or len(seen[1]) != len(context):
        return False
    return all((a is b and a._version == v) if isinstance(b, torch.Tensor) else a == b
               for (a, v), b in zip(seen[1], context))


def _mark_checked(tensor: torch.Tensor, *context) -> None:
    if _versioned(tensor, *context):
        _CHECKED[tensor] = (tensor._version,
                            [(c, c._version if isinstance(c, torch.Tensor) else None) for c in context])


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
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


def _check_index(name: str, t, dtype: torch.dtype, shape: tuple, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype:
        raise TypeError(f"{name} must be a {dtype} tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if len(shape) != t.dim() or any(want is not None and want != got for want, got in zip(shape, t.shape)):
        raise ValueError(f"{name} must have shape {tuple('*' if d is None else d for d in shape)}, "
                         f"got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the cache is on {device}")


def _check_query(q, k_cache) -> None:
    if not isinstance(q, torch.Tensor) or q.dtype != k_cache.dtype:
        raise TypeError(f"q must be a tensor of the cache's dtype {k_cache.dtype}, got "
                        f"{getattr(q, 'dtype', type(q).__name__)}")
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q must be [tokens, num_heads, head_dim = {k_cache.shape[3]}], got {tuple(q.shape)}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"the {q.shape[1]} query heads must be a multiple of the {k_cache.shape[2]} kv heads")
    if q.device != k_cache.device:
        raise ValueError(f"q is on {q.device} but the cache is on {k_cache.device}")


def _check_tables(block_tables, seq_lens, k_cache, batch: int) -> None:
    _check_index("block_tables", block_tables, torch.int32, (batch, None), k_cache.device)
    _check_index("seq_lens", seq_lens, torch.int32, (batch,), k_cache.device)
    if block_tables.shape[1] == 0:
        raise ValueError("block_tables must have at least one column")
    num_blocks, block_size = k_cache.shape[:2]
    if batch and _values_checkable(block_tables, seq_lens) and \
            not _already_checked(block_tables, seq_lens, num_blocks, block_size):
        capacity = block_tables.shape[1] * block_size
        used = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] * block_size < seq_lens[:, None]
        if bool(((seq_lens < 1) | (seq_lens > capacity)).any()):
            raise ValueError(f"seq_lens must lie in [1, max_blocks * block_size = {capacity}], "
                             f"got {seq_lens.tolist()}")
        if bool((used & ((block_tables < 0) | (block_tables >= num_blocks))).any()):
            raise ValueError(f"block_tables holds pages outside [0, num_blocks = {num_blocks}) "
                             "within the sequences' lengths")
        _mark_checked(block_tables, seq_lens, num_blocks, block_size)


def _scale(scale, head_dim: int) -> float:
    return head_dim ** -0.5 if scale is None else float(scale)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, backend: str = "auto") -> None:
    """Write the keys and values of T tokens into the paged cache, in place.

    Args:
        k, v: [T, num_kv_heads, head_dim] in the cache's dtype.
        k_cache, v_cache: contiguous [num_blocks, block_size, num_kv_heads, head_dim] (NHD pages).
        slot_mapping: int64 [T]; token t goes to page slot // block_size, row slot % block_size;
            -1 skips the token.
        backend: "auto", "torch", "triton" or "cuda".
    """
    _check_cache(k_cache, v_cache)
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dtype != k_cache.dtype:
            raise TypeError(f"{name} must be a tensor of the cache's dtype {k_cache.dtype}, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 3 or tuple(t.shape[1:]) != tuple(k_cache.shape[2:]):
            raise ValueError(f"{name} must be [T, {k_cache.shape[2]}, {k_cache.shape[3]}], got {tuple(t.shape)}")
        if t.device != k_cache.device:
            raise ValueError(f"{name} is on {t.device} but the cache is on {k_cache.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    _check_index("slot_mapping", slot_mapping, torch.int64, (k.shape[0],), k_cache.device)
    slots = k_cache.shape[0] * k_cache.shape[1]
    if k.shape[0] and _values_checkable(slot_mapping) and not _already_checked(slot_mapping, slots):
        if bool(((slot_mapping < -1) | (slot_mapping >= slots)).any()):
            raise ValueError(f"slot_mapping values must be -1 or lie in [0, num_blocks * block_size = {slots})")
        _mark_checked(slot_mapping, slots)
    chosen = _resolve(backend, k.device, "write_kv", lambda: choose_attention_backend(k.device))
    if k.shape[0]:
        _write_kv(k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping, chosen)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Decode attention over the paged cache: one query token per sequence.

    Args:
        q: [B, Hq, D] in the cache's dtype; query head h reads kv head h // (Hq / Hkv) (GQA).
        k_cache, v_cache: contiguous [num_blocks, block_size, Hkv, D] (NHD pages).
        block_tables: int32 [B, max_blocks]; token t of sequence b is at page
            block_tables[b, t // block_size], row t % block_size.
        seq_lens: int32 [B]; sequence b attends to its tokens 0 .. seq_lens[b] - 1 (>= 1).
        scale: softmax scale, default D ** -0.5.
        backend: "auto", "torch", "triton" or "cuda".
    Returns:
        [B, Hq, D] in q's dtype.
    """
    _check_cache(k_cache, v_cache)
    _check_query(q, k_cache)
    _check_tables(block_tables, seq_lens, k_cache, q.shape[0])
    chosen = _resolve(backend, q.device, "paged_attention", lambda: choose_attention_backend(q.device))
    if q.shape[0] == 0:
        return torch.empty_like(q)
    return _paged_attention(q.contiguous(), k_cache, v_cache, block_tables.contiguous(), seq_lens,
                            _scale(scale, q.shape[2]), chosen)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Prefill (and chunked prefill) attention over the paged cache.

    Args:
        q: [total_q, Hq, D] in the cache's dtype: the new tokens of every sequence, back to
            back; their keys and values are already written to the cache.
        k_cache, v_cache: contiguous [num_blocks, block_size, Hkv, D] (NHD pages).
        block_tables: int32 [B, max_blocks]; seq_lens: int32 [B], cached plus new tokens.
        query_start_loc: int32 [B + 1], cumulative: sequence b's new tokens are
            q[query_start_loc[b]:query_start_loc[b + 1]], its last tokens; each attends
            causally to every token of its sequence up to its own position.
        scale: softmax scale, default D ** -0.5.
        backend: "auto", "torch" or "triton".
    Returns:
        [total_q, Hq, D] in q's dtype.
    """
    _check_cache(k_cache, v_cache)
    _check_query(q, k_cache)
    batch = block_tables.shape[0] if isinstance(block_tables, torch.Tensor) else 0
    _check_tables(block_tables, seq_lens, k_cache, batch)
    _check_index("query_start_loc", query_start_loc, torch.int32, (batch + 1,), k_cache.device)
    if _values_checkable(query_start_loc, seq_lens) and not _already_checked(query_start_loc, seq_lens, q.shape[0]):
        new = query_start_loc[1:] - query_start_loc[:-1]
        if int(query_start_loc[0]) != 0 or int(query_start_loc[-1]) != q.shape[0] or bool((new < 0).any()):
            raise ValueError(f"query_start_loc must rise from 0 to total_q = {q.shape[0]}, "
                             f"got {query_start_loc.tolist()}")
        if bool((new > seq_lens).any()):
            raise ValueError("a sequence has more new tokens (query_start_loc) than tokens (seq_lens)")
        _mark_checked(query_start_loc, seq_lens, q.shape[0])
    chosen = _resolve(backend, q.device, "paged_prefill_attention", lambda: choose_attention_backend(q.device))
    if q.shape[0] == 0:
        return torch.empty_like(q)
    return _paged_prefill_attention(q.contiguous(), k_cache, v_cache, block_tables.contiguous(), seq_lens,
                                    query_start_loc, _scale(scale, q.shape[2]), chosen)
