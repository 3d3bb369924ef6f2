"""fourbit.load_model against Hugging Face transformers as the peer implementation: the
embedded SmolLM2 GGUF (Q4_1 layers loaded as int4 with no loss), Hugging Face directories of
several Llama-family architectures, quantize-while-loading, and fourbit's own directories."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import fourbit
from fourbit.evaluate import default_text, perplexity
from helpers import relative_error, sqnr_db

transformers = pytest.importorskip("transformers")

# Token-id prompts: a ChatML exchange, plain English, and code (SmolLM2 vocabulary ids).
PROMPTS = {
    "chat": [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198],
    "short": [19556, 905],
    "ids": list(range(100, 160)),
}


@pytest.mark.parametrize("name", PROMPTS)
def test_gguf_logits_match_transformers(smollm, smollm_hf, name):
    ids = torch.tensor([PROMPTS[name]])
    with torch.no_grad():
        ours, ref = smollm(ids), smollm_hf(ids).logits
    assert relative_error(ours, ref) < 1e-3


def test_gguf_tensors_load_exactly(smollm, smollm_path):
    """Every linear layer but the tied (int8) head is Int4Linear and dequantizes to exactly what the
    gguf package's own dequantizer gives for the Q4_1 tensors (q and k after llama.cpp's row
    order is undone, checked through the logits above); the Q8_0 embedding likewise."""
    gguf = pytest.importorskip("gguf")
    int4 = [n for n, m in smollm.named_modules() if isinstance(m, fourbit.Int4Linear)]
    assert len(int4) == 4 * smollm.config.num_layers
    tensors = {t.name: t for t in gguf.GGUFReader(str(smollm_path)).tensors}
    reference = lambda name: torch.from_numpy(gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type))
    layer = smollm.layers[3]
    assert tensors["blk.3.ffn_gate.weight"].tensor_type.name == "Q4_1"
    assert torch.equal(layer.mlp.gate_up_proj.weight.dequantize(),
                       torch.cat([reference("blk.3.ffn_gate.weight"), reference("blk.3.ffn_up.weight")]))
    assert torch.equal(layer.mlp.down_proj.weight.dequantize(), reference("blk.3.ffn_down.weight"))
    assert torch.equal(layer.self_attn.qkv_proj.weight.dequantize()[-192:], reference("blk.3.attn_v.weight"))
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    assert isinstance(smollm.embed_tokens, fourbit.Int8Embedding)  # int8, read by the tied head too
    assert torch.equal(smollm.embed_tokens.weight.dequantize(), reference("token_embd.weight"))


def test_greedy_continuations_match_transformers(smollm, smollm_hf):
    prompts = list(PROMPTS.values())
    ours = fourbit.generate(smollm, prompts, max_new_tokens=20)
    for prompt, out in zip(prompts, ours):
        ids = torch.tensor([prompt])  # an explicit mask: the peer would mask token 2 as padding
        ref = smollm_hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
        ref = ref[0, len(prompt):]
        assert out == ref.tolist()


def test_perplexity_matches_transformers(smollm, smollm_hf):
    tokenizer = fourbit.load_tokenizer("smollm2-135m")
    ids = tokenizer.encode(default_text()[:20000])
    ours = perplexity(smollm, ids, window=512, max_windows=4, progress=False)

    class Peer:  # the same windows through the peer
        device = torch.device("cpu")

        def __call__(self, x):
            return smollm_hf(x).logits
    ref = perplexity(Peer(), ids, window=512, max_windows=4, progress=False)
    assert 1 < ours < 100
    assert abs(ours - ref) / ref < 0.005


def write_hf_directory(peer, directory, shards: int = 1):
    """The peer's weights (Hugging Face names) and config as a model directory, sharded with an
    index when shards > 1 (transformers will not save a model it loaded from GGUF itself)."""
    from safetensors.torch import save_file
    config = peer.config.to_dict()
    config.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(config))
    state = {n: t.contiguous() for n, t in peer.state_dict().items()
             if not (n == "lm_head.weight" and peer.config.tie_word_embeddings)}
    names = sorted(state)
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"))
        return
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: state[n] for n in part}, str(directory / file))
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_hf_directory_from_the_gguf_gives_the_same_logits(smollm, smollm_hf, tmp_path):
    """The peer's (dequantized) weights as a sharded Hugging Face directory: fourbit loads it
    as float and, with quantize=, as int4."""
    write_hf_directory(smollm_hf, tmp_path, shards=3)
    ids = torch.tensor([PROMPTS["chat"]])
    model = fourbit.load_model(tmp_path, device="cpu")
    assert not any(isinstance(m, fourbit.Int4Linear) for m in model.modules())
    with torch.no_grad():
        ref = smollm(ids)
        assert relative_error(model(ids), ref) < 1e-3
        quantized = fourbit.load_model(tmp_path, device="cpu", quantize=dict(group_size=32))
        assert sum(isinstance(m, fourbit.Int4Linear) for m in quantized.modules()) == 4 * model.config.num_layers
        # Re-quantizing the dequantized Q4_1 weights with our own RTN at group 32 lands close
        # to them (the group statistics differ from llama.cpp's, so not exactly).
        assert sqnr_db(ref, quantized(ids)) > 20


def tiny_hf_model(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama3":
        config = transformers.LlamaConfig(**common, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16))
        return transformers.LlamaForCausalLM(config)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        return transformers.Qwen2ForCausalLM(config)
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    if kind == "llama-linear":
        config = transformers.LlamaConfig(**common, head_dim=32, rope_parameters=dict(
            rope_type="linear", rope_theta=10000.0, factor=2.0))
        return transformers.LlamaForCausalLM(config)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["llama3", "llama-linear", "qwen2", "mistral"])
def test_hf_architectures_match_transformers(kind, tmp_path):
    peer = tiny_hf_model(kind).eval()
    for p in peer.parameters():  # biases are zero at init: make them matter
        torch.nn.init.normal_(p, std=0.1)
    peer.save_pretrained(tmp_path)
    model = fourbit.load_model(tmp_path, device="cpu")
    ids = torch.randint(0, 300, (2, 40))  # 40 > the 16 positions llama3 scaling keeps unscaled
    with torch.no_grad():
        assert relative_error(model(ids), peer(ids).logits) < 1e-5


def test_save_model_round_trip_is_exact(smollm, tmp_path):
    tokenizer = fourbit.load_tokenizer("smollm2-135m")
    fourbit.save_model(smollm, tmp_path / "out", tokenizer)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 30
    again = fourbit.load_model(tmp_path / "out", device="cpu")
    ids = torch.tensor([PROMPTS["chat"]])
    with torch.no_grad():
        assert torch.equal(again(ids), smollm(ids))
    assert fourbit.load_tokenizer(tmp_path / "out").encode("Hello world") == tokenizer.encode("Hello world")


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        fourbit.load_model(tmp_path / "missing", device="cpu")
    (tmp_path / "x.bin").write_bytes(b"1234")
    with pytest.raises(ValueError, match="neither a .gguf file nor a model directory"):
        fourbit.load_model(tmp_path / "x.bin", device="cpu")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        fourbit.load_model(tmp_path / "bad.gguf", device="cpu")
    with pytest.raises(ValueError, match="no config.json"):
        fourbit.load_model(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        fourbit.load_model(tmp_path, device="cpu")
    with pytest.raises(TypeError, match="quantize must be"):
        fourbit.load_model(tmp_path, device="cpu", quantize=4)


@pytest.mark.parametrize("kind", ["llama3", "qwen2"], ids=["separate-head", "tied-head"])
def test_quantize_config_while_loading_matches_quantize_(kind, tmp_path):
    """load_model(quantize=config) quantizes exactly the layers the config's skip and filter
    select, bit for bit as quantize_ does on the float model, with the config's backend; a
    dict of the same fields gives the same model. A tied lm_head stays float."""
    tiny_hf_model(kind).save_pretrained(tmp_path)
    config = fourbit.Int4WeightOnlyConfig(group_size=32, symmetric=True, skip="down_proj", backend="torch",
                                          filter=lambda name, module: not name.startswith("layers.1.self_attn"))
    loaded = fourbit.load_model(tmp_path, device="cpu", quantize=config)
    # quantize_ would quantize a tied head too (the loader keeps it tied, so float): skip it there.
    tied = kind == "qwen2"
    reference = fourbit.quantize_(fourbit.load_model(tmp_path, device="cpu"),
                                  dataclasses.replace(config, skip=("down_proj", "lm_head")) if tied else config)
    from_dict = fourbit.load_model(tmp_path, device="cpu", quantize=dict(
        group_size=32, symmetric=True, skip="down_proj", backend="torch", filter=config.filter))
    int4 = {n: m for n, m in loaded.named_modules() if isinstance(m, fourbit.Int4Linear)}
    expected = {"layers.0.self_attn.qkv_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.gate_up_proj",
                "layers.1.mlp.gate_up_proj"} | (set() if tied else {"lm_head"})
    assert set(int4) == expected
    assert {(m.group_size, m.symmetric, m.backend) for m in int4.values()} == {(32, True, "torch")}
    for other in (reference, from_dict):
        assert {n for n, m in other.named_modules() if isinstance(m, fourbit.Int4Linear)} == expected
        ours, theirs = loaded.state_dict(), other.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_quantize_option_errors_name_the_problem(tmp_path):
    """A misspelled key or impossible value is an error naming it, before any weight is read."""
    tiny_hf_model("llama3").save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="'group_sise'.*did you mean 'group_size'"):
        fourbit.load_model(tmp_path, device="cpu", quantize=dict(group_sise=32))
    with pytest.raises(ValueError, match="got 100"):
        fourbit.load_model(tmp_path, device="cpu", quantize=dict(group_size=100))
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        fourbit.load_model(tmp_path, device="cpu", quantize=dict(backend="tpu"))
    with pytest.raises(ValueError, match="method 'gptq' needs calibration data"):
        fourbit.load_model(tmp_path, device="cpu", quantize=dict(method="gptq"))
    with pytest.raises(TypeError, match="quantize must be"):
        fourbit.load_model(tmp_path, device="cpu", quantize=0)


# ---- every tensor a loader reads is checked, by the name the checkpoint gives it ----

def tampered_hf_directory(directory, kind: str, changes: dict):
    """A tiny model's directory with some tensors changed: {name: f(tensor) -> tensor, or None
    to leave the tensor out}."""
    from safetensors.torch import load_file, save_file
    tiny_hf_model(kind).save_pretrained(directory)
    file = str(directory / "model.safetensors")
    state = load_file(file)
    for name, change in changes.items():
        assert name in state, name
        state[name] = change(state[name])
    save_file({n: t.contiguous() for n, t in state.items() if t is not None}, file, metadata={"format": "pt"})
    return directory


# (kind, {tensor: change}, the error's message). The tiny llama3: hidden 64, 4 heads and 2 kv
# heads of 16, intermediate 160, vocabulary 300, a separate head; qwen2 ties it and has biases.
BAD_HF_TENSORS = {
    "norm-[1]": ("llama3", {"model.norm.weight": lambda t: t[:1]},
                 r"'model.norm.weight' has shape \(1,\); the model expects \(64,\)"),
    "layer-norm-[1]": ("llama3", {"model.layers.1.post_attention_layernorm.weight": lambda t: t[:1]},
                       r"'model.layers.1.post_attention_layernorm.weight' has shape \(1,\)"),
    "embed-int64": ("llama3", {"model.embed_tokens.weight": lambda t: t.to(torch.int64)},
                    r"'model.embed_tokens.weight' has dtype torch.int64"),
    "q_proj-rows": ("llama3", {"model.layers.0.self_attn.q_proj.weight": lambda t: t[:48]},
                    r"'model.layers.0.self_attn.q_proj.weight' has shape \(48, 64\); the model expects \(64, 64\)"),
    "q_proj-columns": ("llama3", {"model.layers.1.self_attn.q_proj.weight": lambda t: t[:, :48]},
                       r"'model.layers.1.self_attn.q_proj.weight' has shape \(64, 48\)"),
    "k_proj-transposed": ("llama3", {"model.layers.0.self_attn.k_proj.weight": lambda t: t.T},
                          r"'model.layers.0.self_attn.k_proj.weight' has shape \(64, 32\); "
                          r"the model expects \(32, 64\)"),
    "up_proj-rows": ("llama3", {"model.layers.1.mlp.up_proj.weight": lambda t: torch.cat([t, t[:1]])},
                     r"'model.layers.1.mlp.up_proj.weight' has shape \(161, 64\); the model expects \(160, 64\)"),
    "down_proj-int8": ("llama3", {"model.layers.1.mlp.down_proj.weight": lambda t: t.to(torch.int8)},
                       r"'model.layers.1.mlp.down_proj.weight' has dtype torch.int8"),
    "o_proj-float8": ("llama3", {"model.layers.0.self_attn.o_proj.weight": lambda t: t.to(torch.float8_e4m3fn)},
                      r"'model.layers.0.self_attn.o_proj.weight' has dtype torch.float8_e4m3fn"),
    "lm_head-rows": ("llama3", {"lm_head.weight": lambda t: t[:299]},
                     r"'lm_head.weight' has shape \(299, 64\); the model expects \(300, 64\)"),
    "k_bias-[1]": ("qwen2", {"model.layers.0.self_attn.k_proj.bias": lambda t: t[:1]},
                   r"'model.layers.0.self_attn.k_proj.bias' has shape \(1,\); the model expects \(32,\)"),
    "v_bias-int32": ("qwen2", {"model.layers.1.self_attn.v_proj.bias": lambda t: t.to(torch.int32)},
                     r"'model.layers.1.self_attn.v_proj.bias' has dtype torch.int32"),
    "missing-gate_proj": ("llama3", {"model.layers.1.mlp.gate_proj.weight": lambda t: None},
                          r"has no tensor 'model.layers.1.mlp.gate_proj.weight'"),
    "missing-norm": ("qwen2", {"model.norm.weight": lambda t: None}, r"has no tensor 'model.norm.weight'"),
}


@pytest.mark.parametrize("case", BAD_HF_TENSORS)
def test_hf_tensors_of_the_wrong_shape_or_dtype_are_named_at_load(case, tmp_path):
    """A tensor that does not fit the model is a ValueError naming it at load time, float or
    quantized while loading, never a broadcast, a cast or an error at the first forward."""
    kind, changes, message = BAD_HF_TENSORS[case]
    tampered_hf_directory(tmp_path, kind, changes)
    for quantize in (None, dict(group_size=32)):
        with pytest.raises(ValueError, match=message):
            fourbit.load_model(tmp_path, device="cpu", quantize=quantize)


def test_hf_float64_tensors_are_converted_to_the_model_dtype(tmp_path):
    """float64 is a float weight stored wide: accepted, converted like fp32 to the model's dtype
    (exactly, for values that came from fp32)."""
    ids = torch.randint(0, 300, (1, 12))
    tiny_hf_model("llama3").save_pretrained(tmp_path / "fp32")
    names = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.1.mlp.down_proj.weight"]
    tampered_hf_directory(tmp_path / "fp64", "llama3", {n: lambda t: t.double() for n in names})
    with torch.no_grad():
        for quantize in (None, dict(group_size=32)):
            wide = fourbit.load_model(tmp_path / "fp64", device="cpu", quantize=quantize)
            assert wide.embed_tokens.weight.dtype == torch.float32
            assert torch.equal(wide(ids), fourbit.load_model(tmp_path / "fp32", device="cpu", quantize=quantize)(ids))


def test_quantizing_an_unrepresentable_weight_names_the_checkpoint_tensors(tmp_path):
    tampered_hf_directory(tmp_path, "llama3", {"model.layers.1.mlp.up_proj.weight": lambda t: t * 1e7})
    fourbit.load_model(tmp_path, device="cpu", dtype=torch.bfloat16, quantize=dict(group_size=32))  # fits bf16
    with pytest.raises(ValueError, match=r"layers.1.mlp.gate_up_proj \(checkpoint tensors "
                                         r"'model.layers.1.mlp.gate_proj.weight', 'model.layers.1.mlp.up_proj.weight'\)"
                                         r": w's row 160, group 0 spans .*torch.float16"):
        fourbit.load_model(tmp_path, device="cpu", dtype=torch.float16, quantize=dict(group_size=32))


def test_load_model_rejects_a_dtype_that_is_not_a_compute_dtype(tmp_path):
    tiny_hf_model("llama3").save_pretrained(tmp_path)
    for dtype in (torch.int8, torch.float64, "float16"):
        with pytest.raises(TypeError, match="dtype must be one of"):
            fourbit.load_model(tmp_path, device="cpu", dtype=dtype)


# ---- the same checks on GGUF files ----

TINY_GGUF = dict(vocab=300, hidden=64, inter=160, layers=2, heads=4, kv_heads=2)


def write_tiny_gguf(path, types: dict | None = None, changes: dict | None = None):
    """A tiny llama GGUF of random weights: F32 unless `types` gives a tensor another ggml type
    (Q4_0, Q4_1, ...), with `changes` {name: f(array) -> array} applied first. Returns the
    arrays written, by name."""
    gguf_writer = pytest.importorskip("gguf")
    c = TINY_GGUF
    d = c["hidden"] // c["heads"]
    shapes = {"token_embd.weight": (c["vocab"], c["hidden"]), "output_norm.weight": (c["hidden"],),
              "output.weight": (c["vocab"], c["hidden"])}
    for i in range(c["layers"]):
        shapes.update({f"blk.{i}.attn_norm.weight": (c["hidden"],), f"blk.{i}.ffn_norm.weight": (c["hidden"],),
                       f"blk.{i}.attn_q.weight": (c["heads"] * d, c["hidden"]),
                       f"blk.{i}.attn_k.weight": (c["kv_heads"] * d, c["hidden"]),
                       f"blk.{i}.attn_v.weight": (c["kv_heads"] * d, c["hidden"]),
                       f"blk.{i}.attn_output.weight": (c["hidden"], c["heads"] * d),
                       f"blk.{i}.ffn_gate.weight": (c["inter"], c["hidden"]),
                       f"blk.{i}.ffn_up.weight": (c["inter"], c["hidden"]),
                       f"blk.{i}.ffn_down.weight": (c["hidden"], c["inter"])})
    writer = gguf_writer.GGUFWriter(str(path), arch="llama")
    for key, value in (("block_count", c["layers"]), ("embedding_length", c["hidden"]),
                       ("feed_forward_length", c["inter"]), ("attention.head_count", c["heads"]),
                       ("attention.head_count_kv", c["kv_heads"]), ("vocab_size", c["vocab"]),
                       ("context_length", 256)):
        writer.add_uint32(f"llama.{key}", value)
    arrays = {}
    for name, shape in shapes.items():
        array = (np.random.default_rng(len(arrays)).standard_normal(shape) * 0.1).astype(np.float32)
        array = (changes or {}).get(name, lambda a: a)(array)
        arrays[name] = array
        kind = (types or {}).get(name)
        if kind is None:
            writer.add_tensor(name, array)
        else:
            qtype = gguf_writer.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf_writer.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arrays


def test_gguf_with_a_q4_0_embedding_loads_it_dequantized(tmp_path):
    """llama.cpp's Q4_0 files often quantize token_embd too: the embedding is dequantized
    (exactly as the gguf package does), the layers stay int4."""
    gguf_writer = pytest.importorskip("gguf")
    q4 = {"token_embd.weight": "Q4_0", "blk.0.ffn_down.weight": "Q4_0", "blk.1.attn_q.weight": "Q4_1"}
    write_tiny_gguf(tmp_path / "m.gguf", types=q4)
    model = fourbit.load_model(tmp_path / "m.gguf", device="cpu")
    tensors = {t.name: t for t in gguf_writer.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    embed = tensors["token_embd.weight"]
    reference = gguf_writer.quants.dequantize(embed.data, embed.tensor_type)
    assert torch.equal(model.embed_tokens.weight, torch.from_numpy(reference))
    assert isinstance(model.layers[0].mlp.down_proj, fourbit.Int4Linear)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


BAD_GGUF_TENSORS = {
    "attn_q-rows": ({}, {"blk.0.attn_q.weight": lambda a: a[:36]},  # not heads x pairs: no unpermuting
                    r"'blk.0.attn_q.weight' has shape \(36, 64\); the model expects \(64, 64\)"),
    "attn_q-rows-q4": ({"blk.1.attn_q.weight": "Q4_0"}, {"blk.1.attn_q.weight": lambda a: a[:40]},
                       r"'blk.1.attn_q.weight' has shape \(40, 64\); the model expects \(64, 64\)"),
    "attn_k-rows-q4": ({"blk.1.attn_k.weight": "Q4_0"}, {"blk.1.attn_k.weight": lambda a: a[:24]},
                       r"'blk.1.attn_k.weight' has shape \(24, 64\); the model expects \(32, 64\)"),
    "ffn_down-columns-q4": ({"blk.1.ffn_down.weight": "Q4_1"}, {"blk.1.ffn_down.weight": lambda a: a[:, :128]},
                            r"'blk.1.ffn_down.weight' has shape \(64, 128\); the model expects \(64, 160\)"),
    "output_norm-[1]": ({}, {"output_norm.weight": lambda a: a[:1]},
                        r"'output_norm.weight' has shape \(1,\); the model expects \(64,\)"),
    "attn_norm-int32": ({}, {"blk.0.attn_norm.weight": lambda a: a.astype(np.int32)},
                        r"'blk.0.attn_norm.weight' has dtype torch.int32"),
    "token_embd-int64": ({}, {"token_embd.weight": lambda a: a.astype(np.int64)},
                         r"'token_embd.weight' has dtype torch.int64"),
}


@pytest.mark.parametrize("case", BAD_GGUF_TENSORS)
def test_gguf_tensors_of_the_wrong_shape_or_dtype_are_named_at_load(case, tmp_path):
    types, changes, message = BAD_GGUF_TENSORS[case]
    write_tiny_gguf(tmp_path / "m.gguf", types, changes)
    for quantize in (None, dict(group_size=32)):
        with pytest.raises(ValueError, match=message):
            fourbit.load_model(tmp_path / "m.gguf", device="cpu", quantize=quantize)


def test_gguf_float64_tensors_are_converted(tmp_path):
    arrays = write_tiny_gguf(tmp_path / "m.gguf", changes={"blk.0.ffn_up.weight": lambda a: a.astype(np.float64)})
    model = fourbit.load_model(tmp_path / "m.gguf", device="cpu")
    up = model.layers[0].mlp.gate_up_proj.weight[TINY_GGUF["inter"]:]
    assert up.dtype == torch.float32 and torch.equal(up, torch.from_numpy(arrays["blk.0.ffn_up.weight"]).float())
