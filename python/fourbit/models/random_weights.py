"""Random weights for an architecture, served like a checkpoint: benchmarks build a
Llama-2-7B with them through the same loader as a real file, one layer at a time."""

from __future__ import annotations

import zlib

import torch

from .llama import LlamaConfig


class RandomCheckpoint:
    """Gaussian weights (std 0.02; norm weights 1) for config, generated on `device` when
    asked for. Each tensor has its own seed, so the model is the same however it is loaded."""

    def __init__(self, config: LlamaConfig, seed: int = 0, device="cpu"):
        self.config, self.seed, self.device = config, seed, torch.device(device)
        c = config
        d, h, kvh, hidden, inter = c.head_dim, c.num_heads, c.num_kv_heads, c.hidden_size, c.intermediate_size
        self._shapes = {
            "embed": (c.vocab_size, hidden), "norm": (hidden,), "lm_head": (c.vocab_size, hidden),
            "attn_norm": (hidden,), "ffn_norm": (hidden,), "q": (h * d, hidden), "k": (kvh * d, hidden),
            "v": (kvh * d, hidden), "o": (hidden, h * d), "gate": (inter, hidden), "up": (inter, hidden),
            "down": (hidden, inter), "q_bias": (h * d,), "k_bias": (kvh * d,), "v_bias": (kvh * d,)}

    def _tensor(self, role: str, name: str) -> torch.Tensor:
        shape = self._shapes[role]
        if role.endswith("norm"):
            return torch.ones(shape, device=self.device)
        generator = torch.Generator(self.device).manual_seed(zlib.crc32(f"{self.seed}/{name}".encode()))
        return torch.randn(shape, generator=generator, device=self.device) * 0.02

    def model_tensor(self, role: str) -> torch.Tensor:
        return self._tensor(role, role)

    def layer_tensor(self, i: int, role: str) -> torch.Tensor:
        return self._tensor(role, f"{i}.{role}")
