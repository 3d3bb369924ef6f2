"""A Llama-family decoder (Llama 1/2/3, Mistral, Qwen2, SmolLM2) on fourbit's layers and ops.

RMSNorm, rotary embeddings (rotate-half pairs, as Hugging Face stores q and k; Llama-3 and
linear rope scaling), grouped-query attention, SwiGLU MLP, tied or separate embeddings,
q/k/v biases where Qwen2 has them. The q, k, v projections are one fused `qkv_proj` and
gate and up one `gate_up_proj`: one matmul each, and one int4 kernel launch each once
quantized (Int4Linear or nn.Linear, whichever the loader put there).

Two ways to run it:
- model(input_ids [B, T]) with no context: a plain causal forward (SDPA), logits [B, T, V].
  Scoring and perplexity use it.
- model(input_ids [N], positions [N], context): the new tokens of a batch of sequences back
  to back over a PagedKVCache; each layer's PagedAttention writes its K and V and attends
  (decode or prefill) with the step's PagedBatch, planned once for all layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..kv_cache import PagedBatch, PagedKVCache
from ..nn import PagedAttention


@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0                  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False       # q, k, v biases (Qwen2)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    # Hugging Face config.json names of the fields that are named differently here.
    _HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                 "num_kv_heads": "num_key_value_heads"}

    @classmethod
    def from_hf(cls, config: dict | str | os.PathLike) -> LlamaConfig:
        """From a Hugging Face config.json (llama, mistral, qwen2 model types): its parsed dict,
        or the path of the file (a str or Path), which the errors then name.

        Raises:
            ValueError: the file is not JSON or not a JSON object; a required key
                (vocab_size, hidden_size, intermediate_size, num_hidden_layers,
                num_attention_heads) is missing; a value has the wrong type or range (sizes
                positive integers, num_attention_heads a multiple of num_key_value_heads, an
                even head_dim, positive rms_norm_eps and rope_theta, booleans, token ids);
                or the model is one fourbit cannot run (model_type, hidden_act, sliding
                window, rope scaling). The message names the key, and the file if given.
        """
        where = "config.json"
        if isinstance(config, (str, os.PathLike)):
            where = str(config)
            try:
                config = json.loads(Path(config).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{where} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{where} must hold a JSON object (a dict), got {type(config).__name__}")

        def bad(key: str, expected: str):
            return ValueError(f"{where}: {key} is {config[key]!r}: expected {expected}")

        model_type = config.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"{where}: model_type {model_type!r} is not a Llama-family decoder fourbit can run "
                             "(llama, mistral, qwen2)")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (silu only)")
        missing = [key for key in _HF_REQUIRED if config.get(key) is None]
        if missing:
            raise ValueError(f"{where}: required key(s) {missing} missing (or null)")
        for key in _HF_POSITIVE_INTS:
            if config.get(key) is not None and not (_is_int(config[key]) and config[key] > 0):
                raise bad(key, "a positive integer")
        for key in ("rms_norm_eps", "rope_theta"):
            if config.get(key) is not None and not (_is_number(config[key]) and config[key] > 0):
                raise bad(key, "a positive number")
        for key in ("tie_word_embeddings", "attention_bias", "use_sliding_window"):
            if config.get(key) is not None and not isinstance(config[key], bool):
                raise bad(key, "true or false")
        if config.get("bos_token_id") is not None and not _is_token_id(config["bos_token_id"]):
            raise bad("bos_token_id", "a token id (an integer >= 0) or null")
        eos = config.get("eos_token_id")
        if eos is not None and not (_is_token_id(eos) or isinstance(eos, list) and all(map(_is_token_id, eos))):
            raise bad("eos_token_id", "a token id, a list of token ids, or null")
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                             f"({kv_heads})")
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        if head_dim == 0 or head_dim % 2:
            derived = "" if config.get("head_dim") else " = hidden_size // num_attention_heads"
            raise ValueError(f"{where}: head_dim ({head_dim}{derived}) must be a positive even number: rotary "
                             "embeddings rotate pairs of channels")
        window = config.get("sliding_window")
        if window is not None and not (_is_int(window) and window > 0):
            raise bad("sliding_window", "a positive integer or null")
        if window and config.get("use_sliding_window", model_type == "mistral") and \
                window < config.get("max_position_embeddings", 0):
            raise ValueError(f"{where}: sliding-window attention is not supported (sliding_window {window})")
        # Newer transformers keep rope settings in "rope_parameters".
        rope = config.get("rope_parameters")
        if rope is not None and not isinstance(rope, dict):
            raise bad("rope_parameters", "an object (a dict) or null")
        rope = rope or {}
        if config.get("rope_theta") is None and rope.get("rope_theta") is not None and \
                not (_is_number(rope["rope_theta"]) and rope["rope_theta"] > 0):
            raise ValueError(f"{where}: rope_parameters.rope_theta is {rope['rope_theta']!r}: expected a positive "
                             "number")

        fields = {f.name for f in dataclasses.fields(cls)}
        values = {name: config[cls._HF_NAMES.get(name, name)] for name in fields
                  if cls._HF_NAMES.get(name, name) in config and config[cls._HF_NAMES.get(name, name)] is not None}
        values.setdefault("num_kv_heads", values["num_heads"])
        values.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if values.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
            values["rope_scaling"] = rope
        key = "rope_scaling" if config.get("rope_scaling") is not None else "rope_parameters"
        _check_rope_scaling(values.get("rope_scaling"), f"{where}: {key}")
        if model_type == "qwen2":
            values["attention_bias"] = True
        return cls(**values)

    def to_hf(self) -> dict:
        """A Hugging Face style config.json dict (model_type llama, or qwen2 with biases)."""
        out = {self._HF_NAMES.get(f.name, f.name): getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(model_type="qwen2" if self.attention_bias else "llama", hidden_act="silu",
                   architectures=["Qwen2ForCausalLM" if self.attention_bias else "LlamaForCausalLM"])
        return out


# config.json keys from_hf needs, and those that must be positive integers when present.
_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_HF_POSITIVE_INTS = (*_HF_REQUIRED, "num_key_value_heads", "head_dim", "max_position_embeddings")
# The rope scalings rope_inv_freq applies, and the numbers each needs.
ROPE_SCALING_KEYS = {"default": (), "linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_token_id(value) -> bool:
    return _is_int(value) and value >= 0


def _check_rope_scaling(scaling, where: str) -> None:
    """Raise ValueError (prefixed by `where`) unless scaling is None or a rope scaling rope_inv_freq
    applies, with positive numbers for each key it needs."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"{where} is {scaling!r}: expected an object (a dict) or null")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"{where}: rope_type {kind!r} is not supported ({', '.join(ROPE_SCALING_KEYS)})")
    for key in ROPE_SCALING_KEYS[kind]:
        if not (_is_number(scaling.get(key)) and scaling[key] > 0):
            raise ValueError(f"{where}: {key} is {scaling.get(key)!r}: {kind} scaling needs a positive number")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"{where}: high_freq_factor ({scaling['high_freq_factor']}) must be greater than "
                         f"low_freq_factor ({scaling['low_freq_factor']})")


