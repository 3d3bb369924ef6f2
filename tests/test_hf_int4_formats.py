"""fourbit.load_model on int4 Hugging Face checkpoints: GPTQ (v1 and v2), AutoAWQ (GEMM,
GEMV), compressed-tensors pack-quantized and AutoRound.

Each test draws random codes q, integer zero points z and scales s, packs them here by each
format's documented layout (written out below, independent of fourbit's readers), writes a
tiny Llama directory (config.json with its quantization_config, model.safetensors), loads it
and checks that every quantized layer is an Int4Linear whose weight dequantizes exactly to
(q - z) * s computed here in fp32, and that the model's logits are those of a float model
built from that dequantization.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import fourbit
from helpers import relative_error

transformers = pytest.importorskip("transformers")

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 64, 320, 128, 4, 2  # 320: not a multiple of 128
HEAD_DIM = HIDDEN // HEADS
LINEARS = {"self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
           "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
           "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
# Projections that read the same input (and so share GPTQ's act-order permutation).
SAME_INPUT = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
              "self_attn.o_proj": "o_in", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in",
              "mlp.down_proj": "down_in"}
NUM_LAYERS = 2
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


# ---- the formats' packings, as their documentation describes them ----

def to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values (int64) as the int32 with the same bits."""
    words = words % 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_last_dim(values: torch.Tensor) -> torch.Tensor:
    """[R, C] codes in [0, 15] -> int32 [R, C/8]: word j holds values[:, 8j + i] at bits 4i..4i+3."""
    values = values.to(torch.int64)
    assert values.shape[1] % 8 == 0
    return to_int32(sum(values[:, i::8] << (4 * i) for i in range(8)))


