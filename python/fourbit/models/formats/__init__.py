"""Readers of int4 safetensors checkpoints: GPTQ (gptq.py), AutoAWQ (awq.py),
compressed-tensors pack-quantized (compressed_tensors.py) and AutoRound (auto_round.py), each
converting a quantized linear layer into a fourbit Int4Weight exactly (the weight fourbit
computes with, dequantized in fp32, is the tool's own dequantization in fp32).

The format is read from config.json's quantization_config (quant_method, then the format /
checkpoint_format / version / packing_format fields), never guessed from names or tensors.
"""

from __future__ import annotations

from ._int4 import Tensors
from .auto_round import AutoRoundFormat
from .awq import AWQFormat
from .base import QuantizedFormat
from .compressed_tensors import CompressedTensorsFormat
from .gptq import GPTQFormat

READERS = {"gptq": GPTQFormat, "awq": AWQFormat, "compressed-tensors": CompressedTensorsFormat,
           "auto-round": AutoRoundFormat, "intel/auto-round": AutoRoundFormat}

__all__ = ["QuantizedFormat", "READERS", "Tensors", "detect"]


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
