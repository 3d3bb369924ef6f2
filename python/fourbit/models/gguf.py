"""Read Llama-family GGUF files (llama.cpp) through fourbit.gguf_file.

Tensors F32, F16, BF16 and F64 load as they are; Q4_0, Q4_1 and Q4_K load as Int4Weight with
no loss, in groups of 32 along K: Q4_1 stores w = q d + m, which is fourbit's format with
s = d; Q4_0 stores w = (q - 8) d, the symmetric case m = -8 d; Q4_K stores
w = d sc q - dmin mn (an fp16 d and dmin per 256 weights, 6-bit sc and mn per 32), which is
s = d sc and m = -dmin mn in fp32, where both products are exact (11 + 6 significant bits).
Q8_0 (w = q d, q int8, an fp16 d per 32) token embeddings and output heads load as an
Int8Weight of group size 32 with the fp16 d as scales, q * d being exact in fp32 (the loader
makes them an Int8Embedding / Int8Linear; GGUFCheckpoint(int8=False) dequantizes them instead).
Other Q8_0 tensors and every other type the `gguf` package can dequantize (Q5_K, Q6_K,
...) load as float32, exactly as that package dequantizes them. The integer types
(I8 to I64) load as integer tensors, which the loader rejects by name: a weight is never
made of a silent cast.

llama.cpp stores the rows of q and k permuted so that rotary pairs are adjacent; the
reader undoes that permutation (exactly, rows being independent) so the model uses the
rotate-half pairs of Hugging Face checkpoints for every source.
"""

from __future__ import annotations

import numpy as np
import torch

from ..format import Int4Weight, Int8Weight, pack_int4, select_rows
from ..gguf_file import GGUFFile
from .llama import LlamaConfig

# Bytes of one block of 32 weights: fp16 d (and fp16 m for Q4_1), then 16 bytes of nibbles.
_Q4_BLOCK = {"Q4_0": 18, "Q4_1": 20}
# Q4_K's super-block of 256 weights: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins
# of its eight sub-blocks of 32, then 128 bytes of nibbles.
_Q4_K_BLOCK, _Q4_K_WEIGHTS = 144, 256
# Q8_0's block of 32 weights: fp16 d, then 32 int8 q.
_Q8_0_BLOCK = 34


def read_config(file: GGUFFile) -> LlamaConfig:
    meta = file.metadata
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"GGUF architecture {arch!r} is not a Llama-family decoder fourbit can run (llama, qwen2)")
    if "rope_freqs.weight" in file.tensors:
        raise ValueError("GGUF files with rope_freqs (Llama 3.1 rope scaling) are not supported; load the "
                         "Hugging Face checkpoint instead")
    g = lambda name, default=None: meta.get(f"{arch}.{name}", default)  # noqa: E731
    for name in ("embedding_length", "feed_forward_length", "block_count", "attention.head_count"):
        value = g(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{file.path}: {arch}.{name} must be a positive int, "
                             f"got {value!r}")
    if not g("vocab_size") and not isinstance(meta.get("tokenizer.ggml.tokens"), list):
        raise ValueError(f"{file.path}: neither {arch}.vocab_size nor "
                         "tokenizer.ggml.tokens gives the vocabulary size")
    heads = g("attention.head_count")
    return LlamaConfig(
        vocab_size=g("vocab_size") or len(meta["tokenizer.ggml.tokens"]), hidden_size=g("embedding_length"),
        intermediate_size=g("feed_forward_length"), num_layers=g("block_count"), num_heads=heads,
        num_kv_heads=g("attention.head_count_kv", heads), head_dim=g("attention.key_length", 0),
        rms_norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=g("rope.freq_base", 10000.0),
        max_position_embeddings=g("context_length", 4096), tie_word_embeddings="output.weight" not in file.tensors,
        attention_bias=arch == "qwen2", bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))


