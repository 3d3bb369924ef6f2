"""The executable specification of every fourbit op, in plain PyTorch.

It is the "torch" backend (the CPU fallback, and correct on any device) and the oracle
every kernel is tested against. Nothing here is tuned for speed.
"""

from __future__ import annotations

import torch

from .format import dequantize


def int4_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
            group_len: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out = x @ dequantize(W).T + bias, accumulated in fp32, returned in x's dtype.

    Args:
        x: fp32, bf16 or fp16 [M, K].
        qweight: int32 [N, K_padded / 8], canonical packing (format.py).
        scales, offsets: [N, K_padded / group_len] in a compute dtype.
        group_len: input channels per group (K_padded for one group per row).
        bias: optional float [N].
    Returns:
        [M, N] in x's dtype.
    """
    w = dequantize(qweight, scales, offsets, group_len, x.shape[-1], torch.float32)
    out = x.to(torch.float32) @ w.T
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)