def gptq_tensors(prefix, q, z, s, g_idx, v1: bool):
    """GPTQ: qweight [K/8, N] packed along K, qzeros [G, N/8] packed along N (v1: each word
    minus 0x11111111, i.e. every zero point minus one with borrows), scales [G, N], g_idx [K]."""
    qzeros = pack_last_dim(z.t())
    if v1:
        qzeros = to_int32(qzeros.to(torch.int64) - 0x11111111)
    out = {f"{prefix}.qweight": pack_last_dim(q).t().contiguous(), f"{prefix}.qzeros": qzeros.contiguous(),
           f"{prefix}.scales": s.t().contiguous()}
    if g_idx is not None:
        out[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
    return out


def awq_interleave(values: torch.Tensor) -> torch.Tensor:
    """Columns within each 8 in AWQ's nibble order: nibble i holds column AWQ_ORDER[i]."""
    r, c = values.shape
    return values.reshape(r, c // 8, 8)[:, :, AWQ_ORDER].reshape(r, c)


def awq_gemm_tensors(prefix, q, z, s, g_idx, v1):
    """AWQ GEMM: qweight [K, N/8] and qzeros [G, N/8] packed along N in AWQ order, scales [G, N]."""
    assert g_idx is None
    return {f"{prefix}.qweight": pack_last_dim(awq_interleave(q.t().contiguous())),
            f"{prefix}.qzeros": pack_last_dim(awq_interleave(z.t().contiguous())),
            f"{prefix}.scales": s.t().contiguous()}


def awq_gemv_tensors(prefix, q, z, s, g_idx, v1, gemv_group_size=32):
    """AWQ GEMV: qweight [N, K/8] packed along K in order; qzeros [N, width] with group g in
    nibble g % 8 of word g // 8, scales [N, 8 width], width = ceil(groups / 8) rounded up to a
    multiple of 128 / group_size (zero padding)."""
    assert g_idx is None
    n, groups = z.shape
    multiple = 128 // gemv_group_size
    words = -(-groups // 8)
    width = -(-words // multiple) * multiple
    zp = torch.zeros(n, 8 * width, dtype=torch.int64)
    zp[:, :groups] = z
    sp = torch.zeros(n, 8 * width, dtype=s.dtype)
    sp[:, :groups] = s
    return {f"{prefix}.qweight": pack_last_dim(q), f"{prefix}.qzeros": pack_last_dim(zp), f"{prefix}.scales": sp}


def ct_tensors(prefix, q, z, s, g_idx, symmetric):
    """compressed-tensors pack-quantized: weight_packed [N, K/8] holding signed codes + 8 (= q),
    weight_zero_point (asymmetric) as signed zeros + 8 packed along N into [N/8, G], weight_scale
    [N, G], weight_shape (N, K), weight_g_idx [K]."""
    n, k = q.shape
    out = {f"{prefix}.weight_packed": pack_last_dim(q), f"{prefix}.weight_scale": s.contiguous(),
           f"{prefix}.weight_shape": torch.tensor([n, k])}
    if not symmetric:
        signed = z.to(torch.int64) - 8
        out[f"{prefix}.weight_zero_point"] = pack_last_dim((signed + 8).t().contiguous()).t().contiguous()
    if g_idx is not None:
        out[f"{prefix}.weight_g_idx"] = g_idx.to(torch.int32)
    return out


# ---- random layers and tiny model directories ----

def act_order_g_idx(k: int, group_size: int, order: torch.Tensor) -> torch.Tensor:
    """GPTQ's desc_act: channels quantized in `order`, the j-th of them in group j // group_size."""
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[order] = torch.arange(k) // group_size
    return g_idx


def random_layer(n, k, group_size, symmetric, scale_dtype, order=None):
    """q [N, K], z [N, G], s [N, G], g_idx [K] or None, and the reference (q - z) * s in fp32."""
    gs = k if group_size == -1 else group_size
    groups = -(-k // gs)
    q = torch.randint(0, 16, (n, k))
    z = torch.full((n, groups), 8) if symmetric else torch.randint(0, 16, (n, groups))
    s = (torch.rand(n, groups) * 0.02 + 0.001).to(scale_dtype)
    g_idx = None if order is None else act_order_g_idx(k, gs, order)
    g = torch.arange(k) // gs if g_idx is None else g_idx
    ref = (q - z[:, g]).to(torch.float32) * s[:, g].to(torch.float32)
    return q, z, s, g_idx, ref


def hf_config(quantization_config=None) -> dict:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                      num_hidden_layers=NUM_LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                                      tie_word_embeddings=False).to_dict()
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    return config


def write_dir(directory, config: dict, tensors: dict):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(directory / "model.safetensors"))
    return directory


def build_checkpoint(tmp_path, pack, quantization_config, *, group_size, symmetric, act_order=False,
                     scale_dtype=torch.float16, float_layers=(), quantize_lm_head=False, **pack_args):
    """A quantized tiny Llama directory and a float one holding the reference dequantization:
    (quantized dir, float dir, {module name: reference weight} for the quantized layers)."""
    quant, dense, refs = {}, {}, {}
    common = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN) * 0.5,
              "model.norm.weight": 1 + 0.1 * torch.randn(HIDDEN)}
    linears = {f"model.layers.{i}.{name}": shape for i in range(NUM_LAYERS) for name, shape in LINEARS.items()}
    linears["lm_head"] = (VOCAB, HIDDEN)
    for i in range(NUM_LAYERS):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            common[f"model.layers.{i}.{norm}.weight"] = 1 + 0.1 * torch.randn(HIDDEN)
    orders = {}
    for module, (n, k) in linears.items():
        quantized = module not in float_layers and (module != "lm_head" or quantize_lm_head)
        if not quantized:
            dense[module + ".weight"] = quant[module + ".weight"] = torch.randn(n, k) * 0.05
            continue
        order = None
        if act_order:
            key = (module.rsplit(".", 2)[0], SAME_INPUT.get(module.split(".", 3)[-1], module))
            order = orders.setdefault(key, torch.randperm(k))
        q, z, s, g_idx, ref = random_layer(n, k, group_size, symmetric, scale_dtype, order)
        quant.update(pack(module, q, z, s, g_idx, **pack_args))
        dense[module + ".weight"], refs[module] = ref, ref
    qdir = write_dir(tmp_path / "int4", hf_config(quantization_config), {**common, **quant})
    fdir = write_dir(tmp_path / "float", hf_config(), {**common, **dense})
    return qdir, fdir, refs


def fused_weight(model, module: str):
    """(Int4Linear or Linear, its rows of the fused projection) for a checkpoint module name."""
    if module == "lm_head":
        return model.lm_head, slice(None)
    _, _, i, block, name = module.split(".")
    layer = model.layers[int(i)]
    rows = {"q_proj": (0, HEADS * HEAD_DIM), "k_proj": (HEADS * HEAD_DIM, (HEADS + KV_HEADS) * HEAD_DIM),
            "v_proj": ((HEADS + KV_HEADS) * HEAD_DIM, (HEADS + 2 * KV_HEADS) * HEAD_DIM),
            "gate_proj": (0, INTER), "up_proj": (INTER, 2 * INTER)}
    if name in ("q_proj", "k_proj", "v_proj"):
        return layer.self_attn.qkv_proj, slice(*rows[name])
    if name in ("gate_proj", "up_proj"):
        return layer.mlp.gate_up_proj, slice(*rows[name])
    return getattr(getattr(layer, block), name), slice(None)


def check_model(qdir, fdir, refs, *, act_order=False):
    """Every quantized layer dequantizes exactly to its reference; logits match the float model."""
    model = fourbit.load_model(qdir, device="cpu", dtype=torch.float32)
    for module, ref in refs.items():
        layer, rows = fused_weight(model, module)
        assert isinstance(layer, fourbit.Int4Linear), module
        assert torch.equal(layer.weight.dequantize()[rows], ref), module
        assert layer.act_order == act_order, module
    float_model = fourbit.load_model(fdir, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        ours, want = model(ids), float_model(ids)
    assert relative_error(ours, want) < 1e-5
    return model


def gptq_config(group_size, symmetric, v1=True, act_order=False, **extra):
    return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": symmetric, "desc_act": act_order,
            "true_sequential": True, "static_groups": False,
            "checkpoint_format": "gptq" if v1 else "gptq_v2", **extra}


# ---- GPTQ ----

@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [128, 32, -1])
def test_gptq_loads_exactly(tmp_path, version, symmetric, group_size):
    """g128 with K = 64 and K = 320: one short group, and a short last group."""
    v1 = version == "v1"
    qdir, fdir, refs = build_checkpoint(tmp_path, gptq_tensors, gptq_config(group_size, symmetric, v1),
                                        group_size=group_size, symmetric=symmetric, v1=v1)
    model = check_model(qdir, fdir, refs)
    down = model.layers[0].mlp.down_proj
    assert down.group_size == group_size and down.symmetric == symmetric


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_gptq_act_order(tmp_path, version):
    """desc_act: g_idx in quantization order; q/k/v (and gate/up) share it and stay fused int4."""
    v1 = version == "v1"
    qdir, fdir, refs = build_checkpoint(tmp_path, gptq_tensors, gptq_config(32, False, v1, act_order=True),
                                        group_size=32, symmetric=False, act_order=True, v1=v1)
    check_model(qdir, fdir, refs, act_order=True)


