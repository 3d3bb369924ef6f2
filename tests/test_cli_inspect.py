"""`fourbit inspect` and `fourbit convert`, run in-process on the embedded GGUF and tiny files."""

import json

import pytest
import torch

import fourbit
from fourbit.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    from test_export import tiny_llama_dir
    directory = tiny_llama_dir(tmp_path_factory.mktemp("float"), num_layers=3)
    fourbit.load_tokenizer("smollm2-135m").to_hf(directory)  # `fourbit quantize` writes the source's tokenizer
    return directory


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """Layer 0 all Q4_0 (symmetric: exports exactly); layer 1's q Q4_1 (k and v F32: the fused
    qkv is float), o Q8_0 (read as float: only embeddings and heads load as int8) and down Q4_1
    (a float minimum: int4, not exportable exactly); the embedding Q8_0."""
    from test_loader import write_tiny_gguf
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    types = {f"blk.0.{t}.weight": "Q4_0" for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                   "ffn_up", "ffn_down")}
    types["blk.1.attn_q.weight"] = types["blk.1.ffn_down.weight"] = "Q4_1"
    types["token_embd.weight"] = types["blk.1.attn_output.weight"] = "Q8_0"  # int8 as the embedding, float as o
    write_tiny_gguf(path, types=types)
    return path


def run(capsys, *argv) -> str:
    main(list(argv))
    return capsys.readouterr().out


def same_logits(a, b) -> bool:
    x = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_inspect_embedded_gguf(capsys):
    out = run(capsys, "inspect", "smollm2-135m")
    assert "format: GGUF v3 (llama)" in out and "Q4_1 x210" in out and "Q8_0 x1" in out
    assert "layers 0-29: q,k,v,o,gate,up,down Q4_1 int4 g32 asym\n" in out
    assert "embed Q8_0 (int8 g32); norm F32 (float); lm_head tied to the embedding" in out
    assert "layers 0-29: qkv,o,gate_up,down Int4Linear g32\n" in out
    assert "lm_head Int8Linear g32 (tied: the embedding reads its int8 rows); the embedding int8, the norms float" \
        in out
    assert 'Int4Linear backend "auto" on this machine (cpu, torch.float32)' in out


def test_inspect_gguf_with_mixed_types_says_which_parts_stay_apart(tiny_gguf, capsys):
    out = run(capsys, "inspect", str(tiny_gguf))
    assert "layer 0: q,k,v,o,gate,up,down Q4_0 int4 g32 sym\n" in out
    assert "layer 1: q,down Q4_1 int4 g32 asym; k,v,gate,up F32 (float); o Q8_0 (float)\n" in out
    assert "embed Q8_0 (int8 g32); norm F32 (float)" in out
    assert "layer 1: qkv ConcatLinear(Int4Linear g32, nn.Linear, nn.Linear); o,gate_up nn.Linear; down Int4Linear " \
        "g32\n" in out
    model = fourbit.load_model(tiny_gguf, device="cpu")  # and the loader does what inspect says
    assert [type(p).__name__ for p in model.layers[1].self_attn.qkv_proj.parts] == ["Int4Linear", "Linear", "Linear"]
    assert "layer 0: qkv,o,gate_up,down Int4Linear g32" in out


def test_inspect_float_fourbit_and_compressed_tensors_dirs(float_dir, tmp_path, capsys):
    out = run(capsys, "inspect", str(float_dir))
    assert "format: Hugging Face float checkpoint" in out
    assert "layers 0-2: q,k,v,o,gate,up,down f32 (float)" in out and "layers 0-2: qkv,o,gate_up,down nn.Linear" in out

    run(capsys, "quantize", str(float_dir), str(tmp_path / "fb"), "--group-size", "64", "--symmetric",
        "--skip", "lm_head", "--skip", "layers.2.*")
    out = run(capsys, "inspect", str(tmp_path / "fb"))
    assert "format: fourbit checkpoint, format version 2, 8 int4 layers" in out
    assert "layers 0-1: qkv,o,gate_up,down int4 scales f32 int4 g64 sym" in out
    assert "layer 2: qkv,o,gate_up,down f32 (float)" in out

    out = run(capsys, "convert", str(tmp_path / "fb"), str(tmp_path / "ct"), "--to", "compressed-tensors")
    assert "wrote" in out
    out = run(capsys, "inspect", str(tmp_path / "ct"))
    assert "format: compressed-tensors (pack-quantized)" in out
    assert "group_0: targets ['Linear'], num_bits=4, strategy=group, group_size=64, symmetric=True" in out
    assert "layers 0-1: q,k,v,o,gate,up,down int4 g64 sym" in out and "layers 0-1: qkv,o,gate_up,down Int4Linear g64" \
        in out
    assert "layer 2: q,k,v,o,gate,up,down f32 (float)" in out


