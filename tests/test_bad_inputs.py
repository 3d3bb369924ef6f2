"""The index of fourbit's promised errors: what each public callable (fourbit.__all__, and the
config reader LlamaConfig.from_hf) refuses, as one table. Each row is a call, the exception
type, and a pattern that names the offending argument (or the file and field), so that a
user is told what to fix, never shown an internal KeyError, ZeroDivisionError or numpy
message.

A promised error that another test file already asserts with the argument's name is tested
there and not repeated here: ELSEWHERE says where. test_every_public_callable_is_indexed keeps
the index whole: a new public callable needs rows here or an entry in ELSEWHERE.
"""

import json
import re
import types
from pathlib import Path

import pytest
import torch

import fourbit
from fourbit import (
    BlockAllocator,
    Int4Linear,
    Int4Weight,
    PagedAttention,
    PagedBatch,
    available_backends,
    int4_linear,
    pack_int4,
    perplexity,
    quantize_weight,
    unpack_int4,
)
from fourbit.models import LlamaConfig

TESTS = Path(__file__).parent


def _weight() -> Int4Weight:
    """A real Int4Weight [16, 64] at group 32, fp32 scales and offsets."""
    return quantize_weight(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)), group_size=32)


W = _weight()


def _layer() -> Int4Linear:
    layer = Int4Linear(64, 16, bias=False, group_size=32)
    layer.load_weight(W)
    return layer


# A model as perplexity sees it before scoring anything: its vocabulary and device.
TINY_MODEL = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=100), device=torch.device("cpu"))
IDS = list(range(64))


def _batch(**changes):
    args = dict(slot_mapping=torch.tensor([0]), block_tables=torch.zeros(1, 1, dtype=torch.int32),
                seq_lens=torch.ones(1, dtype=torch.int32), num_blocks=4, block_size=16)
    return PagedBatch.from_tensors(**{**args, **changes})


# A Hugging Face config.json (SmolLM2-135M's sizes) that from_hf reads; rows change one key.
HF_CONFIG = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
             "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
             "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
             "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def _from_hf(drop=(), **changes):
    return lambda: LlamaConfig.from_hf({**{k: v for k, v in HF_CONFIG.items() if k not in drop}, **changes})


def row(name: str, call, error: type, named: str):
    """One promised error: call() raises `error` with a message matching `named`. The id starts
    with the public name, which test_every_public_callable_is_indexed reads."""
    return pytest.param(call, error, named, id=name)


