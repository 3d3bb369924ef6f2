"""The interface every int4 format reader implements, and config.json field checks."""

from __future__ import annotations

import dataclasses

from ...format import Int4Weight
from ._int4 import Tensors


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    """How the config says one quantized layer's tensors are stored: what read() converts.

    packing: "gptq" (qweight / qzeros / scales / g_idx), "awq-gemm", "awq-gemv" or
        "pack-quantized" (compressed-tensors); group_size: the tool's (-1: one group per row);
        zeros_minus_one: GPTQ v1 zero points; symmetric and strategy: compressed-tensors'.
    """
    packing: str
    group_size: int
    zeros_minus_one: bool = False
    symmetric: bool = False
    strategy: str = "group"


class QuantizedFormat:
    """An int4 checkpoint format as its config describes it.

    weight_name(layer) says whether a linear layer (its module name, "model.layers.0.mlp.up_proj",
    "lm_head") is quantized, as the name of its main packed tensor, or None (a float layer,
    read as `layer.weight`). layout(layer) is the LayerLayout of a quantized layer (raising
    ValueError for one the config gives settings fourbit cannot hold). read(layer, (N, K),
    tensors) converts the layer's tensors into an Int4Weight exactly (formats.read_layout of
    its layout), raising ValueError naming the tensor that is missing or inconsistent.
    """

    description = "int4"

    def weight_name(self, layer: str) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def layout(self, layer: str) -> LayerLayout:  # pragma: no cover - interface
        raise NotImplementedError

    def read(self, layer: str, shape: tuple[int, int], tensors: Tensors) -> Int4Weight:  # pragma: no cover
        raise NotImplementedError


class ConfigFields:
    """Typed reads of a quantization_config dict whose errors name the field and file."""

    def __init__(self, config: dict, where: str, prefix: str = "quantization_config"):
        if not isinstance(config, dict):
            raise ValueError(f"{where}: {prefix} must be a JSON object, got {type(config).__name__}")
        self.config, self.where, self.prefix = config, where, prefix

    def error(self, key: str, message: str) -> ValueError:
        return ValueError(f"{self.where}: {self.prefix}.{key} {message}")

    def get(self, *keys: str, default=None):
        """The first of keys present (aliases: "bits" / "w_bit"), else default."""
        for key in keys:
            if key in self.config and self.config[key] is not None:
                return self.config[key]
        return default

    def integer(self, *keys: str, default=None) -> int:
        value = self.get(*keys, default=default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(keys[0], f"must be an integer, got {value!r}")
        return value

    def boolean(self, *keys: str, default=None) -> bool:
        value = self.get(*keys, default=default)
        if not isinstance(value, bool):
            raise self.error(keys[0], f"must be true or false, got {value!r}")
        return value

    def string(self, *keys: str, default=None) -> str:
        value = self.get(*keys, default=default)
        if not isinstance(value, str):
            raise self.error(keys[0], f"must be a string, got {value!r}")
        return value.lower()

    def bits(self, *keys: str, layer: str | None = None) -> int:
        bits = self.integer(*keys)
        if bits != 4:
            where = f" (layer {layer})" if layer else ""
            raise self.error(keys[0], f"is {bits}{where}: fourbit reads 4-bit checkpoints only")
        return bits

    def group_size(self, *keys: str) -> int:
        size = self.integer(*keys)
        if size != -1 and size < 1:
            raise self.error(keys[0], f"must be -1 or a positive integer, got {size}")
        return size
