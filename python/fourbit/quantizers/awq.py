"""Activation-aware weight scaling (after Lin et al., 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration").

A linear layer's input channels that carry large activations matter more: scaling weight
column j up by s_j before rounding (and the input down by s_j) gives those channels a finer
grid at no float cost, y = (W diag(s)) (diag(s)^-1 x). The input's 1/s is folded into the
operation that produces it, so nothing is added at inference:

    input_layernorm            -> self_attn.qkv_proj   (norm weight / s)
    v rows of self_attn.qkv_proj -> self_attn.o_proj   (v rows / s; with grouped-query
                                  attention one s per v channel, shared by the query heads
                                  that read it)
    post_attention_layernorm   -> mlp.gate_up_proj     (norm weight / s)
    up rows of mlp.gate_up_proj -> mlp.down_proj       (up rows / s: silu(gate) * up is linear in up)

Per mapping, s = mean|x|^alpha (normalized by sqrt(max * min)), with alpha searched over a
grid in [0, 1) on the calibration inputs to minimize the squared error of the block the
linears feed (the attention for qkv, the MLP for gate_up, the linear itself for o and down)
with the scaled weights rounded to nearest. alpha = 0 is plain round to nearest, so the
search never does worse than it on the calibration data. The scaled float weights are then
rounded by the caller (round to nearest or GPTQ, config.awq_rounding).

Works on fourbit's Llama decoder layer (fourbit.models.llama.DecoderLayer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gptq import fake_quantize

GRID = 20            # alphas 0, 1/GRID, ..., (GRID - 1) / GRID
SEARCH_TOKENS = 4096  # calibration tokens the search measures on (the first sequences)


def _check_layer(layer: nn.Module) -> None:
    needed = ("input_layernorm", "self_attn.qkv_proj", "self_attn.o_proj", "post_attention_layernorm",
              "mlp.gate_up_proj", "mlp.down_proj")
    for name in needed:
        try:
            layer.get_submodule(name)
        except AttributeError:
            raise TypeError(f"method 'awq' works on fourbit Llama decoder layers (fourbit.load_model); "
                            f"{type(layer).__name__} has no {name}") from None


def _search(linear: nn.Linear, x_mean: torch.Tensor, evaluate, reference: list[torch.Tensor], config,
            expand=None) -> torch.Tensor:
    """The scales s (over x_mean's channels) whose rounded weight makes evaluate() closest to
    reference; expand maps s to the linear's input channels (default: identity)."""
    w = linear.weight.data
    original = w.clone()
    best, best_loss = None, float("inf")
    for step in range(GRID):
        alpha = step / GRID
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        cols = expand(s) if expand is not None else s
        w.copy_(fake_quantize(original * cols, config.group_size, config.symmetric, w.dtype) / cols)
        loss = sum(float((out - ref).float().pow(2).sum()) for out, ref in zip(evaluate(), reference))
        if loss < best_loss:
            best, best_loss = s, loss
    w.copy_(original)
    return best


def _mean_abs(xs: list[torch.Tensor]) -> torch.Tensor:
    total = sum(x.abs().float().reshape(-1, x.shape[-1]).sum(0) for x in xs)
    return total / sum(x.numel() // x.shape[-1] for x in xs)


@torch.no_grad()
def scale_layer(layer: nn.Module, inputs: list[tuple[tuple, dict]], config) -> None:
    """Search and fold AWQ scales into one decoder layer, in place (the float function of
    the layer is unchanged up to rounding). inputs: the layer's (args, kwargs) per batch,
    args = (x [B, T, hidden], cos, sin, context)."""
    _check_layer(layer)
    attn, mlp = layer.self_attn, layer.mlp
    batches, tokens = [], 0
    for args, _ in inputs:
        if tokens >= SEARCH_TOKENS:
            break
        x = args[0]
        take = max(1, min(x.shape[0], -(-(SEARCH_TOKENS - tokens) // x.shape[1])))
        batches.append((x[:take], args[1], args[2]))
        tokens += take * x.shape[1]

    # input_layernorm -> qkv_proj, judged by the attention output
    normed = [layer.input_layernorm(x) for x, _, _ in batches]
    attend = lambda: [attn(xn, cos, sin, None) for xn, (_, cos, sin) in zip(normed, batches)]  # noqa: E731
    s = _search(attn.qkv_proj, _mean_abs(normed), attend, attend(), config)
    layer.input_layernorm.weight.div_(s.to(layer.input_layernorm.weight.dtype))
    attn.qkv_proj.weight.mul_(s)

    # v -> o_proj, judged by o_proj's output
    h, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    o_inputs = []
    hook = attn.o_proj.register_forward_pre_hook(lambda m, a: o_inputs.append(a[0]))
    try:
        outs = [attn(layer.input_layernorm(x), cos, sin, None) for x, cos, sin in batches]
    finally:
        hook.remove()
    o_mean = _mean_abs(o_inputs).view(kvh, h // kvh, d).mean(1).reshape(-1)  # per v channel
    heads_to_v = ((torch.arange(h) // (h // kvh))[:, None] * d + torch.arange(d)).reshape(-1).to(o_mean.device)
    expand = lambda s: s[heads_to_v]  # noqa: E731
    o_evaluate = lambda: [attn.o_proj(x) for x in o_inputs]  # noqa: E731
    s = _search(attn.o_proj, o_mean, o_evaluate, outs, config, expand)
    v_rows = slice((h + kvh) * d, (h + 2 * kvh) * d)
    attn.qkv_proj.weight[v_rows].div_(s[:, None])
    if attn.qkv_proj.bias is not None:
        attn.qkv_proj.bias[v_rows].div_(s)
    attn.o_proj.weight.mul_(expand(s))

    # post_attention_layernorm -> gate_up_proj, judged by the MLP output
    mids = [x + attn(layer.input_layernorm(x), cos, sin, None) for x, cos, sin in batches]
    normed = [layer.post_attention_layernorm(m) for m in mids]
    run_mlp = lambda: [mlp(xn) for xn in normed]  # noqa: E731
    s = _search(mlp.gate_up_proj, _mean_abs(normed), run_mlp, run_mlp(), config)
    layer.post_attention_layernorm.weight.div_(s.to(layer.post_attention_layernorm.weight.dtype))
    mlp.gate_up_proj.weight.mul_(s)

    # up -> down_proj, judged by down_proj's output
    inter = mlp.down_proj.in_features
    down_inputs = []
    for xn in normed:
        gate, up = mlp.gate_up_proj(xn).chunk(2, dim=-1)
        down_inputs.append(F.silu(gate) * up)
    down_evaluate = lambda: [mlp.down_proj(x) for x in down_inputs]  # noqa: E731
    s = _search(mlp.down_proj, _mean_abs(down_inputs), down_evaluate, down_evaluate(), config)
    mlp.gate_up_proj.weight[inter:].div_(s[:, None])
    mlp.down_proj.weight.mul_(s)
