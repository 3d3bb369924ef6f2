"""fourbit reads the int4 checkpoints that the real tools write, exactly.

Run in fourbit's venv after `make peer-fixtures` (tests/peers/make_fixtures.py, in the peer
venv) has written .peers/fixtures/ (or $FOURBIT_PEER_FIXTURES); `make peer-test` does both.
For each case (one tool, one format):
- every quantized layer's weight as fourbit computes with it (Int4Linear.weight.dequantize(),
  the rows of fused qkv_proj / gate_up_proj sliced apart) equals the tool's own fp32
  dequantization bit for bit (torch.equal);
- fourbit's fp32 logits of the prompts match transformers' fp32 forward of the same weights:
  max |fourbit - reference| / max |reference| <= 1e-3;
- fourbit.generate's greedy continuations (8 tokens) equal the reference's.
Missing fixtures fail the tests (they are not skipped): run `make peer-fixtures`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch
from make_fixtures import CASES, LINEARS, quantized_names  # tests/peers/, on sys.path (rootdir import)
from safetensors import safe_open
from safetensors.torch import load_file

import fourbit
from fourbit.nn import Int4Linear

FIXTURES = Path(os.environ.get("FOURBIT_PEER_FIXTURES", Path(__file__).resolve().parents[2] / ".peers" / "fixtures"))
LOGITS_RTOL = 1e-3


def case_dir(name: str) -> Path:
    directory = FIXTURES / name
    for file in ("case.json", "reference.safetensors", "model/config.json"):
        if not (directory / file).is_file():
            pytest.fail(f"no peer fixture {directory / file}: run `make peer-fixtures` (tests/peers/make_fixtures.py "
                        f"in the peer venv) first", pytrace=False)
    return directory


@functools.lru_cache(maxsize=1)
def load(name: str):
    """(fourbit model, reference tensors, case.json) of one case; the last case stays loaded."""
    directory = case_dir(name)
    model = fourbit.load_model(directory / "model", dtype=torch.float32)
    return model, load_file(directory / "reference.safetensors"), json.loads((directory / "case.json").read_text())


def fourbit_weight(model, hf_name: str, quantized: bool = True) -> torch.Tensor:
    """The fp32 weight fourbit computes with for the Hugging Face layer `hf_name`
    ("model.layers.0.self_attn.k_proj"): its rows of a fused module where fourbit fuses. The
    module must be an Int4Linear when the layer is `quantized`, an nn.Linear otherwise."""
    _, _, layer, block, proj = hf_name.split(".")
    config, decoder = model.config, model.layers[int(layer)]
    q, kv, inter = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size
    fused = {"q_proj": ("self_attn", "qkv_proj", 0, q), "k_proj": ("self_attn", "qkv_proj", q, kv),
             "v_proj": ("self_attn", "qkv_proj", q + kv, kv), "o_proj": ("self_attn", "o_proj", 0, None),
             "gate_proj": ("mlp", "gate_up_proj", 0, inter), "up_proj": ("mlp", "gate_up_proj", inter, inter),
             "down_proj": ("mlp", "down_proj", 0, None)}
    parent, attr, start, rows = fused[proj]
    module = getattr(getattr(decoder, parent), attr)
    if quantized != isinstance(module, Int4Linear):
        raise AssertionError(f"{hf_name}: fourbit's {parent}.{attr} is a {type(module).__name__}; the checkpoint's "
                             f"layer is {'int4' if quantized else 'float'}")
    weight = module.weight.dequantize(torch.float32) if quantized else module.weight.float()
    return weight if rows is None else weight[start:start + rows]


def mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)}, reference {tuple(want.shape)}"
    diff = (got - want).abs()
    return f"{int((got != want).sum())} of {got.numel()} values differ, max abs diff {diff.max().item():.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_weights_bit_exact(case):
    model, reference, _ = load(case)
    bad = {}
    for name in quantized_names(CASES[case]):
        got, want = fourbit_weight(model, name), reference[f"{name}.weight"]
        if not torch.equal(got, want):
            bad[name] = mismatch(got, want)
    assert not bad, f"{case}: fourbit's weights differ from the tool's dequantization: {bad}"


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c].get("float_layers")])
def test_float_layers_as_stored(case):
    """The layers a tool left in float (its `ignore` list) are the stored tensors, in fp32."""
    model, _, _ = load(case)
    directory = case_dir(case) / "model"
    stored = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            stored.update({k: f.get_tensor(k) for k in f.keys() if k.endswith(".weight")})
    for i in range(model.config.num_layers):
        for proj in CASES[case]["float_layers"]:
            name = f"model.layers.{i}.{proj}"
            assert proj in LINEARS
            assert torch.equal(fourbit_weight(model, name, quantized=False), stored[f"{name}.weight"].float()), name


@pytest.mark.parametrize("case", list(CASES))
def test_logits(case):
    model, reference, _ = load(case)
    with torch.no_grad():
        logits = model(reference["prompt_ids"]).float()
    want = reference["logits"]
    assert logits.shape == want.shape
    error = ((logits - want).abs().max() / want.abs().max()).item()
    assert error <= LOGITS_RTOL, f"{case}: max |fourbit - reference| / max |reference| = {error:.3g} > {LOGITS_RTOL}"


@pytest.mark.parametrize("case", list(CASES))
def test_greedy(case):
    model, reference, info = load(case)
    want = reference["greedy"]
    got = fourbit.generate(model, reference["prompt_ids"], want.shape[1])
    assert got == want.tolist(), (f"{case}: greedy continuations differ (the reference's smallest top-1 margin "
                                  f"is {info['greedy_min_margin']:.3g})")