def _blocks(tensor, block_bytes: int, weights: int = 32) -> np.ndarray:
    """uint8 [N, K / weights, block_bytes]: the blocks of `weights` weights of each row."""
    if len(tensor.shape) != 2 or tensor.shape[1] % weights:
        raise ValueError(f"GGUF tensor {tensor.name} of type {tensor.type_name} has shape {tensor.shape}: "
                         f"blocks of {weights} weights need an [N, K] matrix with K a multiple of {weights}")
    n, k = tensor.shape
    return tensor.data.reshape(n, k // weights, block_bytes)


def _fp16(bytes_: np.ndarray) -> torch.Tensor:
    """[..., 2] uint8 little-endian fp16 values -> float16 tensor [...]."""
    return torch.from_numpy(np.array(bytes_).view(np.float16)[..., 0])  # a copy: the file is read-only


def _q4_weight(tensor) -> Int4Weight:
    """A Q4_0 / Q4_1 tensor as an Int4Weight with fp16 scales and offsets, exactly."""
    n, k = tensor.shape
    blocks = _blocks(tensor, _Q4_BLOCK[tensor.type_name])
    d = _fp16(blocks[..., 0:2])                                                     # [n, k / 32]
    qs = torch.from_numpy(np.ascontiguousarray(blocks[..., -16:]))                  # [n, k / 32, 16]
    # Byte j of a block holds weight j (low nibble) and weight j + 16 (high nibble).
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, k)
    if tensor.type_name == "Q4_1":
        return Int4Weight(pack_int4(q), d, _fp16(blocks[..., 2:4]), 32, (n, k), symmetric=False)
    return Int4Weight(pack_int4(q), d, d * -8, 32, (n, k), symmetric=True)  # -8 d is exact in fp16