def test_gptq_act_order_g128_short_groups(tmp_path):
    """g128 act-order: K = 64 is one group (no perm needed); K = 320 has a perm and a short group."""
    qdir, fdir, refs = build_checkpoint(tmp_path, gptq_tensors, gptq_config(128, True, act_order=True),
                                        group_size=128, symmetric=True, act_order=True, v1=True)
    model = fourbit.load_model(qdir, device="cpu", dtype=torch.float32)
    assert model.layers[0].mlp.down_proj.act_order
    assert not model.layers[0].self_attn.qkv_proj.act_order
    assert torch.equal(model.layers[1].mlp.down_proj.weight.dequantize(), refs["model.layers.1.mlp.down_proj"])
    check_model(qdir, fdir, {m: r for m, r in refs.items() if "down_proj" not in m})


def test_gptq_act_order_different_perms_stay_apart(tmp_path):
    """q, k and v with different act-order permutations cannot share one int4 matrix: the fused
    projection keeps them apart (a ConcatLinear), each int4 with its own perm, exactly."""
    qdir, fdir, refs = build_checkpoint(tmp_path, gptq_tensors, gptq_config(32, False, act_order=True),
                                        group_size=32, symmetric=False, act_order=True, v1=True)
    # Re-pack layer 0's k_proj with a permutation of its own.
    tensors = _load(qdir)
    q, z, s, g_idx, ref = random_layer(KV_HEADS * HEAD_DIM, HIDDEN, 32, False, torch.float16, torch.randperm(HIDDEN))
    tensors.update(gptq_tensors("model.layers.0.self_attn.k_proj", q, z, s, g_idx, v1=True))
    save_file(tensors, str(qdir / "model.safetensors"))
    model = fourbit.load_model(qdir, device="cpu", dtype=torch.float32)
    qkv = model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, fourbit.nn.ConcatLinear)
    assert all(isinstance(p, fourbit.Int4Linear) and p.act_order for p in qkv.parts)
    assert torch.equal(qkv.parts[1].weight.dequantize(), ref)
    assert torch.equal(qkv.parts[0].weight.dequantize(), refs["model.layers.0.self_attn.q_proj"])
    assert isinstance(model.layers[1].self_attn.qkv_proj, fourbit.Int4Linear)


