"""The "cuda" backend of int4_mm: the tensor-core kernel of csrc/cuda/int4_mm.cu.

The kernel reads its own layout (format.prepack_mma_weight): the packed words
int32 [N_pad / 16, K_pad / 64 * 128] and scales and offsets transposed to [groups, N].
Int4Linear converts to it once, when the layer is loaded or moved (nn.py); a call on a
canonical Int4Weight (fourbit.int4_linear) converts for that call only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _C

MAX_ROWS = 64  # rows of x per launch; more are done 64 at a time


def int4_mm(x, packed, scales_t, offsets_t, group_len: int, bias=None):
    """x fp16/bf16 [M, K] @ int4 weight [N, K] in the kernel's layout -> [M, N] in x's dtype.

    Args:
        x: fp16 or bf16 [M, K], any strides.
        packed: int32 [N_pad / 16, K_pad / 64 * 128] (format.prepack_mma).
        scales_t, offsets_t: [groups, N], any float dtype (cast to x's for the kernel).
        group_len: input channels per group; bias: optional float [N].
    """
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the CUDA int4 kernel takes float16 or bfloat16 activations, got {x.dtype}; "
                        "use backend='triton' or cast x")
    m, k = x.shape
    n = scales_t.shape[1]
    scales_t, offsets_t = scales_t.to(x.dtype), offsets_t.to(x.dtype)  # no copy when they match
    if k % 8 or x.stride(-1) != 1 or x.stride(0) != k or x.data_ptr() % 16:
        x = F.pad(x, (0, -k % 8)).contiguous()  # the kernel reads rows in 16-byte pieces
    bias = bias.to(x.dtype).contiguous() if bias is not None else None
    if m <= MAX_ROWS:
        return _C.int4_mm_cuda(x, packed, scales_t, offsets_t, n, group_len, bias)
    return torch.cat([_C.int4_mm_cuda(x[i:i + MAX_ROWS], packed, scales_t, offsets_t, n, group_len, bias)
                      for i in range(0, m, MAX_ROWS)])
