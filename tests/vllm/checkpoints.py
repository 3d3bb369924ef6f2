"""Other tools' int4 checkpoints of the tiny random Llama (conftest.TINY), for vLLM with
quantization="fourbit": GPTQ (v1 zero points, with and without desc_act), AWQ GEMM and
compressed-tensors pack-quantized (symmetric or not, actorder "group").

The float weights are fourbit's RandomCheckpoint; each linear layer is rounded to the nearest
here (per group: asymmetric min/max or symmetric absmax, fp16 scales, groups given by g_idx
under act-order) and packed by tests/test_hf_int4_formats.py's writers, which follow each
format's documentation and share nothing with fourbit's readers.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fourbit.integrations.vllm import save_pretrained
from fourbit.models.loader import build_model
from fourbit.models.random_weights import RandomCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the format writers
from test_hf_int4_formats import (  # noqa: E402
    SAME_INPUT,
    act_order_g_idx,
    awq_gemm_tensors,
    ct_tensors,
    gptq_tensors,
)

LINEARS = tuple(SAME_INPUT)  # "self_attn.q_proj", ..., "mlp.down_proj"


def rtn(w: torch.Tensor, group_size: int, symmetric: bool, g_idx: torch.Tensor | None):
    """Round-to-nearest codes q [N, K], zero points z [N, G] and fp16 scales s [N, G] of w
    [N, K], channel k in group g_idx[k] (k // group_size without act-order)."""
    n, k = w.shape
    gi = torch.arange(k) // group_size if g_idx is None else g_idx.to(torch.int64)
    groups = int(gi.max()) + 1
    q = torch.empty(n, k, dtype=torch.int64)
    z = torch.empty(n, groups, dtype=torch.int64)
    s = torch.empty(n, groups, dtype=torch.float16)
    for g in range(groups):
        cols = (gi == g).nonzero()[:, 0]
        wg = w[:, cols]
        if symmetric:
            scale = (wg.abs().amax(1) / 7.5).clamp_min(1e-6).half()
            zero = torch.full((n,), 8)
        else:
            lo, hi = wg.amin(1).clamp_max(0), wg.amax(1).clamp_min(0)
            scale = ((hi - lo) / 15).clamp_min(1e-6).half()
            zero = torch.round(-lo / scale.float()).clamp(0, 15).to(torch.int64)
        q[:, cols] = (torch.round(wg / scale.float()[:, None]) + zero[:, None]).clamp(0, 15).to(torch.int64)
        z[:, g], s[:, g] = zero, scale
    return q, z, s


def write_checkpoint(config, directory: Path, kind: str, group_size: int, *, symmetric: bool = False,
                     act_order: bool = False, seed: int = 5, dequantized: Path | None = None) -> Path:
    """A tiny Llama `directory` in one tool's format: kind "gptq" (v1), "awq" (GEMM) or
    "compressed-tensors" (pack-quantized; act_order: actorder "group", weight_g_idx). With
    `dequantized`, also a float folder there of the same model, each linear weight the
    format's (q - z) * s computed here in fp32."""
    model = build_model(RandomCheckpoint(config, seed=seed), "cpu", torch.float32)
    save_pretrained(model, directory)  # the float Hugging Face folder, then its linears replaced
    tensors = load_file(str(directory / "model.safetensors"))
    floats = dict(tensors)
    generator = torch.Generator().manual_seed(seed)
    orders = {}
    for i in range(config.num_layers):
        for name in LINEARS:
            prefix = f"model.layers.{i}.{name}"
            w = tensors.pop(f"{prefix}.weight")
            g_idx = None
            if act_order:  # the projections of one input share one order (as GPTQ's Hessian gives)
                key = (i, SAME_INPUT[name])
                orders.setdefault(key, torch.randperm(w.shape[1], generator=generator))
                g_idx = act_order_g_idx(w.shape[1], group_size, orders[key])
            q, z, s = rtn(w, group_size, symmetric, g_idx)
            gi = torch.arange(w.shape[1]) // group_size if g_idx is None else g_idx
            floats[f"{prefix}.weight"] = (q - z[:, gi]).to(torch.float32) * s[:, gi].to(torch.float32)
            if kind == "gptq":
                tensors.update(gptq_tensors(prefix, q, z, s, g_idx if act_order else
                                            torch.arange(w.shape[1]) // group_size, v1=True))
            elif kind == "awq":
                tensors.update(awq_gemm_tensors(prefix, q, z, s, None, None))
            else:
                tensors.update(ct_tensors(prefix, q, z, s, g_idx, symmetric))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if dequantized is not None:
        dequantized.mkdir(parents=True, exist_ok=True)
        save_file(floats, str(dequantized / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(directory / "config.json", dequantized / "config.json")
    hf = json.loads((directory / "config.json").read_text())
    hf["quantization_config"] = quantization_config(kind, group_size, symmetric, act_order)
    (directory / "config.json").write_text(json.dumps(hf, indent=1))
    return directory


def quantization_config(kind: str, group_size: int, symmetric: bool, act_order: bool) -> dict:
    if kind == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order,
                "sym": symmetric, "checkpoint_format": "gptq", "lm_head": False}
    if kind == "awq":
        assert not act_order
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm", "zero_point": True}
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group_size,
               "actorder": "group" if act_order else None, "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "quantization_status": "compressed"}
