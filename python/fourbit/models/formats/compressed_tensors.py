"""compressed-tensors checkpoints (llm-compressor; quant_method "compressed-tensors", format
"pack-quantized"), 4-bit integer weights with no activation quantization (W4A16).

For a linear layer W [N, K] (`<layer>.` prefix):
    weight_packed      int32 [N, ceil(K/8)]: packed along K, nibble i of word j is column 8j + i,
                       each the signed code x in [-8, 7] stored as x + 8.
    weight_shape       int [2]: (N, K).
    weight_scale       fp16 / bf16 / fp32 [N, groups]: groups = ceil(K / group_size) for the
                       "group" strategy, 1 for "channel" (a scalar for "tensor").
    weight_zero_point  asymmetric schemes: int32 [ceil(N/8), groups] packed along N the same
                       way (signed zero + 8; compressed-tensors >= 0.10), or the signed int8
                       [N, groups] of older writers. Symmetric schemes have none (zero = 0).
    weight_g_idx       int32 [K], optional (actorder "group"): the group of each input channel;
                       -1 everywhere means column order.
The tool dequantizes (x - zero) * scale, i.e. (u - (zero + 8)) * scale with u the stored
nibble: fourbit's q is u and its integer zero point zero + 8.

A module is quantized by the config group whose `targets` match it (an exact module name
over a "re:" regular expression over a class name, "Linear"), unless `ignore` matches it.
"""

from __future__ import annotations

import re

import torch

from ...format import Int4Weight
from ._int4 import Tensors, act_order_perm, check, check_scales, groups_of, int4_weight, nibbles, words_needed
from .base import ConfigFields, LayerLayout, QuantizedFormat

PACKED = "pack-quantized"
STRATEGIES = ("group", "channel", "tensor")
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def _match(target: str, layer: str) -> int:
    """How specifically a target names a Linear module: 3 its name, 2 a "re:" pattern, 1 its
    class, 0 not at all."""
    if target == layer:
        return 3
    if target.startswith("re:"):
        return 2 if re.match(target[3:], layer) else 0
    return 1 if target == "Linear" else 0


class CompressedTensorsFormat(QuantizedFormat):
    description = "compressed-tensors (pack-quantized)"

    def __init__(self, config: dict, where: str):
        fields = ConfigFields(config, where)
        self.fields, self.where = fields, where
        self.format = fields.string("format", default=PACKED)
        groups = fields.get("config_groups", default={})
        if not isinstance(groups, dict) or not groups:
            raise fields.error("config_groups", "must be a non-empty JSON object of quantization schemes")
        self.groups = groups
        ignore = fields.get("ignore", default=[])
        if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
            raise fields.error("ignore", f"must be a list of module names or patterns, got {ignore!r}")
        self.ignore = ignore
        sparsity = fields.get("sparsity_config", default={})
        if sparsity and (not isinstance(sparsity, dict) or sparsity.get("format", "dense") != "dense"):
            raise fields.error("sparsity_config", "describes sparse weights: fourbit reads dense ones only")
        if fields.get("transform_config"):
            raise fields.error("transform_config", "describes weight transforms (rotations): fourbit cannot "
                               "apply them")

    def _scheme(self, layer: str):
        """(group name, scheme) of the config group that quantizes the module, or None."""
        if any(_match(target, layer) for target in self.ignore):
            return None
        best, found = 0, []
        for name, scheme in self.groups.items():
            targets = scheme.get("targets", []) if isinstance(scheme, dict) else []
            score = max((_match(t, layer) for t in targets if isinstance(t, str)), default=0)
            if score > best:
                best, found = score, [(name, scheme)]
            elif score and score == best:
                found.append((name, scheme))
        if len(found) > 1:
            raise self.fields.error("config_groups", f"{[n for n, _ in found]} all target {layer} equally")
        return found[0] if found else None

    def weight_name(self, layer: str) -> str | None:
        return None if self._scheme(layer) is None else f"{layer}.weight_packed"

    def _weights(self, layer: str):
        """The checked weights scheme of the module: (strategy, group_size, symmetric)."""
        group, scheme = self._scheme(layer)
        prefix = f"quantization_config.config_groups.{group}"
        fields = ConfigFields(scheme, self.where, prefix)
        scheme_format = fields.string("format", default=self.format)
        if scheme_format != PACKED:
            raise fields.error("format", f"is {scheme_format!r} (module {layer}): fourbit reads {PACKED!r} only")
        for activations in ("input_activations", "output_activations"):
            if fields.get(activations) is not None:
                raise fields.error(activations, f"quantizes activations (module {layer}): fourbit reads "
                                   f"weight-only (W4A16) schemes")
        weights = ConfigFields(fields.get("weights", default={}), self.where, prefix + ".weights")
        weights.bits("num_bits", layer=layer)
        if weights.string("type", default="int") != "int":
            raise weights.error("type", f"is {weights.get('type')!r}: fourbit reads integer weights only")
        if weights.get("dynamic", default=False) not in (False, "false"):
            raise weights.error("dynamic", "is set: dynamic weight scales are not stored")
        strategy = weights.string("strategy")
        if strategy not in STRATEGIES:
            raise weights.error("strategy", f"is {strategy!r}: fourbit reads the strategies {STRATEGIES}")
        group_size = weights.group_size("group_size") if strategy == "group" else -1
        return strategy, group_size, weights.boolean("symmetric", default=True)

    def layout(self, layer: str) -> LayerLayout:
        strategy, group_size, symmetric = self._weights(layer)
        return LayerLayout(PACKED, group_size, symmetric=symmetric, strategy=strategy)

    def read(self, layer: str, shape: tuple[int, int], tensors: Tensors) -> Int4Weight:
        layout = self.layout(layer)
        return read_pack_quantized_layer(layer, shape, tensors, layout.strategy, layout.group_size, layout.symmetric)


