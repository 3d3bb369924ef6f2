"""Test helpers: random int4 weights built independently of fourbit's own dequantize, and
the error measure every kernel test uses."""

from __future__ import annotations

import torch

import fourbit
from fourbit.format import padded_k

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_int4_weight(n: int, k: int, group_size: int, symmetric: bool, dtype: torch.dtype,
                       device="cpu", generator=None):
    """A random Int4Weight and its dequantized fp64 matrix [n, k], computed here by
    plain arithmetic on the unpacked q (not by fourbit's dequantize)."""
    k_pad = padded_k(k, group_size)
    glen = k_pad if group_size == -1 else group_size
    groups = k_pad // glen
    q = torch.randint(0, 16, (n, k_pad), generator=generator)
    q[:, k:] = 0
    scales = (torch.rand(n, groups, generator=generator) * 0.02 + 0.005).to(dtype)
    offsets = -8 * scales if symmetric else (-torch.rand(n, groups, generator=generator) * 0.15).to(dtype)
    weight = fourbit.Int4Weight(fourbit.pack_int4(q), scales, offsets, group_size, (n, k), symmetric).to(device)
    s = scales.double().repeat_interleave(glen, dim=1)
    m = offsets.double().repeat_interleave(glen, dim=1)
    dense = (q.double() * s + m)[:, :k]
    return weight, dense.to(device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def assert_matmul_accuracy(out, x, dense, bias=None):
    """out must be as close to the fp64 result as plain PyTorch in x's dtype is: relative
    error at most twice that of torch's own matmul on the same inputs (DESIGN.md), with a
    floor of a few fp32 roundings for fp32, where both errors are near 1e-7."""
    ref = x.double() @ dense.T + (bias.double() if bias is not None else 0)
    plain = x @ dense.to(x.dtype).T + (bias.to(x.dtype) if bias is not None else 0)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err, err_plain = relative_error(out, ref), relative_error(plain, ref)
    floor = 4 * torch.finfo(torch.float32).eps
    assert err <= 2 * err_plain + floor, f"relative error {err:.3g} vs torch {err_plain:.3g}"


class TinyLM(torch.nn.Module):
    """A small pre-norm transformer LM (attention + SwiGLU MLP, tied or separate lm_head)
    with the Llama module names, for quantize_ / checkpoint / compile tests."""

    def __init__(self, vocab=256, dim=128, hidden=352, layers=2, heads=4, tied=False, bias=False):
        super().__init__()
        nn = torch.nn
        self.heads = heads
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.input_layernorm = nn.RMSNorm(dim)
            layer.q_proj, layer.k_proj = nn.Linear(dim, dim, bias=bias), nn.Linear(dim, dim, bias=bias)
            layer.v_proj, layer.o_proj = nn.Linear(dim, dim, bias=bias), nn.Linear(dim, dim, bias=False)
            layer.post_attention_layernorm = nn.RMSNorm(dim)
            layer.gate_proj, layer.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
            layer.down_proj = nn.Linear(hidden, dim, bias=False)
            self.layers.append(layer)
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        h = self.embed_tokens(ids)
        b, t, d = h.shape
        for layer in self.layers:
            x = layer.input_layernorm(h)
            projections = (layer.q_proj, layer.k_proj, layer.v_proj)
            q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in projections)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + layer.o_proj(a.transpose(1, 2).reshape(b, t, d))
            x = layer.post_attention_layernorm(h)
            h = h + layer.down_proj(torch.nn.functional.silu(layer.gate_proj(x)) * layer.up_proj(x))
        return self.lm_head(self.norm(h))


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))
