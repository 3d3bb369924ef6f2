"""AutoRound checkpoints (quant_method "auto-round" or "intel/auto-round").

AutoRound writes its integer weights in other tools' layouts, named by packing_format:
    "auto_round:auto_gptq" (what symmetric exports become), "auto_gptq", "auto_round:gptq":
        the GPTQ layout with zero points stored minus one (GPTQ v1; AutoRound packs the
        zeros - 1 by summing shifted values, the same word arithmetic as GPTQModel's);
    "auto_round", "auto_round:gptqmodel", "auto_round:exllamav2": the GPTQ layout with true
        zero points (g_idx present for gptqmodel);
    "auto_round:auto_awq", "auto_awq": AWQ's GEMM layout.
Layers: the linear layers under block_name_to_quantize (default every decoder layer) take
the top-level bits / group_size / sym; extra_config overrides them per layer (its key the
module name or a regular expression), bits >= 16 leaving a layer float, and names any layer
outside the blocks (lm_head) that is quantized. data_type must be an integer type.
"""

from __future__ import annotations

import re

from ...format import Int4Weight
from ._int4 import Tensors
from .awq import read_awq_gemm_layer
from .base import ConfigFields, LayerLayout, QuantizedFormat
from .gptq import read_gptq_layer

GPTQ_V1 = ("auto_round:auto_gptq", "auto_gptq", "auto_round:gptq")
GPTQ_TRUE_ZEROS = ("auto_round", "auto_round:gptqmodel", "auto_round:exllamav2")
AWQ_GEMM = ("auto_round:auto_awq", "auto_awq")
FLOAT_BITS = 16


class AutoRoundFormat(QuantizedFormat):
    def __init__(self, config: dict, where: str):
        fields = ConfigFields(config, where)
        self.fields = fields
        self.packing = fields.string("packing_format", default="auto_round:auto_gptq")
        if self.packing not in GPTQ_V1 + GPTQ_TRUE_ZEROS + AWQ_GEMM:
            raise fields.error("packing_format", f"is {self.packing!r}: fourbit reads AutoRound's "
                               f"{sorted(GPTQ_V1 + GPTQ_TRUE_ZEROS + AWQ_GEMM)}")
        self.bits = fields.integer("bits")
        self.group_size = fields.group_size("group_size")
        self.data_type = fields.string("data_type", default="int")
        if fields.integer("act_bits", default=16) < 16:
            raise fields.error("act_bits", "quantizes activations: fourbit reads weight-only checkpoints")
        blocks = fields.get("block_name_to_quantize", default="model.layers")
        blocks = [b.strip() for b in blocks.split(",")] if isinstance(blocks, str) else blocks
        if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks):
            raise fields.error("block_name_to_quantize", f"must be a module name or a list of them, got {blocks!r}")
        self.blocks = blocks
        extra = fields.get("extra_config", default={})
        if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
            raise fields.error("extra_config", "must map module names or patterns to JSON objects")
        self.extra = extra
        self.description = f"AutoRound ({self.packing})"

    def _layer_config(self, layer: str) -> dict | None:
        """The extra_config entry of a module: its exact name first, else the first pattern
        that matches it; None when there is none."""
        if layer in self.extra:
            return self.extra[layer]
        for pattern, value in self.extra.items():
            try:
                if re.search(pattern, layer):
                    return value
            except re.error:
                continue
        return None

    def _settings(self, layer: str) -> ConfigFields:
        extra = self._layer_config(layer) or {}
        base = {"bits": self.bits, "group_size": self.group_size, "data_type": self.data_type}
        return ConfigFields({**base, **{k: v for k, v in extra.items() if v is not None}}, self.fields.where,
                            f"quantization_config.extra_config[{layer!r}]" if extra else "quantization_config")

    def weight_name(self, layer: str) -> str | None:
        extra = self._layer_config(layer)
        in_blocks = any(layer == b or layer.startswith(b + ".") for b in self.blocks)
        if extra is None and not in_blocks:
            return None
        bits = self._settings(layer).integer("bits")
        return None if bits >= FLOAT_BITS else f"{layer}.qweight"

    def layout(self, layer: str) -> LayerLayout:
        settings = self._settings(layer)
        settings.bits("bits", layer=layer)
        data_type = settings.string("data_type")
        if not data_type.startswith("int"):
            raise settings.error("data_type", f"is {data_type!r} (layer {layer}): fourbit reads integer weights only")
        group_size = settings.group_size("group_size")
        if self.packing in AWQ_GEMM:
            return LayerLayout("awq-gemm", group_size)
        return LayerLayout("gptq", group_size, zeros_minus_one=self.packing in GPTQ_V1)

    def read(self, layer: str, shape: tuple[int, int], tensors: Tensors) -> Int4Weight:
        layout = self.layout(layer)
        if layout.packing == "awq-gemm":
            return read_awq_gemm_layer(layer, shape, tensors, layout.group_size)
        return read_gptq_layer(layer, shape, tensors, layout.group_size, layout.zeros_minus_one)
