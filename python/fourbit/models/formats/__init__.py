"""Readers of int4 safetensors checkpoints: GPTQ (gptq.py), AutoAWQ (awq.py),
compressed-tensors pack-quantized (compressed_tensors.py) and AutoRound (auto_round.py), each
converting a quantized linear layer into a fourbit Int4Weight exactly (the weight fourbit
computes with, dequantized in fp32, is the tool's own dequantization in fp32).

The format is read from config.json's quantization_config (quant_method, then the format /
checkpoint_format / version / packing_format fields), never guessed from names or tensors.
"""

from __future__ import annotations

from ...format import Int4Weight
from ._int4 import Tensors
from .auto_round import AutoRoundFormat
from .awq import AWQFormat, read_awq_gemm_layer, read_awq_gemv_layer
from .base import LayerLayout, QuantizedFormat
from .compressed_tensors import CompressedTensorsFormat, read_pack_quantized_layer
from .gptq import GPTQFormat, read_gptq_layer

READERS = {"gptq": GPTQFormat, "awq": AWQFormat, "compressed-tensors": CompressedTensorsFormat,
           "auto-round": AutoRoundFormat, "intel/auto-round": AutoRoundFormat}

__all__ = ["LayerLayout", "QuantizedFormat", "READERS", "Tensors", "detect", "read_layout"]


def detect(quantization_config, where: str) -> QuantizedFormat | None:
    """The reader for a config.json's quantization_config (None when it has none).

    Raises:
        ValueError: a quant_method fourbit does not read (bitsandbytes, fp8, hqq, ...), or a
            quantization_config whose fields describe something the reader cannot hold
            (bits other than 4, another packing, activation quantization), naming the field
            and the file.
    """
    if quantization_config is None:
        return None
    if not isinstance(quantization_config, dict):
        raise ValueError(f"{where}: quantization_config must be a JSON object")
    method = quantization_config.get("quant_method")
    method = method.lower() if isinstance(method, str) else method
    if method not in READERS:
        raise ValueError(f"{where}: quantization_config.quant_method {method!r} is not one fourbit reads "
                         f"({', '.join(sorted(READERS))})")
    return READERS[method](quantization_config, where)


def read_layout(layer: str, shape: tuple[int, int], tensors: Tensors, layout: LayerLayout) -> Int4Weight:
    """The Int4Weight of one layer [N, K] stored as `layout` says (a reader's layout(layer)):
    the conversion every reader's read() runs, for callers that hold the tensors themselves
    (fourbit.integrations.vllm, per vLLM layer and shard)."""
    if layout.packing == "gptq":
        return read_gptq_layer(layer, shape, tensors, layout.group_size, layout.zeros_minus_one)
    if layout.packing == "awq-gemm":
        return read_awq_gemm_layer(layer, shape, tensors, layout.group_size)
    if layout.packing == "awq-gemv":
        return read_awq_gemv_layer(layer, shape, tensors, layout.group_size)
    if layout.packing == "pack-quantized":
        return read_pack_quantized_layer(layer, shape, tensors, layout.strategy, layout.group_size, layout.symmetric)
    raise ValueError(f"{layer}: unknown int4 packing {layout.packing!r}")
