"""AutoAWQ checkpoints (quant_method "awq"; AutoAWQ writes `version`, GPTQModel `format`).

GEMM (version "gemm"), for a linear layer W [N, K]:
    qweight  int32 [K, ceil(N/8)]: packed along N in AWQ's interleaved order: nibble i of
             word [k, j] holds q[8j + AWQ_ORDER[i], k], AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7).
    qzeros   int32 [groups, ceil(N/8)]: the zero points, packed the same way.
    scales   fp16 [groups, N]; groups = ceil(K / group_size).
GEMV (version "gemv"):
    qweight  int32 [N, K/8]: packed along K, nibble i of word j is q[n, 8j + i].
    qzeros   int32 [N, width]: the zero point of group g in nibble g % 8 of word g // 8.
    scales   fp16 [N, 8 * width]; width = ceil((K // group_size) / 8) rounded up to a
             multiple of 128 / group_size (group sizes 32, 64, >= 128); the extra are padding.
Both dequantize w[n, k] = (q[n, k] - z[n, g]) * s[n, g], g = k // group_size, with true
(never offset) zero points. modules_to_not_convert names modules (by substring) left float.
"""

from __future__ import annotations

import sys

import torch

from ...format import Int4Weight
from ._int4 import NIBBLES, Tensors, check, check_scales, groups_of, int4_weight, nibbles, words_needed
from .base import ConfigFields, LayerLayout, QuantizedFormat

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)           # nibble i of a word holds column AWQ_ORDER[i]
AWQ_NIBBLE_OF = tuple(AWQ_ORDER.index(c) for c in range(NIBBLES))  # column c sits in nibble this


def _awq_columns(words: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 [R, count]: the codes of AWQ-interleaved words [R, ceil(count/8)] in column order."""
    assert sys.byteorder == "little", "the int4 readers assume a little-endian host"
    r, width = words.shape
    b = words.contiguous().view(torch.uint8).view(r, width, 4)  # byte t: nibbles 2t (low), 2t + 1 (high)
    columns = [(b[:, :, p // 2] >> (4 * (p % 2))) & 0xF for p in AWQ_NIBBLE_OF]
    return torch.stack(columns, dim=-1).view(r, width * NIBBLES)[:, :count]


def read_awq_gemm_layer(layer: str, shape: tuple[int, int], tensors: Tensors, group_size: int) -> Int4Weight:
    n, k = shape
    groups = groups_of(k, group_size, layer)
    qweight = check(f"{layer}.qweight", tensors.get(f"{layer}.qweight"), (torch.int32,), (k, words_needed(n)))
    qzeros = check(f"{layer}.qzeros", tensors.get(f"{layer}.qzeros"), (torch.int32,), (groups, words_needed(n)))
    scales = check_scales(f"{layer}.scales", tensors.get(f"{layer}.scales"), (groups, n))
    zeros = _awq_columns(qzeros, n).t()
    return int4_weight(zeros, scales.t(), group_size, shape, None, layer, codes=_awq_columns(qweight, n))


def gemv_zeros_width(k: int, group_size: int, layer: str) -> int:
    groups_of(k, group_size, layer)
    multiple = {64: 2, 32: 4, 16: 8}.get(group_size, 1 if group_size >= 128 else None)
    if multiple is None or k % group_size:
        raise ValueError(f"{layer}: AWQ GEMV needs a group size of 16, 32, 64 or >= 128 that divides "
                         f"K = {k}, got {group_size}")
    width = words_needed(k // group_size)
    return -(-width // multiple) * multiple


def read_awq_gemv_layer(layer: str, shape: tuple[int, int], tensors: Tensors, group_size: int) -> Int4Weight:
    n, k = shape
    width = gemv_zeros_width(k, group_size, layer)
    groups = k // group_size
    qweight = check(f"{layer}.qweight", tensors.get(f"{layer}.qweight"), (torch.int32,), (n, words_needed(k)))
    qzeros = check(f"{layer}.qzeros", tensors.get(f"{layer}.qzeros"), (torch.int32,), (n, width))
    scales = check_scales(f"{layer}.scales", tensors.get(f"{layer}.scales"), (n, width * NIBBLES))
    return int4_weight(nibbles(qzeros, groups), scales[:, :groups], group_size, shape, None, layer,
                       words=qweight.t())


READERS = {"gemm": read_awq_gemm_layer, "gemv": read_awq_gemv_layer}


class AWQFormat(QuantizedFormat):
    def __init__(self, config: dict, where: str):
        fields = ConfigFields(config, where)
        version = fields.string("version", "format", default="gemm")
        if version not in READERS:
            raise fields.error("version", f"is {version!r}: fourbit reads the AWQ versions {sorted(READERS)}")
        fields.bits("bits", "w_bit")
        if not fields.boolean("zero_point", default=True):
            raise fields.error("zero_point", "is false: fourbit reads AWQ checkpoints with zero points only")
        self.group_size = fields.group_size("group_size", "q_group_size")
        if self.group_size == -1:
            raise fields.error("group_size", "is -1: AWQ checkpoints have a positive group size")
        skip = fields.get("modules_to_not_convert", default=[])
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise fields.error("modules_to_not_convert", f"must be a list of module names, got {skip!r}")
        self.skip, self.version = skip, version
        self.description = f"AWQ ({version})"

    def weight_name(self, layer: str) -> str | None:
        if layer == "lm_head" or any(name in layer for name in self.skip):
            return None
        return f"{layer}.qweight"

    def layout(self, layer: str) -> LayerLayout:
        return LayerLayout(f"awq-{self.version}", self.group_size)

    def read(self, layer: str, shape: tuple[int, int], tensors: Tensors) -> Int4Weight:
        return READERS[self.version](layer, shape, tensors, self.group_size)