# Architectures the benchmarks build with random weights (and whose layer shapes they time).
CONFIGS = {
    "llama-2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                              num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                              max_position_embeddings=4096, bos_token_id=1, eos_token_id=2),
    "llama-3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                              max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                                max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
                                eos_token_id=2),
}


def linear_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(N, K) of each linear layer of a decoder layer: the fused qkv and gate_up, o, down, and
    for grouped-query models the unfused k (= v) projection too."""
    d, h, kvh = config.head_dim, config.num_heads, config.num_kv_heads
    shapes = {"qkv": ((h + 2 * kvh) * d, config.hidden_size), "o": (config.hidden_size, h * d),
              "gate_up": (2 * config.intermediate_size, config.hidden_size),
              "down": (config.hidden_size, config.intermediate_size)}
    if kvh != h:
        shapes["k"] = (kvh * d, config.hidden_size)
    return shapes


# What each tensor of a layer is made of, in the checkpoint-neutral names the readers
# (gguf.py, hf.py) resolve: fused projections list their parts in row order.
LAYER_TENSORS = {
    "input_layernorm.weight": ("attn_norm",),
    "self_attn.qkv_proj.weight": ("q", "k", "v"),
    "self_attn.o_proj.weight": ("o",),
    "post_attention_layernorm.weight": ("ffn_norm",),
    "mlp.gate_up_proj.weight": ("gate", "up"),
    "mlp.down_proj.weight": ("down",),
}
LAYER_BIASES = {"self_attn.qkv_proj.bias": ("q_bias", "k_bias", "v_bias")}  # Qwen2


@dataclasses.dataclass(frozen=True)
class PagedContext:
    """What a paged forward needs besides its tokens: the cache whose pages each layer
    writes and reads, the step's PagedBatch (PagedKVCache.plan; validated once, read by
    every layer), and the attention backend ("auto" by default)."""
    cache: PagedKVCache
    batch: PagedBatch
    backend: str = "auto"


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalized in fp32 and scaled in x's dtype (as Hugging Face does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """fp32 [head_dim / 2] rotary frequencies, with Llama-3 or linear scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Frequencies whose wavelength exceeds the original context are slowed by `factor`,
        # short ones kept, and the band between blended smoothly (Llama 3.1).
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        slowed = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * slowed / factor + smooth * slowed
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, blended, slowed)
    elif kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., tokens, heads, D] by the angles of its tokens: cos, sin [tokens, D / 2].
    Pairs are (i, i + D/2), the rotate-half convention of Hugging Face checkpoints."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        qkv = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.attn = PagedAttention(config.num_heads, config.num_kv_heads, config.head_dim)

    def forward(self, x, cos, sin, context: PagedContext | None):
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([h * d, kvh * d, kvh * d], dim=-1)
        lead = x.shape[:-1]
        q = apply_rope(q.view(*lead, h, d), cos, sin)
        k = apply_rope(k.view(*lead, kvh, d), cos, sin)
        v = v.view(*lead, kvh, d)
        if context is None:  # [B, T, heads, D]: plain causal attention
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=True).transpose(1, 2)
        else:  # [N, heads, D] over the paged cache
            out = self.attn(q, k, v, *context.cache.layer(self.layer_idx), context.batch, context.backend)
        return self.o_proj(out.reshape(*lead, h * d))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, context):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, context)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """The decoder and its language-model head. Build it on the meta device and let a loader
    (fourbit.load_model) fill it: no float weights are materialized before they are read."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: that of the embeddings (an int8 embedding's output dtype)."""
        return getattr(self.embed_tokens, "dtype", None) or self.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                context: PagedContext | None = None, logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the next token.

        Args:
            input_ids: int64 [B, T] without context (positions 0 .. T-1, causal); with a
                context, int64 [N]: the new tokens of every sequence back to back.
            positions: int64 [N], each new token's position in its sequence (with context).
            context: the paged cache and its tables for these tokens (PagedContext).
            logits_rows: optional int64 indices into the tokens: only those rows go through
                the language-model head (generation needs the last token of each sequence).
        Returns:
            float logits in the model's dtype: [B, T, vocab] without context, [N, vocab] with
            it, or [len(logits_rows), vocab].
        """
        if context is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        elif positions is None:
            raise ValueError("a paged forward needs the positions of its tokens")
        angles = positions.float()[..., None] * self.inv_freq                     # [tokens, D / 2]
        cos, sin = angles.cos(), angles.sin()
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, context)
        x = self.norm(x)
        if logits_rows is not None:
            x = x.reshape(-1, x.shape[-1])[logits_rows]
        return self.lm_head(x)