def read_pack_quantized_layer(layer: str, shape: tuple[int, int], tensors: Tensors, strategy: str, group_size: int,
                              symmetric: bool) -> Int4Weight:
    """One pack-quantized linear layer as an Int4Weight (the module docstring gives the layout)."""
    n, k = shape
    groups = groups_of(k, group_size, layer)
    packed = check(f"{layer}.weight_packed", tensors.get(f"{layer}.weight_packed"), (torch.int32,),
                   (n, words_needed(k)))
    stored_shape = check(f"{layer}.weight_shape", tensors.get(f"{layer}.weight_shape"), INT_DTYPES, (2,))
    if stored_shape.tolist() != [n, k]:
        raise ValueError(f"checkpoint tensor {layer + '.weight_shape'!r} is {stored_shape.tolist()}; the model "
                         f"expects {[n, k]}")
    scales = tensors.get(f"{layer}.weight_scale")
    if strategy == "tensor":
        if scales.numel() != 1:
            raise ValueError(f"checkpoint tensor {layer + '.weight_scale'!r} has shape {tuple(scales.shape)}; "
                             f"the tensor strategy has one scale")
        scales = scales.reshape(1, 1).expand(n, 1)
    scales = check_scales(f"{layer}.weight_scale", scales, (n, groups))
    zeros = _zeros(layer, tensors, n, groups, symmetric, strategy)
    g_idx = tensors.get(f"{layer}.weight_g_idx") if tensors.has(f"{layer}.weight_g_idx") else None
    if g_idx is not None and bool((g_idx == -1).any()):
        g_idx = None  # never initialized: column order
    perm = act_order_perm(g_idx, k, group_size, groups, f"{layer}.weight_g_idx")
    return int4_weight(zeros, scales, group_size, shape, perm, layer, words=packed.t())


def _zeros(layer: str, tensors: Tensors, n: int, groups: int, symmetric: bool, strategy: str) -> torch.Tensor:
    """fourbit's integer zero points uint8 [N, groups]: the signed zero + 8."""
    name = f"{layer}.weight_zero_point"
    if not tensors.has(name):
        if not symmetric:
            tensors.get(name)  # raises, naming the missing tensor
        return torch.full((n, groups), 8, dtype=torch.uint8)
    zero = tensors.get(name)
    if strategy == "tensor" and zero.numel() == 1:
        zero = zero.reshape(1, 1).expand(n, 1)
    if zero.dtype == torch.int32 and tuple(zero.shape) == (words_needed(n), groups) and n > 1:
        return nibbles(zero.t(), n).t()  # packed along N: nibbles already hold zero + 8
    check(name, zero, INT_DTYPES, (n, groups))
    if zero.numel() and (int(zero.min()) < -8 or int(zero.max()) > 7):
        raise ValueError(f"checkpoint tensor {name!r} holds zero points outside the signed 4-bit range [-8, 7]")
    return (zero.to(torch.int16) + 8).to(torch.uint8)
