"""GPTQ checkpoints (GPTQModel, AutoGPTQ, optimum; quant_method "gptq").

Layout of one linear layer W [N, K] (`<layer>.` prefix):
    qweight  int32 [ceil(K/8), N]: packed along K; nibble i (bits 4i..4i+3) of word [j, n]
             is q[n, 8j + i].
    qzeros   int32 [groups, ceil(N/8)]: packed along N; nibble i of word [g, j] is the zero
             point of output 8j + i in group g.
    scales   fp16 (or bf16) [groups, N]; groups = ceil(K / group_size) (1 for group_size -1).
    g_idx    int32 [K], optional: the group of each input channel (act-order / desc_act).
    bias     [N], optional.
The tool dequantizes w[n, k] = (q[n, k] - z[n, g_idx[k]]) * s[g_idx[k], n], g_idx[k] =
k // group_size when absent.

Checkpoint formats: "gptq_v2" stores the true zero points; "gptq" (v1, the default) stores
them minus one, as whole words: GPTQModel reads v1 by adding 0x11111111 to every qzeros word
in 32-bit arithmetic (a stored 15 carries into the next nibble), the exact inverse of the
word subtraction its writers (and AutoRound's auto_gptq packer) apply, and so does this
reader. static_groups and true_sequential change nothing at load; desc_act shows in g_idx.
Per-module `dynamic` overrides (GPTQModel: "-:regex" leaves a module float, "+:regex" or
"regex" overrides bits / group_size) and optimum's modules_in_block_to_quantize are followed.
"""

from __future__ import annotations

import re

import torch

from ...format import Int4Weight
from ._int4 import Tensors, act_order_perm, check, check_scales, groups_of, int4_weight, nibbles, words_needed
from .base import ConfigFields, LayerLayout, QuantizedFormat

V1_ZERO_OFFSET = 0x11111111  # one added to each of a word's eight zero points, carries included

FORMATS = {"gptq": True, "gptq_v2": False}  # checkpoint format -> zero points stored minus one


def add_per_nibble_words(words: torch.Tensor, addend: int) -> torch.Tensor:
    """int32 words plus a constant, as 32-bit unsigned arithmetic (carries cross nibbles,
    the sum wraps at 2**32): the word arithmetic GPTQ's v1 -> v2 conversion uses."""
    total = ((words.to(torch.int64) & 0xFFFFFFFF) + addend) & 0xFFFFFFFF
    return torch.where(total >= 2**31, total - 2**32, total).to(torch.int32)


def read_gptq_layer(layer: str, shape: tuple[int, int], tensors: Tensors, group_size: int,
                    zeros_minus_one: bool) -> Int4Weight:
    """One GPTQ-packed linear layer as an Int4Weight (the module docstring gives the layout)."""
    n, k = shape
    groups = groups_of(k, group_size, layer)
    qweight = check(f"{layer}.qweight", tensors.get(f"{layer}.qweight"), (torch.int32,), (words_needed(k), n))
    qzeros = check(f"{layer}.qzeros", tensors.get(f"{layer}.qzeros"), (torch.int32,), (groups, words_needed(n)))
    scales = check_scales(f"{layer}.scales", tensors.get(f"{layer}.scales"), (groups, n))
    g_idx = tensors.get(f"{layer}.g_idx") if tensors.has(f"{layer}.g_idx") else None
    perm = act_order_perm(g_idx, k, group_size, groups, f"{layer}.g_idx")
    if zeros_minus_one:
        qzeros = add_per_nibble_words(qzeros, V1_ZERO_OFFSET)
    zeros = nibbles(qzeros, n).t()
    # qweight is packed along K, low nibble first: transposed, it is fourbit's own word order.
    return int4_weight(zeros, scales.t(), group_size, shape, perm, layer, words=qweight)


class GPTQFormat(QuantizedFormat):
    def __init__(self, config: dict, where: str):
        fields = ConfigFields(config, where)
        formats = {fields.string(key) for key in ("format", "checkpoint_format") if fields.get(key) is not None}
        if len(formats) > 1:
            raise fields.error("format", f"and checkpoint_format disagree: {sorted(formats)}")
        checkpoint_format = formats.pop() if formats else "gptq"
        if checkpoint_format not in FORMATS:
            raise fields.error("checkpoint_format", f"is {checkpoint_format!r}: fourbit reads GPTQ checkpoints "
                               f"in the formats {sorted(FORMATS)}")
        if fields.get("pack_dtype") not in (None, "int32"):
            raise fields.error("pack_dtype", f"is {fields.get('pack_dtype')!r}: fourbit reads int32 words only")
        self.fields = fields
        self.zeros_minus_one = FORMATS[checkpoint_format]
        self.bits = fields.bits("bits")
        self.group_size = fields.group_size("group_size")
        self.lm_head = fields.boolean("lm_head", default=False)
        self.dynamic = fields.get("dynamic", default={})
        if not isinstance(self.dynamic, dict):
            raise fields.error("dynamic", "must be a JSON object of module patterns")
        in_block = fields.get("modules_in_block_to_quantize")
        self.in_block = None if in_block is None else set(_flatten(in_block))
        self.description = f"GPTQ ({checkpoint_format})"

    def _override(self, layer: str):
        """The first `dynamic` pattern matching the module: False (left float), its overrides
        dict, or None (no pattern matches)."""
        for pattern, overrides in self.dynamic.items():
            negative = pattern.startswith("-:")
            raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
            if re.match(raw, layer):
                return False if negative else dict(overrides or {})
        return None

    def weight_name(self, layer: str) -> str | None:
        if layer == "lm_head" and not self.lm_head:
            return None
        if self.in_block is not None and layer != "lm_head" and not any(layer.endswith("." + m) for m in self.in_block):
            return None
        if self._override(layer) is False:
            return None
        return f"{layer}.qweight"

    def layout(self, layer: str) -> LayerLayout:
        overrides = ConfigFields(self._override(layer) or {}, self.fields.where,
                                 f"quantization_config.dynamic[{layer!r}]")
        if overrides.get("bits") is not None:
            overrides.bits("bits", layer=layer)
        group_size = overrides.group_size("group_size") if overrides.get("group_size") is not None \
            else self.group_size
        return LayerLayout("gptq", group_size, zeros_minus_one=self.zeros_minus_one)

    def read(self, layer: str, shape: tuple[int, int], tensors: Tensors) -> Int4Weight:
        layout = self.layout(layer)
        return read_gptq_layer(layer, shape, tensors, layout.group_size, layout.zeros_minus_one)


def _flatten(items) -> list[str]:
    if isinstance(items, str):
        return [items]
    return [name for item in items for name in _flatten(item)]