ROWS = [
    # --- format.py -------------------------------------------------------------------------
    row("pack_int4-dtype", lambda: pack_int4(torch.zeros(4, 16)), TypeError,
        r"pack_int4 expects q to be an integer tensor, got torch.float32"),
    row("pack_int4-shape", lambda: pack_int4(torch.zeros(4, 12, dtype=torch.int32)), ValueError,
        r"pack_int4 expects q as \[N, K\] with K a multiple of 8, got \(4, 12\)"),
    row("pack_int4-values", lambda: pack_int4(torch.full((4, 16), 16)), ValueError,
        r"the values of q must lie in \[0, 15\]"),
    row("pack_int4-not-a-tensor", lambda: pack_int4([[1] * 8]), TypeError, r"q must be a torch.Tensor, got list"),
    row("unpack_int4-dtype", lambda: unpack_int4(torch.zeros(4, 2)), TypeError,
        r"unpack_int4 expects qweight as int32 \[N, K/8\], got torch.float32 \(4, 2\)"),
    row("unpack_int4-shape", lambda: unpack_int4(torch.zeros(4, dtype=torch.int32)), TypeError,
        r"unpack_int4 expects qweight as int32 \[N, K/8\], got torch.int32 \(4,\)"),
    row("Int4Weight-shape-3d", lambda: Int4Weight(W.qweight, W.scales, W.offsets, 32, (16, 64, 1)), ValueError,
        r"shape must be \(N, K\)"),
    row("Int4Weight-shape-zero", lambda: Int4Weight(W.qweight, W.scales, W.offsets, 32, (0, 64)), ValueError,
        r"shape\[0\] must be a positive int"),
    row("Int4Weight-qweight-list", lambda: Int4Weight(W.qweight.tolist(), W.scales, W.offsets, 32, (16, 64)),
        TypeError, r"qweight must be a torch.Tensor, got list"),
    row("Int4Weight-symmetric", lambda: Int4Weight(W.qweight, W.scales, W.offsets, 32, (16, 64), symmetric="yes"),
        TypeError, r"symmetric must be True or False"),
    row("quantize_weight-symmetric", lambda: quantize_weight(torch.randn(16, 64), 32, symmetric="no"), TypeError,
        r"symmetric must be True or False"),
    row("Int4Weight-group_size", lambda: Int4Weight(W.qweight, W.scales, W.offsets, 48, (16, 64)),
        ValueError, r"group_size must be one of .*got 48"),
    row("Int4Weight-scales-dtype", lambda: Int4Weight(W.qweight, W.scales.int(), W.offsets.int(), 32, (16, 64)),
        TypeError, r"scales must be one of .*got torch.int32"),
    row("Int4Weight-offsets-dtype", lambda: Int4Weight(W.qweight, W.scales, W.offsets.long(), 32, (16, 64)),
        TypeError, r"offsets must be one of .*got torch.int64"),
    row("Int4Weight-offsets-device", lambda: Int4Weight(W.qweight, W.scales, W.offsets.to("meta"), 32, (16, 64)),
        ValueError, r"qweight, scales, offsets and perm must be on one device"),
    row("Int4Weight-perm-shape", lambda: Int4Weight(W.qweight, W.scales, W.offsets, 32, (16, 64),
                                                    perm=torch.arange(63)),
        ValueError, r"perm must be an int32 or int64 permutation of the K = 64 input channels"),
    row("Int4Weight-perm-repeats", lambda: Int4Weight(W.qweight, W.scales, W.offsets, 32, (16, 64),
                                                      perm=torch.zeros(64, dtype=torch.int64)),
        ValueError, r"perm must hold each of the K = 64 input channels exactly once"),
    # --- quantize.py ------------------------------------------------------------------------
    row("quantize_weight-w-1d", lambda: quantize_weight(torch.randn(64)), ValueError,
        r"w must be a non-empty \[N, K\] matrix, got shape \(64,\)"),
    row("quantize_weight-w-int", lambda: quantize_weight(torch.ones(4, 64, dtype=torch.int32)), TypeError,
        r"w must be a tensor of dtype .*got torch.int32"),
    row("quantize_weight-w-list", lambda: quantize_weight([[1.0] * 64]), TypeError,
        r"w must be a tensor of dtype .*got list"),
    row("quantize_weight-dtype", lambda: quantize_weight(torch.randn(4, 64), dtype=torch.int8), TypeError,
        r"dtype must be one of .*got torch.int8"),
    # --- nn.py ------------------------------------------------------------------------------
    row("Int4Linear-dtype", lambda: Int4Linear(64, 16, dtype=torch.int8), TypeError,
        r"dtype must be one of .*got torch.int8"),
    row("Int4Linear-load_weight-weight", lambda: Int4Linear(64, 8, bias=False, group_size=32).load_weight(W),
        ValueError, r"weight Int4Weight\(shape=\(16, 64\).* does not fit Int4Linear\(64, 8"),
    row("Int4Linear-forward-x-dtype", lambda: _layer()(torch.ones(2, 64, dtype=torch.int32)), TypeError,
        r"x must be float32, bfloat16 or float16, got torch.int32"),
    row("PagedAttention-num_kv_heads", lambda: PagedAttention(8, 3, 64), ValueError,
        r"num_heads \(8\) must be a multiple of num_kv_heads \(3\)"),
    row("PagedAttention-backend", lambda: PagedAttention(8, 2, 64, backend="tpu"), ValueError,
        r"unknown backend 'tpu'"),
    # --- ops.py -----------------------------------------------------------------------------
    row("int4_linear-x-dtype", lambda: int4_linear(torch.ones(2, 64, dtype=torch.int32), W), TypeError,
        r"x must be float32, bfloat16 or float16, got torch.int32"),
    row("int4_linear-x-list", lambda: int4_linear([[1.0] * 64], W), TypeError, r"x must be a torch.Tensor, got list"),
    row("int4_linear-x-features", lambda: int4_linear(torch.ones(2, 63), W), ValueError,
        r"x must have K = 64 features in its last dimension, got shape \(2, 63\)"),
    row("int4_linear-weight", lambda: int4_linear(torch.ones(2, 64), torch.zeros(16, 64)), TypeError,
        r"weight must be a fourbit.Int4Weight, got Tensor"),
    row("int4_linear-bias-dtype", lambda: int4_linear(torch.ones(2, 64), W, torch.zeros(16, dtype=torch.int64)),
        TypeError, r"bias must be a float tensor, got torch.int64"),
    row("int4_linear-bias-device", lambda: int4_linear(torch.ones(2, 64), W, torch.zeros(16, device="meta")),
        ValueError, r"bias is on meta but the int4 weight is on cpu"),
    row("available_backends-op", lambda: available_backends("cpu", op="matmul"), ValueError, r"unknown op 'matmul'"),
    # --- kv_cache.py ------------------------------------------------------------------------
    row("BlockAllocator-num_blocks-0", lambda: BlockAllocator(0), ValueError, r"num_blocks must be a positive int"),
    row("BlockAllocator-num_blocks-str", lambda: BlockAllocator("4"), ValueError,
        r"num_blocks must be a positive int, got '4'"),
    row("PagedBatch-num_blocks", lambda: _batch(num_blocks=0), ValueError, r"num_blocks must be a positive int"),
    row("PagedBatch-block_size", lambda: _batch(block_size=12), ValueError,
        r"block_size must be a power of two >= 8, got 12"),
    # --- evaluate.py ------------------------------------------------------------------------
    row("perplexity-window-0", lambda: perplexity(TINY_MODEL, IDS, 0), ValueError, r"window must be at least 2, got 0"),
    row("perplexity-window-1", lambda: perplexity(TINY_MODEL, IDS, 1), ValueError, r"window must be at least 2, got 1"),
    row("perplexity-window-float", lambda: perplexity(TINY_MODEL, IDS, 8.0), TypeError,
        r"window must be an int, got 8.0"),
    row("perplexity-max_windows-0", lambda: perplexity(TINY_MODEL, IDS, 8, 0), ValueError,
        r"max_windows must be at least 1, got 0"),
    row("perplexity-batch_size-0", lambda: perplexity(TINY_MODEL, IDS, 8, batch_size=0), ValueError,
        r"batch_size must be at least 1, got 0"),
    row("perplexity-token_ids-2d", lambda: perplexity(TINY_MODEL, torch.zeros(2, 64, dtype=torch.long), 8),
        ValueError, r"token_ids must be one sequence \(1-D\), got shape \(2, 64\)"),
    row("perplexity-token_ids-float", lambda: perplexity(TINY_MODEL, torch.zeros(64), 8), TypeError,
        r"token_ids must be integer token ids, got dtype torch.float32"),
    row("perplexity-token_ids-text", lambda: perplexity(TINY_MODEL, ["a"] * 64, 8), TypeError,
        r"token_ids must be a list of token ids"),
    row("perplexity-token_ids-vocab", lambda: perplexity(TINY_MODEL, [*IDS[:-1], 100], 8), ValueError,
        r"token_ids holds 100, outside the model's vocabulary \(ids 0 .. 99\)"),
    row("perplexity-token_ids-negative", lambda: perplexity(TINY_MODEL, [-1, *IDS[1:]], 8), ValueError,
        r"token_ids holds -1"),
    row("perplexity-token_ids-short", lambda: perplexity(TINY_MODEL, IDS[:3], 8), ValueError,
        r"token_ids has 3 tokens: fewer than one window of 8"),
    # --- models: config.json (LlamaConfig.from_hf) -------------------------------------------
    row("LlamaConfig.from_hf-not-an-object", lambda: LlamaConfig.from_hf([HF_CONFIG]), ValueError,
        r"config.json must hold a JSON object \(a dict\), got list"),
    row("LlamaConfig.from_hf-missing", _from_hf(drop=("num_attention_heads", "vocab_size")), ValueError,
        r"config.json: required key\(s\) \['vocab_size', 'num_attention_heads'\] missing"),
    row("LlamaConfig.from_hf-null", _from_hf(hidden_size=None), ValueError, r"\['hidden_size'\] missing \(or null\)"),
    row("LlamaConfig.from_hf-hidden_size-str", _from_hf(hidden_size="576"), ValueError,
        r"hidden_size is '576': expected a positive integer"),
    row("LlamaConfig.from_hf-num_hidden_layers-0", _from_hf(num_hidden_layers=0), ValueError,
        r"num_hidden_layers is 0: expected a positive integer"),
    row("LlamaConfig.from_hf-num_attention_heads-0", _from_hf(num_attention_heads=0), ValueError,
        r"num_attention_heads is 0: expected a positive integer"),
    row("LlamaConfig.from_hf-num_key_value_heads-0", _from_hf(num_key_value_heads=0), ValueError,
        r"num_key_value_heads is 0: expected a positive integer"),
    row("LlamaConfig.from_hf-num_key_value_heads-divides", _from_hf(num_key_value_heads=4), ValueError,
        r"num_attention_heads \(9\) must be a multiple of num_key_value_heads \(4\)"),
    row("LlamaConfig.from_hf-intermediate_size-float", _from_hf(intermediate_size=1536.0), ValueError,
        r"intermediate_size is 1536.0: expected a positive integer"),
    row("LlamaConfig.from_hf-vocab_size-bool", _from_hf(vocab_size=True), ValueError,
        r"vocab_size is True: expected a positive integer"),
    row("LlamaConfig.from_hf-head_dim-odd", _from_hf(head_dim=63), ValueError,
        r"head_dim \(63\) must be a positive even number"),
    row("LlamaConfig.from_hf-head_dim-derived-0", _from_hf(hidden_size=4), ValueError,
        r"head_dim \(0 = hidden_size // num_attention_heads\)"),
    row("LlamaConfig.from_hf-rms_norm_eps", _from_hf(rms_norm_eps="1e-5"), ValueError,
        r"rms_norm_eps is '1e-5': expected a positive number"),
    row("LlamaConfig.from_hf-rope_theta", _from_hf(rope_theta=-1.0), ValueError,
        r"rope_theta is -1.0: expected a positive number"),
    row("LlamaConfig.from_hf-rope_parameters-theta", _from_hf(drop=("rope_theta",), rope_parameters={
        "rope_type": "default", "rope_theta": "1e4"}), ValueError, r"rope_parameters.rope_theta is '1e4'"),
    row("LlamaConfig.from_hf-rope_parameters-type", _from_hf(rope_parameters="default"), ValueError,
        r"rope_parameters is 'default': expected an object"),
    row("LlamaConfig.from_hf-tie_word_embeddings", _from_hf(tie_word_embeddings="true"), ValueError,
        r"tie_word_embeddings is 'true': expected true or false"),
    row("LlamaConfig.from_hf-bos_token_id", _from_hf(bos_token_id=-1), ValueError,
        r"bos_token_id is -1: expected a token id"),
    row("LlamaConfig.from_hf-eos_token_id", _from_hf(eos_token_id=[2, "</s>"]), ValueError,
        r"eos_token_id is \[2, '</s>'\]: expected a token id, a list of token ids, or null"),
    row("LlamaConfig.from_hf-sliding_window", _from_hf(sliding_window="4096"), ValueError,
        r"sliding_window is '4096': expected a positive integer or null"),
    row("LlamaConfig.from_hf-hidden_act", _from_hf(hidden_act="gelu"), ValueError,
        r"hidden_act 'gelu' is not supported"),
    row("LlamaConfig.from_hf-rope_scaling-type", _from_hf(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
        ValueError, r"rope_scaling: rope_type 'yarn' is not supported \(default, linear, llama3\)"),
    row("LlamaConfig.from_hf-rope_scaling-missing", _from_hf(rope_scaling={**LLAMA3_SCALING, "low_freq_factor": None}),
        ValueError, r"rope_scaling: low_freq_factor is None: llama3 scaling needs a positive number"),
    row("LlamaConfig.from_hf-rope_scaling-factor", _from_hf(rope_scaling={"type": "linear", "factor": 0}), ValueError,
        r"rope_scaling: factor is 0: linear scaling needs a positive number"),
    row("LlamaConfig.from_hf-rope_scaling-bands", _from_hf(rope_scaling={**LLAMA3_SCALING, "high_freq_factor": 1.0}),
        ValueError, r"rope_scaling: high_freq_factor \(1.0\) must be greater than low_freq_factor \(1.0\)"),
    row("LlamaConfig.from_hf-rope_scaling-list", _from_hf(rope_scaling=[8.0]), ValueError,
        r"rope_scaling is \[8.0\]: expected an object"),
    row("LlamaConfig.from_hf-rope_parameters-scaling",
        _from_hf(rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
        ValueError, r"rope_parameters: rope_type 'dynamic' is not supported"),
    # --- modules, the cache and the entry points that take a model ------------------------
    row("Int4Linear-in_features-zero", lambda: Int4Linear(0, 16), ValueError, r"in_features must be a positive int"),
    row("Int4Linear-out_features-negative", lambda: Int4Linear(64, -1), ValueError,
        r"out_features must be a positive int"),
    row("Int4Linear-in_features-float", lambda: Int4Linear(64.0, 16), TypeError, r"in_features must be a positive int"),
    row("Int4Linear-load_weight-tensor", lambda: _layer().load_weight(torch.zeros(16, 64)), TypeError,
        r"weight must be a fourbit.Int4Weight"),
    row("PagedAttention-num_kv_heads-zero", lambda: PagedAttention(8, 0, 64), ValueError,
        r"num_kv_heads must be a positive int"),
    row("PagedAttention-head_dim-zero", lambda: PagedAttention(8, 2, 0), ValueError,
        r"head_dim must be a positive int"),
    row("PagedBatch-block_tables-list", lambda: PagedBatch.from_tensors(
        slot_mapping=torch.tensor([0]), block_tables=[[0]], seq_lens=torch.ones(1, dtype=torch.int32), num_blocks=4,
        block_size=16), TypeError, r"block_tables must be a torch.Tensor, got list"),
    row("BlockAllocator-allocate-str", lambda: BlockAllocator(4).allocate("1"), TypeError, r"n \(blocks to allocate\)"),
    row("BlockAllocator-allocate-negative", lambda: BlockAllocator(4).allocate(-1), ValueError,
        r"n \(blocks to allocate\) must not be negative"),
    row("PagedKVCache-add_sequence-text", lambda: fourbit.PagedKVCache(1, 4, 16, 1, 8).add_sequence("a", "hello"),
        TypeError, r"tokens must be token ids"),
    row("PagedKVCache-layer-out-of-range", lambda: fourbit.PagedKVCache(2, 4, 16, 1, 8).layer(3), ValueError,
        r"layer must be an int in \[0, num_layers = 2\)"),
    row("quantize_-not-a-model", lambda: fourbit.quantize_(3), TypeError, r"quantize_ takes a model"),
    row("tune-not-a-model", lambda: fourbit.tune(3), TypeError, r"model must be a torch.nn.Module"),
    row("save_quantized-not-a-model", lambda: fourbit.save_quantized(3, "/nonexistent/x.safetensors"), TypeError,
        r"model must be a torch.nn.Module"),
    row("save_model-not-a-llama", lambda: fourbit.save_model(torch.nn.Linear(2, 2), "/nonexistent/dir"), TypeError,
        r"model must be a fourbit Llama"),
    row("available_backends-device", lambda: available_backends("tpu"), ValueError,
        r"device 'tpu' is not a torch device"),
]


@pytest.mark.parametrize("call, error, named", ROWS)
def test_promised_error(call, error, named):
    with pytest.raises(error) as raised:
        call()
    assert type(raised.value) is error, f"{type(raised.value).__name__}: {raised.value}"
    assert re.search(named, str(raised.value)), str(raised.value)


def test_from_hf_accepts_what_it_promises():
    """The checks refuse only what they should: the base config, transformers' own configs,
    rope scalings that rope_inv_freq applies, eos lists and numpy-free ints all read."""
    transformers = pytest.importorskip("transformers")
    config = LlamaConfig.from_hf(HF_CONFIG)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    scaled = LlamaConfig.from_hf({**HF_CONFIG, "eos_token_id": [2, 3], "rope_scaling": LLAMA3_SCALING})
    assert scaled.eos_token_id == [2, 3] and scaled.rope_scaling == LLAMA3_SCALING
    for made in (transformers.LlamaConfig(), transformers.Qwen2Config(),
                 transformers.MistralConfig(sliding_window=None),
                 transformers.LlamaConfig(rope_scaling=LLAMA3_SCALING, max_position_embeddings=131072)):
        ours = LlamaConfig.from_hf(made.to_dict())
        assert (ours.hidden_size, ours.num_heads, ours.num_kv_heads) == (
            made.hidden_size, made.num_attention_heads, made.num_key_value_heads)


@pytest.mark.parametrize("text, named", [
    ('{"vocab_size": 10,', r"is not valid JSON: Expecting"),
    ("[1, 2]", r"must hold a JSON object \(a dict\), got list"),
    (json.dumps({**HF_CONFIG, "num_attention_heads": "9"}),
     r": num_attention_heads is '9': expected a positive integer"),
    (json.dumps({k: v for k, v in HF_CONFIG.items() if k != "intermediate_size"}),
     r": required key\(s\) \['intermediate_size'\] missing"),
], ids=["invalid-json", "not-an-object", "wrong-type", "missing-key"])
def test_from_hf_file_errors_name_the_file(tmp_path, text, named):
    """From a path, every error starts with the file (a JSONDecodeError never escapes)."""
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError) as raised:
        LlamaConfig.from_hf(path)
    assert str(raised.value).startswith(str(path)) and re.search(named, str(raised.value)), str(raised.value)


def test_from_hf_reads_a_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF_CONFIG))
    assert LlamaConfig.from_hf(path) == LlamaConfig.from_hf(str(path)) == LlamaConfig.from_hf(HF_CONFIG)


