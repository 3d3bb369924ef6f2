"""The "cuda" backend of fourbit.int4_mm: the tensor-core kernel of csrc/cuda/int4_mm.cu.

The kernel reads weights in its own layout (format.prepack_mma) with transposed scales and
offsets in the activation dtype. They are made once per weight and dtype, at the first call,
and kept while the canonical qweight tensor lives (and is not modified in place): checkpoints
and Int4Linear's buffers stay canonical, and every call after the first costs the kernel only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .format import prepack_mma

MAX_ROWS = 64  # rows of x per launch; more are done 64 at a time
_PREPACKED = WeakIdKeyDictionary()  # canonical qweight -> {(dtype, version...): (packed, scales_t, offsets_t)}


def prepacked(qweight, scales, offsets, group_len: int, k: int, dtype: torch.dtype):
    """(packed int32 [N_pad/16, K_pad/64*128], scales and offsets [groups, N] in dtype), cached."""
    key = (dtype, qweight._version, scales._version, offsets._version, scales.data_ptr(), offsets.data_ptr())
    cache = _PREPACKED.setdefault(qweight, {})
    if key not in cache:
        cache.clear()  # one layout per weight: a new dtype or new values replace the old one
        cache[key] = (prepack_mma(qweight, k), scales.t().to(dtype).contiguous(), offsets.t().to(dtype).contiguous())
    return cache[key]


def int4_mm(c_ext, x, qweight, scales, offsets, group_len: int, bias=None):
    """x fp16/bf16 [M, K] @ int4 weight [N, K] -> [M, N] in x's dtype (see ops.int4_mm)."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the CUDA int4 kernel takes float16 or bfloat16 activations, got {x.dtype}; "
                        "use backend='triton' or cast x")
    m, k = x.shape
    n = qweight.shape[0]
    packed, scales_t, offsets_t = prepacked(qweight, scales, offsets, group_len, k, x.dtype)
    if k % 8 or x.stride(-1) != 1 or x.stride(0) != k or x.data_ptr() % 16:
        x = F.pad(x, (0, -k % 8)).contiguous()  # the kernel reads rows in 16-byte pieces
    bias = bias.to(x.dtype).contiguous() if bias is not None else None
    if m <= MAX_ROWS:
        return c_ext.int4_mm_cuda(x, packed, scales_t, offsets_t, n, group_len, bias)
    return torch.cat([c_ext.int4_mm_cuda(x[i:i + MAX_ROWS], packed, scales_t, offsets_t, n, group_len, bias)
                      for i in range(0, m, MAX_ROWS)])