def _q4_k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., 12] uint8 -> the 6-bit (sc, mn) uint8 [..., 8] of a Q4_K super-block's sub-blocks.

    Bytes 0-3 hold sc[0..3] in their low 6 bits, bytes 4-7 mn[0..3]; sub-blocks 4-7 take
    their low 4 bits from bytes 8-11 (sc low nibble, mn high nibble) and their top 2 bits
    from the top 2 bits of bytes 0-3 (sc) and 4-7 (mn)."""
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc, mn


def _q4_k_weight(tensor) -> Int4Weight:
    """A Q4_K tensor as an Int4Weight of group size 32 with fp32 scales and offsets, exactly:
    d sc and dmin mn are exact in fp32, q s is too (4 more bits), so q s + m rounds once, as
    d sc q - dmin mn does in the gguf package's fp32 dequantization."""
    n, k = tensor.shape
    blocks = _blocks(tensor, _Q4_K_BLOCK, _Q4_K_WEIGHTS)                            # [n, k / 256, 144]
    d, dmin = _fp16(blocks[..., 0:2]).float(), _fp16(blocks[..., 2:4]).float()       # [n, k / 256]
    sc, mn = (torch.from_numpy(v).float() for v in _q4_k_scales_mins(blocks[..., 4:16]))  # [n, k / 256, 8]
    scales = (d[..., None] * sc).reshape(n, k // 32)
    offsets = (-(dmin[..., None] * mn)).reshape(n, k // 32)
    # The nibbles come in four runs of 32 bytes; byte l of run c holds weight 64 c + l (low
    # nibble, sub-block 2 c) and weight 64 c + 32 + l (high nibble, sub-block 2 c + 1).
    qs = torch.from_numpy(np.array(blocks[..., 16:])).view(n, k // _Q4_K_WEIGHTS, 4, 32)
    q = torch.empty(n, k // _Q4_K_WEIGHTS, 4, 2, 32, dtype=torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=q[..., 0, :])
    torch.bitwise_right_shift(qs, 4, out=q[..., 1, :])
    q = q.view(n, k)
    return Int4Weight(pack_int4(q), scales, offsets, 32, (n, k), symmetric=False)


def _q8_0_weight(tensor) -> Int8Weight:
    """A Q8_0 tensor (blocks of an fp16 d and 32 int8 q) as an Int8Weight with group size 32
    and the fp16 d as scales: no loss, q * d is exact in fp32 (8 + 11 significant bits)."""
    n, k = tensor.shape
    blocks = _blocks(tensor, _Q8_0_BLOCK)
    q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8)).reshape(n, k)
    return Int8Weight(q, _fp16(blocks[..., 0:2]), 32)


# ggml's element types of one value each, read as they are (the loader checks the dtype).
_PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}


def _dense_tensor(tensor) -> torch.Tensor:
    kind, shape = tensor.type_name, tensor.shape
    if kind in _PLAIN_TYPES:
        return torch.frombuffer(bytearray(tensor.data), dtype=_PLAIN_TYPES[kind]).reshape(shape)
    if kind == "Q8_0":  # 32 int8 weights per block, times an fp16 scale
        return _q8_0_weight(tensor).dequantize().reshape(shape)
    try:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize
        values = dequantize(tensor.data.reshape(shape[0], -1) if len(shape) > 1 else tensor.data,
                            GGMLQuantizationType(tensor.type))
    except (ImportError, NotImplementedError) as error:
        raise ValueError(f"GGUF tensor {tensor.name} has type {kind}: dequantizing it needs the gguf "
                         f"package ({error})") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def read_tensor(tensor):
    """A GGUFTensor as fourbit loads it: an Int4Weight (Q4_0, Q4_1, Q4_K), a float tensor
    (the plain float types, and every other block type dequantized to float32) or an
    integer tensor (I8 to I64)."""
    if tensor.type_name in _Q4_BLOCK:
        return _q4_weight(tensor)
    return _q4_k_weight(tensor) if tensor.type_name == "Q4_K" else _dense_tensor(tensor)


def _unpermute_rows(value, heads: int):
    """Undo llama.cpp's q/k row order (pairs (i, i + D/2) of a head stored as rows 2i, 2i + 1)."""
    rows = value.shape[0]
    index = torch.arange(rows).view(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)
    return select_rows(value, index) if isinstance(value, Int4Weight) else value[index]


class GGUFCheckpoint:
    """A GGUF file as a LlamaConfig and the tensors of models/llama.py's roles.

    int8: Q8_0 token embeddings and output heads are read as Int8Weight (True) or dequantized
    to float32 (False).
    """

    # The roles whose Q8_0 tensors are read as Int8Weight when int8 is on.
    INT8_ROLES = ("embed", "lm_head")

    def __init__(self, path, int8: bool = True):
        self.path, self.int8 = path, int8
        self.file = GGUFFile(path)
        self.config = read_config(self.file)
        self.arch = self.file.metadata["general.architecture"]
        self._tensors = self.file.tensors

    # llama.cpp's names of the parts of a layer (LAYER_TENSORS) and of the model's ends.
    _LAYER_NAMES = {"attn_norm": "attn_norm.weight", "ffn_norm": "ffn_norm.weight", "q": "attn_q.weight",
                    "k": "attn_k.weight", "v": "attn_v.weight", "o": "attn_output.weight",
                    "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
                    "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias"}
    _MODEL_NAMES = {"embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}

    def _get(self, name: str):
        if name not in self._tensors:
            raise ValueError(f"{self.path} has no tensor {name!r}")
        return read_tensor(self._tensors[name])

    def tensor_name(self, role: str, layer: int | None = None) -> str:
        """The file's name of the tensor of `role` in layer `layer` (None: the model's ends)."""
        return self._MODEL_NAMES[role] if layer is None else f"blk.{layer}.{self._LAYER_NAMES[role]}"

    @classmethod
    def reads_as_int8(cls, role: str, type_name: str) -> bool:
        """Whether a tensor of `role` (a model end or a layer part) stored as `type_name` is
        read as an Int8Weight when int8 is on (`fourbit inspect` says the same)."""
        return role in cls.INT8_ROLES and type_name == "Q8_0"

    def model_tensor(self, role: str):
        name = self.tensor_name(role)
        if self.int8 and name in self._tensors and self.reads_as_int8(role, self._tensors[name].type_name):
            return _q8_0_weight(self._tensors[name])
        return self._get(name)

    def layer_tensor(self, i: int, role: str):
        value = self._get(self.tensor_name(role, i))
        if self.arch == "llama" and role in ("q", "k"):
            heads = self.config.num_heads if role == "q" else self.config.num_kv_heads
            if value.shape[0] == heads * self.config.head_dim:  # else the loader names the wrong shape
                value = _unpermute_rows(value, heads)
        return value