def test_gptq_bf16_scales_and_large_group(tmp_path):
    """bf16 scales stay bf16; a group size of 96 (not fourbit's) is held exactly as three
    fourbit groups of 32 with the same scale and zero."""
    qdir, fdir, refs = build_checkpoint(tmp_path, gptq_tensors, gptq_config(96, False), group_size=96,
                                        symmetric=False, scale_dtype=torch.bfloat16, v1=True)
    model = check_model(qdir, fdir, refs)
    down = model.layers[0].mlp.down_proj
    assert down.group_size == 32 and down.scales.dtype == torch.bfloat16


def test_gptq_offsets_dtype(tmp_path):
    """Symmetric zero points (z = 8) keep fp16 offsets (-8 s is exact); asymmetric ones need fp32."""
    for symmetric in (True, False):
        qdir, _, _ = build_checkpoint(tmp_path / str(symmetric), gptq_tensors, gptq_config(32, symmetric),
                                      group_size=32, symmetric=symmetric, v1=True)
        model = fourbit.load_model(qdir, device="cpu", dtype=torch.float32)
        layer = model.layers[0].mlp.down_proj
        assert layer.scales.dtype == torch.float16
        assert layer.offsets.dtype == (torch.float16 if symmetric else torch.float32)


def test_gptq_lm_head_and_dynamic_exclusions(tmp_path):
    """lm_head: true quantizes the head; a negative `dynamic` pattern leaves layer 1's MLP float."""
    skipped = tuple(f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down"))
    config = gptq_config(32, False, lm_head=True, dynamic={r"-:.*layers\.1\.mlp\..*": {}})
    qdir, fdir, refs = build_checkpoint(tmp_path, gptq_tensors, config, group_size=32, symmetric=False,
                                        float_layers=skipped, quantize_lm_head=True, v1=True)
    model = check_model(qdir, fdir, refs)
    assert isinstance(model.lm_head, fourbit.Int4Linear)
    assert isinstance(model.layers[1].mlp.gate_up_proj, torch.nn.Linear)


def test_gptq_zero_bias_is_accepted_nonzero_is_not(tmp_path):
    qdir, fdir, refs = build_checkpoint(tmp_path, gptq_tensors, gptq_config(32, True), group_size=32,
                                        symmetric=True, v1=True)
    tensors = _load(qdir)
    tensors["model.layers.0.mlp.down_proj.bias"] = torch.zeros(HIDDEN, dtype=torch.float16)
    save_file(tensors, str(qdir / "model.safetensors"))
    check_model(qdir, fdir, refs)
    tensors["model.layers.0.mlp.down_proj.bias"][3] = 0.5
    save_file(tensors, str(qdir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.bias"):
        fourbit.load_model(qdir, device="cpu", dtype=torch.float32)


# ---- AWQ ----

@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("version", ["gemm", "gemv"])
def test_awq_loads_exactly(tmp_path, version, group_size):
    pack = awq_gemm_tensors if version == "gemm" else awq_gemv_tensors
    config = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": version,
              "modules_to_not_convert": None}
    extra = {} if version == "gemm" else {"gemv_group_size": group_size}
    qdir, fdir, refs = build_checkpoint(tmp_path, pack, config, group_size=group_size, symmetric=False, v1=False,
                                        **extra)
    check_model(qdir, fdir, refs)


def test_awq_gptqmodel_config_and_skipped_modules(tmp_path):
    """GPTQModel's AWQ config names the layout `format`; modules_to_not_convert stay float."""
    config = {"quant_method": "awq", "bits": 4, "group_size": 32, "format": "gemm", "checkpoint_format": "gemm",
              "modules_to_not_convert": ["o_proj"]}
    skipped = tuple(f"model.layers.{i}.self_attn.o_proj" for i in range(NUM_LAYERS))
    qdir, fdir, refs = build_checkpoint(tmp_path, awq_gemm_tensors, config, group_size=32, symmetric=False,
                                        float_layers=skipped, v1=False)
    model = check_model(qdir, fdir, refs)
    assert isinstance(model.layers[0].self_attn.o_proj, torch.nn.Linear)


# ---- compressed-tensors ----

def ct_config(strategy, group_size, symmetric, actorder=None, ignore=("lm_head",), **scheme):
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": strategy,
               "group_size": group_size if strategy == "group" else None, "actorder": actorder, "dynamic": False,
               "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, **scheme}},
            "ignore": list(ignore), "kv_cache_scheme": None, "sparsity_config": {}}


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("strategy", ["group", "channel"])
def test_compressed_tensors_loads_exactly(tmp_path, strategy, symmetric):
    group_size = 32 if strategy == "group" else -1
    qdir, fdir, refs = build_checkpoint(tmp_path, _ct_pack(symmetric), ct_config(strategy, 32, symmetric),
                                        group_size=group_size, symmetric=symmetric, scale_dtype=torch.bfloat16)
    model = check_model(qdir, fdir, refs)
    assert model.layers[0].mlp.down_proj.scales.dtype == torch.bfloat16


def _ct_pack(symmetric):
    return lambda prefix, q, z, s, g_idx: ct_tensors(prefix, q, z, s, g_idx, symmetric)


def test_compressed_tensors_actorder_and_ignore(tmp_path):
    """actorder "group" (weight_g_idx) gives act-order layers; ignored modules (an exact name
    and a "re:" pattern) are read as float weights."""
    skipped = tuple(f"model.layers.{i}.mlp.down_proj" for i in range(NUM_LAYERS))
    config = ct_config("group", 32, False, actorder="group", ignore=("lm_head", "re:.*mlp[.]down_proj$"))
    qdir, fdir, refs = build_checkpoint(tmp_path, _ct_pack(False), config, group_size=32, symmetric=False,
                                        act_order=True, float_layers=skipped)
    model = check_model(qdir, fdir, refs, act_order=True)
    assert isinstance(model.layers[0].mlp.down_proj, torch.nn.Linear)


def test_compressed_tensors_unpacked_int8_zero_points(tmp_path):
    """Older writers stored asymmetric zero points as signed int8 [N, G], unpacked."""
    def pack(prefix, q, z, s, g_idx):
        out = ct_tensors(prefix, q, z, s, g_idx, symmetric=True)
        out[f"{prefix}.weight_zero_point"] = (z - 8).to(torch.int8)
        return out
    qdir, fdir, refs = build_checkpoint(tmp_path, pack, ct_config("group", 32, False), group_size=32,
                                        symmetric=False)
    check_model(qdir, fdir, refs)


# ---- AutoRound ----

@pytest.mark.parametrize("packing", ["auto_round:auto_gptq", "auto_round:gptqmodel", "auto_round:auto_awq"])
def test_auto_round_loads_exactly(tmp_path, packing):
    if "awq" in packing:
        pack, args = awq_gemm_tensors, {"v1": False}
    else:
        pack, args = gptq_tensors, {"v1": packing == "auto_round:auto_gptq"}
    config = {"quant_method": "auto-round", "bits": 4, "group_size": 64, "sym": False, "data_type": "int",
              "packing_format": packing, "block_name_to_quantize": "model.layers", "act_bits": 16,
              "extra_config": {"model.layers.1.mlp.down_proj": {"bits": 16}, "lm_head": {"bits": 4}}}
    qdir, fdir, refs = build_checkpoint(tmp_path, pack, config, group_size=64, symmetric=False,
                                        float_layers=("model.layers.1.mlp.down_proj",), quantize_lm_head=True,
                                        **args)
    model = check_model(qdir, fdir, refs)
    assert isinstance(model.layers[1].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.lm_head, fourbit.Int4Linear)


# ---- errors ----

def _load(directory) -> dict:
    from safetensors.torch import load_file
    return dict(load_file(str(directory / "model.safetensors")))


@pytest.fixture
def gptq_dir(tmp_path):
    qdir, _, _ = build_checkpoint(tmp_path, gptq_tensors, gptq_config(32, False, act_order=True), group_size=32,
                                  symmetric=False, act_order=True, v1=True)
    return qdir


def _rewrite(directory, *, config=None, tensors=None):
    if config is not None:
        full = json.loads((directory / "config.json").read_text())
        full["quantization_config"].update(config)
        (directory / "config.json").write_text(json.dumps(full))
    if tensors is not None:
        save_file(tensors, str(directory / "model.safetensors"))


@pytest.mark.parametrize("change, message", [
    ({"bits": 8}, r"bits is 8: fourbit reads 4-bit"),
    ({"group_size": 16}, r"model\.layers\.0\.self_attn\.q_proj: group size 16"),
    ({"checkpoint_format": "marlin", "format": "marlin"}, r"'marlin'"),
    ({"quant_method": "bitsandbytes"}, r"quant_method 'bitsandbytes' is not one fourbit reads"),
], ids=["bits", "group_size", "marlin", "method"])
def test_bad_configs_raise(gptq_dir, change, message):
    _rewrite(gptq_dir, config=change)
    with pytest.raises(ValueError, match=message):
        fourbit.load_model(gptq_dir, device="cpu", dtype=torch.float32)


def _missing(tensors):
    del tensors["model.layers.1.mlp.down_proj.qzeros"]
    return r"no tensor 'model\.layers\.1\.mlp\.down_proj\.qzeros'"


def _bad_scales(tensors):
    name = "model.layers.0.self_attn.o_proj.scales"
    tensors[name] = tensors[name][:1].contiguous()
    return r"'model\.layers\.0\.self_attn\.o_proj\.scales' has shape \(1, 64\)"


def _int_scales(tensors):
    name = "model.layers.0.self_attn.o_proj.scales"
    tensors[name] = tensors[name].to(torch.int16)
    return r"'model\.layers\.0\.self_attn\.o_proj\.scales' has dtype torch\.int16"


def _bad_qweight(tensors):
    name = "model.layers.0.mlp.up_proj.qweight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    return r"'model\.layers\.0\.mlp\.up_proj\.qweight' has shape"


def _g_idx_out_of_range(tensors):
    tensors["model.layers.0.mlp.down_proj.g_idx"][5] = 10  # 320 / 32 = 10 groups
    return r"'model\.layers\.0\.mlp\.down_proj\.g_idx' holds group indices outside \[0, 10\)"


def _g_idx_uneven(tensors):
    g_idx = tensors["model.layers.0.mlp.down_proj.g_idx"]
    g_idx[g_idx == 1] = 0  # group 0 has 64 channels, group 1 none
    return r"'model\.layers\.0\.mlp\.down_proj\.g_idx' does not give every group 32"


@pytest.mark.parametrize("damage", [_missing, _bad_scales, _int_scales, _bad_qweight, _g_idx_out_of_range,
                                    _g_idx_uneven])
def test_bad_tensors_raise_naming_them(gptq_dir, damage):
    tensors = _load(gptq_dir)
    message = damage(tensors)
    _rewrite(gptq_dir, tensors=tensors)
    with pytest.raises(ValueError, match=message):
        fourbit.load_model(gptq_dir, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("config, message", [
    ({"version": "gemv_fast"}, r"version is 'gemv_fast'"),
    ({"zero_point": False}, r"zero_point is false"),
], ids=["gemv_fast", "no_zero_point"])
def test_bad_awq_configs_raise(tmp_path, config, message):
    base = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    qdir, _, _ = build_checkpoint(tmp_path, awq_gemm_tensors, {**base, **config}, group_size=32, symmetric=False,
                                  v1=False)
    with pytest.raises(ValueError, match=message):
        fourbit.load_model(qdir, device="cpu", dtype=torch.float32)


def test_compressed_tensors_errors(tmp_path):
    config = ct_config("group", 32, False, input_activations={"num_bits": 8, "type": "int"})
    qdir, _, _ = build_checkpoint(tmp_path, _ct_pack(False), config, group_size=32, symmetric=False)
    with pytest.raises(ValueError, match=r"input_activations quantizes activations"):
        fourbit.load_model(qdir, device="cpu", dtype=torch.float32)
    _rewrite(qdir, config=ct_config("group", 32, False))
    tensors = _load(qdir)
    tensors["model.layers.0.mlp.up_proj.weight_shape"] = torch.tensor([INTER, HIDDEN + 8])
    _rewrite(qdir, tensors=tensors)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight_shape' is \[320, 72\]"):
        fourbit.load_model(qdir, device="cpu", dtype=torch.float32)
    del tensors["model.layers.0.mlp.up_proj.weight_zero_point"]
    tensors["model.layers.0.mlp.up_proj.weight_shape"] = torch.tensor([INTER, HIDDEN])
    _rewrite(qdir, tensors=tensors)
    with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.0\.mlp\.up_proj\.weight_zero_point'"):
        fourbit.load_model(qdir, device="cpu", dtype=torch.float32)