# Public callables whose promised errors are asserted, with the argument named, in another
# test file ({file: [test functions]}), or that promise none (None).
ELSEWHERE = {
    "GROUP_SIZES": None,  # a constant
    "OutOfBlocks": None,  # an exception class
    "choose_backend": None,  # decisions over any (device, dtype, shape): nothing to refuse
    "choose_attention_backend": None,
    "Int4WeightOnlyConfig": {"test_quantize.py": ["test_config_rejects_impossible_values_naming_them",
                                                  "test_config_from_dict_names_unknown_keys_and_suggests_the_field"]},
    "quantize_": {"test_nn.py": ["test_quantize_errors_name_the_problem"]},
    "write_kv": {"test_attention.py": ["test_op_errors_name_the_problem"]},
    "paged_attention": {"test_attention.py": ["test_op_errors_name_the_problem"]},
    "paged_prefill_attention": {"test_attention.py": ["test_op_errors_name_the_problem"]},
    "PagedKVCache": {"test_kv_cache.py": ["test_cache_rejects_bad_sizes", "test_cache_rejects_bad_dtype",
                                          "test_unknown_sequence_is_a_key_error_naming_it",
                                          "test_existing_sequence_id_is_a_value_error"]},
    "generate": {"test_generate.py": ["test_a_bad_argument_raises_naming_it",
                                      "test_a_prompt_must_fit_the_models_context"]},
    "load_model": {"test_loader.py": ["test_load_errors_name_the_problem",
                                      "test_quantize_option_errors_name_the_problem",
                                      "test_load_model_rejects_a_dtype_that_is_not_a_compute_dtype"]},
    "save_model": {"test_checkpoint.py": ["test_save_model_never_leaves_a_half_written_config"]},
    "load_tokenizer": {"test_tokenizer.py": ["test_load_tokenizer_names_a_bad_source"]},
    "save_quantized": {"test_checkpoint.py": ["test_missing_file_and_bad_path", "test_a_bad_shard_size_raises"]},
    **{name: {"test_int8.py": ["test_bad_inputs_raise_clear_errors"]}
       for name in ("Int8Embedding", "Int8Linear", "Int8Weight", "int8_linear", "quantize_int8_weight")},
    "load_quantized": {"test_checkpoint.py": ["test_bad_checkpoints_raise_and_leave_the_model_untouched",
                                              "test_wrong_shape_raises",
                                              "test_wrong_int4_dtypes_raise_naming_the_tensor"]},
}


def test_every_public_callable_is_indexed():
    """Each name in fourbit.__all__ has rows in ROWS or an entry in ELSEWHERE, and every test
    function ELSEWHERE points to exists."""
    in_table = {param.id.split("-")[0].split(".")[0] for param in ROWS}
    missing = [name for name in fourbit.__all__ if name not in in_table and name not in ELSEWHERE]
    assert not missing, f"public names with no promised errors indexed: {missing}"
    assert set(ELSEWHERE) <= set(fourbit.__all__), set(ELSEWHERE) - set(fourbit.__all__)
    for files in filter(None, ELSEWHERE.values()):
        for file, functions in files.items():
            text = (TESTS / file).read_text()
            assert all(f"def {function}(" in text for function in functions), (file, functions)
