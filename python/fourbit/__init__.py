"""fourbit: quantized inference kernels for LLMs.

int4 weight-only matmul (W4A16) with per-group scales and offsets (and int8 weight-only for
GGUF Q8_0 embeddings and heads), drop-in modules to
quantize a model, safetensors checkpoints, and a paged KV cache with paged attention.
See README.md for the format and the API.
"""

from .checkpoint import load_quantized, save_quantized
from .evaluate import perplexity
from .format import GROUP_SIZES, Int4Weight, Int8Weight, pack_int4, unpack_int4
from .generate import generate
from .kv_cache import BlockAllocator, OutOfBlocks, PagedBatch, PagedKVCache
from .models import load_model, load_tokenizer, save_model
from .nn import Int4Linear, Int8Embedding, Int8Linear, PagedAttention, quantize_, tune
from .ops import (
    available_backends,
    choose_attention_backend,
    choose_backend,
    int4_linear,
    int8_linear,
    paged_attention,
    paged_prefill_attention,
    write_kv,
)
from .quantize import Int4WeightOnlyConfig, quantize_int8_weight, quantize_weight

__version__ = "0.1.0"

__all__ = [
    "BlockAllocator", "GROUP_SIZES", "Int4Linear", "Int4Weight", "Int4WeightOnlyConfig", "Int8Embedding",
    "Int8Linear", "Int8Weight", "OutOfBlocks", "PagedAttention", "PagedBatch", "PagedKVCache",
    "available_backends", "choose_attention_backend", "choose_backend", "generate", "int4_linear", "int8_linear",
    "load_model", "load_quantized", "load_tokenizer", "pack_int4", "paged_attention", "paged_prefill_attention",
    "perplexity", "quantize_", "quantize_int8_weight", "quantize_weight", "save_model", "save_quantized", "tune",
    "unpack_int4", "write_kv",
]