def test_convert_round_trips_between_formats(float_dir, tmp_path, capsys):
    run(capsys, "quantize", str(float_dir), str(tmp_path / "fb"), "--group-size", "32", "--symmetric")
    run(capsys, "convert", str(tmp_path / "fb"), str(tmp_path / "ct"), "--to", "compressed-tensors")
    run(capsys, "convert", str(tmp_path / "ct"), str(tmp_path / "fb2"), "--to", "fourbit")
    models = [fourbit.load_model(tmp_path / d, device="cpu") for d in ("fb", "ct", "fb2")]
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"] == ["lm_head"]
    assert same_logits(models[0], models[1]) and same_logits(models[0], models[2])


def test_convert_gguf_q4_0_exactly_and_q4_1_only_with_dense_fallback(tiny_gguf, tmp_path, capsys):
    # Layer 1's q (Q4_1, beside F32 k and v: a ConcatLinear part) and down are int4 with float minima.
    with pytest.raises(SystemExit, match=r"fourbit convert: 2 int4 layers cannot be written.*2 with offsets "
                                         r".*float minimum.*: model.layers.1.self_attn.q_proj \(row 0, group 0.*"
                                         r"model.layers.1.mlp.down_proj \(row 0, group 0"):
        main(["convert", str(tiny_gguf), str(tmp_path / "ct"), "--to", "compressed-tensors"])
    run(capsys, "convert", str(tiny_gguf), str(tmp_path / "ct"), "--to", "compressed-tensors", "--dense-fallback")
    quant = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.mlp.down_proj" in quant["ignore"] and "model.layers.1.self_attn.q_proj" in quant["ignore"]
    source = fourbit.load_model(tiny_gguf, device="cpu")
    exported = fourbit.load_model(tmp_path / "ct", device="cpu")
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):  # Q4_0: exact
        a, b = source.get_submodule(f"layers.0.{name}"), exported.get_submodule(f"layers.0.{name}")
        assert isinstance(b, fourbit.Int4Linear) and torch.equal(a.weight.dequantize(), b.weight.dequantize())
    # layer 1's qkv (q Q4_1 int4, k and v F32, kept apart): exported as float rows, exactly
    q, k, v = source.layers[1].self_attn.qkv_proj.parts
    assert torch.equal(exported.layers[1].self_attn.qkv_proj.weight,
                       torch.cat([q.weight.dequantize(), k.weight, v.weight]))
    # the Q8_0 embedding (int8 in the source) exported as its exact float rows
    assert torch.equal(exported.embed_tokens.weight, source.embed_tokens.weight.dequantize())
    assert torch.equal(exported.layers[1].mlp.down_proj.weight, source.layers[1].mlp.down_proj.weight.dequantize())
    with torch.no_grad():  # layer 1's down_proj: float matmul of the same weights, not the int4 kernel
        x = torch.randint(0, 300, (1, 9))
        torch.testing.assert_close(exported(x), source(x), rtol=1e-5, atol=1e-5)


def test_convert_embedded_gguf_q4_1_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match=r"210 int4 layers cannot be written as compressed-tensors exactly"):
        main(["convert", "smollm2-135m", str(tmp_path / "ct"), "--to", "compressed-tensors"])
    assert not (tmp_path / "ct" / "model.safetensors").exists()


def test_convert_usage_errors(float_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main(["convert", str(float_dir), str(tmp_path / "x"), "--to", "fourbit", "--dense-fallback"])
    assert error.value.code == 2 and "--dense-fallback: applies to --to compressed-tensors only" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        main(["convert", str(float_dir), str(tmp_path / "x"), "--to", "gptq"])
    assert error.value.code == 2
