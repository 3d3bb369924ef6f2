"""GGUF k-quants: Q4_K tensors load as Int4Weight with no loss, Q5_K / Q6_K / Q8_0 load as
float32 exactly as the gguf package dequantizes them, and a Q4_K_M-like Llama file decodes
with its Q4_K layers on the int4 kernels. Every block here is random bytes (with the fp16
fields set to finite values), checked against gguf.quants.dequantize, the upstream tool's
own dequantization."""

import copy

import numpy as np
import pytest
import torch

import fourbit
from fourbit.gguf_file import GGUFFile
from fourbit.models.gguf import read_tensor
from helpers import relative_error

gguf = pytest.importorskip("gguf")
QType = gguf.GGMLQuantizationType

# Where each super-block type keeps its fp16 fields (d, and dmin for Q4_K / Q5_K).
FP16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,)}


def fp16_bits(rng, shape, negative: bool = False) -> np.ndarray:
    """Random finite fp16 bit patterns: zero, subnormals and normals up to 65504 alike
    (exponent field 0..30), positive, or of either sign when `negative`."""
    bits = rng.integers(0, 0x7C00, shape, dtype=np.uint16)
    if negative:
        bits |= rng.integers(0, 2, shape, dtype=np.uint16) << 15
    return bits


def random_blocks(rng, kind: str, n: int, k: int, d=None) -> np.ndarray:
    """uint8 [n, bytes per row]: the blocks of an [n, k] tensor of ggml type `kind`, random
    bytes with each fp16 field set from d(shape) -> uint16 bits (default fp16_bits)."""
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[QType[kind]]
    blocks = rng.integers(0, 256, (n, k // per_block, block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[kind]:
        bits = (d or (lambda shape: fp16_bits(rng, shape)))((n, k // per_block))
        blocks[..., offset:offset + 2] = bits.astype("<u2")[..., None].view(np.uint8)
    return blocks.reshape(n, -1)


def reference(blocks: np.ndarray, kind: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks, QType[kind]))


def write_gguf(path, tensors: dict, metadata: dict | None = None, arch: str = "llama"):
    """A GGUF of {name: (ggml type name, array)}: uint8 blocks for a block type, the float
    array itself for F32 / F16."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in (metadata or {}).items():
        writer.add_uint32(key, value) if isinstance(value, int) else writer.add_float32(key, value)
    for name, (kind, array) in tensors.items():
        if kind in ("F32", "F16"):
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_dtype=QType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_back(path, tmp_tensors: dict) -> dict:
    """fourbit's reading of each tensor of a file written by write_gguf."""
    file = GGUFFile(path)
    return {name: read_tensor(file.tensors[name]) for name in tmp_tensors}


# ---- one tensor at a time ----

SHAPES = [(1, 256), (7, 512), (33, 1024), (64, 2304)]


@pytest.mark.parametrize("negative", [False, True], ids=["positive", "any-sign"])
def test_q4_k_loads_as_int4_exactly(tmp_path, negative):
    """Int4Weight.dequantize (q s + m in fp32) equals gguf's Q4_K dequantization bit for bit,
    over the full 6-bit ranges of the sub-block scales and mins and random finite fp16 d and
    dmin (zero and subnormals included; d and dmin of either sign in the second case, which
    real files do not have but the arithmetic allows)."""
    rng = np.random.default_rng(13 + negative)
    tensors = {f"w{i}": ("Q4_K", random_blocks(rng, "Q4_K", n, k, lambda shape: fp16_bits(rng, shape, negative)))
               for i, (n, k) in enumerate(SHAPES)}
    # Force the edge cases in: zero d and dmin, the smallest and largest subnormals and the
    # largest normal, in the first super-blocks of the largest tensor.
    edge = np.array([0, 1, 0x3FF, 0x400, 0x7BFF, 0x3C00], dtype="<u2").view(np.uint8).reshape(-1, 2)
    big = tensors["w3"][1].reshape(64, 9, 144)
    big[0, :6, 0:2], big[1, :6, 2:4] = edge, edge
    write_gguf(tmp_path / "q4k.gguf", tensors)
    loaded = read_back(tmp_path / "q4k.gguf", tensors)
    sc_min = [gguf.quants.Q4_K.get_scale_min(blocks.reshape(-1, 144)[:, 4:16]) for _, blocks in tensors.values()]
    for values in zip(*sc_min):  # the data covers every 6-bit value of both
        assert set(np.unique(np.concatenate([v.reshape(-1) for v in values]))) == set(range(64))
    for (name, (kind, blocks)), (n, k) in zip(tensors.items(), SHAPES):
        weight = loaded[name]
        assert isinstance(weight, fourbit.Int4Weight) and weight.shape == (n, k) and weight.group_size == 32
        assert weight.scales.dtype == weight.offsets.dtype == torch.float32 and not weight.symmetric
        expected = reference(blocks, kind)
        assert expected.dtype == torch.float32 and torch.isfinite(expected).all()
        assert torch.equal(weight.dequantize(), expected), name


def test_q4_k_nibble_order_and_scale_packing_by_hand(tmp_path):
    """One super-block built field by field: weight 64 c + l is the low nibble of byte l of
    the c-th 32-byte run, weight 64 c + 32 + l its high nibble, and sub-block j reads its
    6-bit scale and min where llama.cpp's get_scale_min_k4 puts them."""
    sc, mn = [5, 63, 0, 17, 42, 1, 33, 60], [63, 0, 9, 30, 2, 61, 48, 7]
    packed = np.zeros(12, dtype=np.uint8)
    for j in range(4):
        packed[j] = sc[j] | (sc[j + 4] >> 4) << 6
        packed[j + 4] = mn[j] | (mn[j + 4] >> 4) << 6
        packed[j + 8] = (sc[j + 4] & 0xF) | (mn[j + 4] & 0xF) << 4
    q = np.arange(256) * 7 % 16
    qs = np.zeros(128, dtype=np.uint8)
    for c in range(4):
        for lane in range(32):
            qs[32 * c + lane] = q[64 * c + lane] | q[64 * c + 32 + lane] << 4
    d, dmin = np.float16(0.25), np.float16(0.125)
    block = np.concatenate([np.array([d, dmin], dtype="<f2").view(np.uint8), packed, qs])[None]
    write_gguf(tmp_path / "one.gguf", {"w": ("Q4_K", block)})
    weight = read_back(tmp_path / "one.gguf", {"w": None})["w"]
    by_hand = torch.tensor([0.25 * sc[i // 32] * q[i] - 0.125 * mn[i // 32] for i in range(256)],
                           dtype=torch.float32)[None]
    assert torch.equal(weight.dequantize(), by_hand)
    assert torch.equal(by_hand, reference(block, "Q4_K"))


@pytest.mark.parametrize("kind", ["Q5_K", "Q6_K", "Q8_0"])
def test_other_block_types_load_as_float_exactly(tmp_path, kind):
    """Q5_K, Q6_K (the other types of a Q4_K_M file) and Q8_0 stay float32, equal to gguf's
    dequantization element for element."""
    rng = np.random.default_rng(len(kind))
    shapes = [(3, 256), (17, 768), (40, 1024)]
    tensors = {f"w{i}": (kind, random_blocks(rng, kind, n, k)) for i, (n, k) in enumerate(shapes)}
    write_gguf(tmp_path / "t.gguf", tensors)
    loaded = read_back(tmp_path / "t.gguf", tensors)
    for name, (_, blocks) in tensors.items():
        expected = reference(blocks, kind)
        assert torch.isfinite(expected).all()
        value = loaded[name]
        assert isinstance(value, torch.Tensor) and value.dtype == torch.float32
        assert torch.equal(value, expected), name


def test_q4_k_conversion_is_fast():
    """A 7B MLP matrix (11008 x 4096) converts in well under a second of CPU (checked
    loosely here: a shared CI core is slow)."""
    import time
    rng = np.random.default_rng(0)
    blocks = random_blocks(rng, "Q4_K", 11008, 4096)
    tensor = type("T", (), dict(name="w", type_name="Q4_K", shape=(11008, 4096), data=blocks.reshape(-1)))
    start = time.perf_counter()
    weight = read_tensor(tensor)
    assert weight.shape == (11008, 4096)
    assert time.perf_counter() - start < 5


# ---- a Q4_K_M-like Llama file ----

CONFIG = dict(vocab=320, hidden=256, inter=512, layers=3, heads=4, kv_heads=2)

# Q4_K_M keeps most matrices Q4_K and gives attn_v and ffn_down Q6_K in some layers (the
# first and last eighth and every third between), output Q6_K; token_embd here Q8_0. Layer 1
# is all Q4_K (qkv fused int4), layers 0 and 2 have Q6_K v and down (down float, qkv a
# ConcatLinear of int4 q and k and a float v).
def layer_types(i: int) -> dict:
    more_bits = i != 1
    return {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K" if more_bits else "Q4_K",
            "attn_output": "Q4_K", "ffn_gate": "Q4_K", "ffn_up": "Q4_K",
            "ffn_down": "Q6_K" if more_bits else "Q4_K"}


def _d(rng, low, high):
    """fp16 bits of d uniform in [low, high), small enough for sane activations."""
    return lambda shape: rng.uniform(low, high, shape).astype(np.float16).view(np.uint16)


def q4_k_m_tensors(rng) -> dict:
    c = CONFIG
    d = c["hidden"] // c["heads"]
    shapes = {"attn_q": (c["heads"] * d, c["hidden"]), "attn_k": (c["kv_heads"] * d, c["hidden"]),
              "attn_v": (c["kv_heads"] * d, c["hidden"]), "attn_output": (c["hidden"], c["heads"] * d),
              "ffn_gate": (c["inter"], c["hidden"]), "ffn_up": (c["inter"], c["hidden"]),
              "ffn_down": (c["hidden"], c["inter"])}
    # Scales that give weights of about +-0.05 (Q4_K: d sc q - dmin mn, sc and mn up to 63;
    # dmin ~ 7.5 d centres the weights).
    scale = {"Q4_K": _d(rng, 5e-5, 1.5e-4), "Q6_K": _d(rng, 1e-5, 3e-5), "Q8_0": _d(rng, 2e-4, 6e-4)}
    tensors = {"token_embd.weight": ("Q8_0", random_blocks(rng, "Q8_0", c["vocab"], c["hidden"], scale["Q8_0"])),
               "output_norm.weight": ("F32", (1 + 0.1 * rng.standard_normal(c["hidden"])).astype(np.float32)),
               "output.weight": ("Q6_K", random_blocks(rng, "Q6_K", c["vocab"], c["hidden"], scale["Q6_K"]))}
    for i in range(c["layers"]):
        for norm in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{i}.{norm}.weight"] = ("F32", (1 + 0.1 * rng.standard_normal(c["hidden"])).astype(np.float32))
        for part, kind in layer_types(i).items():
            blocks = random_blocks(rng, kind, *shapes[part], scale[kind])
            if kind == "Q4_K":  # dmin = 7.5 d: the mins offset the weights by about half their range
                fields = blocks.reshape(shapes[part][0], -1, 144)
                fields[..., 2:4] = (fields[..., 0:2].view("<f2") * np.float16(7.5)).view(np.uint8)
            tensors[f"blk.{i}.{part}.weight"] = (kind, blocks)
    return tensors


METADATA = {"llama.block_count": CONFIG["layers"], "llama.embedding_length": CONFIG["hidden"],
            "llama.feed_forward_length": CONFIG["inter"], "llama.attention.head_count": CONFIG["heads"],
            "llama.attention.head_count_kv": CONFIG["kv_heads"], "llama.vocab_size": CONFIG["vocab"],
            "llama.context_length": 128, "llama.attention.layer_norm_rms_epsilon": 1e-5}


def dequantized(tensors: dict) -> dict:
    """The same tensors as F32, each through gguf's own dequantization."""
    return {name: ("F32", array if kind == "F32" else gguf.quants.dequantize(array, QType[kind]))
            for name, (kind, array) in tensors.items()}


@pytest.fixture(scope="module")
def q4_k_m_models(tmp_path_factory):
    """(int4 model from the Q4_K_M-like file, float model from its gguf-dequantized twin,
    the file's tensors by name)."""
    tmp = tmp_path_factory.mktemp("q4km")
    tensors = q4_k_m_tensors(np.random.default_rng(2024))
    write_gguf(tmp / "q4km.gguf", tensors, METADATA)
    write_gguf(tmp / "f32.gguf", dequantized(tensors), METADATA)
    model = fourbit.load_model(tmp / "q4km.gguf", device="cpu", dtype=torch.float32)
    ref = fourbit.load_model(tmp / "f32.gguf", device="cpu", dtype=torch.float32)
    return model, ref, tensors


def test_q4_k_m_file_puts_every_q4_k_layer_on_int4(q4_k_m_models):
    model, ref, tensors = q4_k_m_models
    fused = {"self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"), "self_attn.o_proj": ("attn_output",),
             "mlp.gate_up_proj": ("ffn_gate", "ffn_up"), "mlp.down_proj": ("ffn_down",)}
    for i, layer in enumerate(model.layers):
        types = layer_types(i)
        for name, parts in fused.items():
            module = layer.get_submodule(name)
            kinds = [types[p] for p in parts]
            if len(set(kinds)) > 1:  # parts of both kinds stay apart, each in its own form
                assert isinstance(module, fourbit.nn.ConcatLinear), (i, name)
                modules = list(module.parts)
            else:
                modules = [module]
                kinds = kinds[:1]
            for part, kind in zip(modules, kinds):
                if kind == "Q4_K":
                    assert isinstance(part, fourbit.Int4Linear), (i, name)
                    assert part.group_size == 32 and part.scales.dtype == part.offsets.dtype == torch.float32
                else:
                    assert type(part) is torch.nn.Linear and part.weight.dtype == torch.float32, (i, name)
    assert type(model.lm_head) is torch.nn.Linear  # output.weight is Q6_K
    assert isinstance(model.layers[1].self_attn.qkv_proj, fourbit.Int4Linear)  # all Q4_K: fused


def dense_weights(model) -> dict:
    """{linear layer name: its float weight}, a ConcatLinear's parts stacked as one."""
    def dense(module):
        if isinstance(module, fourbit.nn.ConcatLinear):
            return torch.cat([dense(p) for p in module.parts])
        return module.weight.dequantize() if isinstance(module, fourbit.Int4Linear) else module.weight
    kinds = (fourbit.Int4Linear, torch.nn.Linear, fourbit.nn.ConcatLinear)
    names = [n for n, m in model.named_modules() if isinstance(m, kinds) and ".parts." not in n]
    return {n: dense(model.get_submodule(n)) for n in names}


def test_q4_k_m_weights_equal_gguf_dequantization(q4_k_m_models):
    """Every weight of the int4 model (its Int4Linear dequantized, its float layers as they
    are) equals the float model's, which holds gguf's dequantization of every tensor:
    the Q4_K parts of a float qkv too, and q and k after llama.cpp's row order is undone
    (checked by hand below against the file's own rows)."""
    model, ref, tensors = q4_k_m_models
    ours, theirs = dense_weights(model), dense_weights(ref)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert isinstance(model.embed_tokens, fourbit.Int8Embedding)  # Q8_0: int8 q and fp16 d as they are
    assert torch.equal(model.embed_tokens.weight.dequantize(), reference(tensors["token_embd.weight"][1], "Q8_0"))
    # q rows: llama.cpp stores the pairs (i, i + D/2) of each head as rows 2i, 2i + 1.
    heads, d = CONFIG["heads"], CONFIG["hidden"] // CONFIG["heads"]
    q = reference(tensors["blk.1.attn_q.weight"][1], "Q4_K")
    hf_order = q.view(heads, d // 2, 2, -1).transpose(1, 2).reshape(heads * d, -1)
    assert torch.equal(ours["layers.1.self_attn.qkv_proj"][:heads * d], hf_order)


def test_q4_k_m_logits_and_greedy_decode_match_the_float_model(q4_k_m_models):
    """The weights being equal, the logits differ only by the int4 CPU kernel's order of
    summation against torch's fp32 matmul: the int4 model must be as close to the float
    model run in fp64 as the float model in fp32 is (at most twice its relative error, plus
    a few fp32 roundings), the measure every kernel test uses. Greedy decoding agrees."""
    model, ref, _ = q4_k_m_models
    ref64 = copy.deepcopy(ref).double()
    ids = torch.tensor([[1, 17, 250, 3, 99, 42, 7, 318]])
    with torch.no_grad():
        out, plain, exact = model(ids), ref(ids), ref64(ids)
    err, err_plain = relative_error(out, exact), relative_error(plain, exact)
    assert err <= 2 * err_plain + 4 * torch.finfo(torch.float32).eps, (err, err_plain)
    prompts = [[1, 17, 250, 3], [5, 6], [300, 2, 2, 9, 11]]
    assert fourbit.generate(model, prompts, max_new_tokens=8) == fourbit.generate(ref, prompts, max_new_tokens=8)


def test_q4_k_m_int4_fraction(q4_k_m_models):
    """How many of the linear weights run on int4: every Q4_K one (the loader keeps the parts
    of a fused q/k/v apart when v is Q6_K); all but the Q6_K v and down, and lm_head."""
    model, _, _ = q4_k_m_models
    sizes = {n: m.in_features * m.out_features for n, m in model.named_modules()
             if isinstance(m, (fourbit.Int4Linear, torch.nn.Linear))}
    int4 = sum(s for n, s in sizes.items() if isinstance(model.get_submodule(n), fourbit.Int4Linear))
    c = CONFIG
    d = c["hidden"] // c["heads"]
    qkv, o, mlp = (c["heads"] + 2 * c["kv_heads"]) * d * c["hidden"], c["hidden"] ** 2, 3 * c["inter"] * c["hidden"]
    v, down = c["kv_heads"] * d * c["hidden"], c["inter"] * c["hidden"]
    expected = c["layers"] * (qkv + o + mlp) - 2 * (v + down)  # layers 0 and 2: v and down Q6_K
    assert int4 == expected
    assert sum(sizes.values()) == c["layers"] * (qkv + o + mlp) + c["vocab"] * c["hidden"]


def test_q4_k_model_saves_and_loads_back_unchanged(q4_k_m_models, tmp_path):
    """`fourbit quantize` / save_model of a Q4_K model keeps its int4 layers and their fp32
    scales and offsets as they are: the same module types, weights and logits."""
    model, _, _ = q4_k_m_models
    back = fourbit.load_model(fourbit.save_model(model, tmp_path / "saved"), device="cpu", dtype=torch.float32)
    for (name, a), (_, b) in zip(model.named_modules(), back.named_modules()):
        assert type(a) is type(b), name
        if isinstance(a, fourbit.Int4Linear):
            assert b.scales.dtype == b.offsets.dtype == torch.float32
            assert torch.equal(a.weight.dequantize(), b.weight.dequantize()), name
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        assert torch.equal(model(ids), back(ids))
