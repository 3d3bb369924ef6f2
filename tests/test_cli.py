"""The `fourbit` command, run in-process on the embedded model."""

import math
import re

import pytest
import torch

import fourbit
from fourbit.cli import main


def test_generate_answers_a_chat_prompt(smollm, smollm_path, capsys):
    """The command prints the library's greedy continuation of the prompt wrapped in the chat
    template, stopped at the end-of-turn token. Breaking the template, the stop tokens, the
    decoding or the model the command loads changes the text."""
    question = "What is 2+2? Answer with one number."
    main(["generate", "--prompt", question, "--max-new-tokens", "8", "--device", "cpu"])
    out = capsys.readouterr().out
    tokenizer = fourbit.load_tokenizer(smollm_path)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]))
    stops = [t for t in (tokenizer.token_id("<|im_end|>"), tokenizer.eos_token_id) if t is not None]
    expected = fourbit.generate(smollm, [prompt], 8, stop_tokens=stops)[0]
    assert out == tokenizer.decode(expected) + "\n"
    assert "4" in out


def test_eval_prints_a_perplexity(smollm, smollm_path, capsys, tmp_path):
    """The printed perplexity is fourbit.perplexity of the model on the file's tokens over the
    windows asked for: a wrong text, window, window count or model changes the number."""
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    main(["eval", "--text", str(text), "--window", "64", "--windows", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.startswith("perplexity ") and "over 2 windows of 64 tokens" in out
    printed = float(out.split()[1])
    assert math.isfinite(printed) and 1.0 < printed < 20  # a repeated sentence is easy to predict
    ids = fourbit.load_tokenizer(smollm_path).encode(text.read_text())
    assert out.split()[1] == f"{fourbit.perplexity(smollm, ids, 64, 2, progress=False):.4f}"


def test_quantize_writes_a_directory_load_model_reads(smollm, smollm_path, tmp_path, capsys):
    """A GGUF's int4 layers pass through unchanged (no second rounding), and the directory
    carries the source's tokenizer."""
    main(["quantize", str(smollm_path), str(tmp_path / "q")])
    model = fourbit.load_model(tmp_path / "q", device="cpu")
    layers = _int4(model)
    # The GGUF's own Q4_1 layers stay as they are (group 32); only float layers would be quantized.
    assert len(layers) == 4 * model.config.num_layers and {m.group_size for m in layers.values()} == {32}
    source = _int4(smollm)
    assert all(torch.equal(m.qweight, source[n].qweight) for n, m in layers.items())
    assert fourbit.load_tokenizer(tmp_path / "q").encode("Hello") == fourbit.load_tokenizer(smollm_path).encode("Hello")


@pytest.mark.parametrize("argv, named", [
    (["--group-size", "64"], r"argument --group-size: .* already has int4 layers: 120 at group 32 with offsets "
                             r"\(layers.0.self_attn.qkv_proj, ...\).*group 64"),
    (["--group-size", "32", "--symmetric"], r"argument --symmetric: .* 120 at group 32 with offsets.*symmetric"),
], ids=["group-size-64", "symmetric"])
def test_quantize_refuses_to_requantize_int4_layers(smollm_path, tmp_path, capsys, argv, named):
    """The flags ask for something the GGUF's Q4_1 layers are not, and fourbit does not round
    them a second time: a usage error naming the flag, the layers and their group size, and
    nothing written (before, the command exited 0 having kept them at group 32)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(smollm_path), str(tmp_path / "q"), *argv])
    assert exit_info.value.code == 2
    assert re.search(named, capsys.readouterr().err)
    assert not (tmp_path / "q").exists()


def test_eval_refuses_a_group_size_the_int4_layers_do_not_have(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--group-size", "128", "--windows", "1", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert re.search(r"argument --group-size: smollm2-135m already has int4 layers: 120 at group 32",
                     capsys.readouterr().err)


def float_model_directory(directory, tokenizer):
    """A tiny float Llama as a Hugging Face directory (transformers writes it), with a tokenizer."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.to_hf(directory)
    return directory


def _int4(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, fourbit.Int4Linear)}


def test_quantize_flags_map_to_the_config(smollm_path, tmp_path, capsys):
    """On float layers, --group-size, --symmetric and --skip reach the quantizer: the written
    layers are the ones load_model(quantize=Int4WeightOnlyConfig(...)) makes with the same
    values, bit for bit. A flag dropped or mapped to the wrong field changes the layers."""
    src = float_model_directory(tmp_path / "float", fourbit.load_tokenizer(smollm_path))
    main(["quantize", str(src), str(tmp_path / "q"), "--group-size", "64", "--symmetric",
          "--skip", "lm_head", "--skip", "*down_proj"])
    written = fourbit.load_model(tmp_path / "q", device="cpu")
    expected = fourbit.load_model(src, device="cpu", quantize=fourbit.Int4WeightOnlyConfig(
        group_size=64, symmetric=True, skip=("lm_head", "*down_proj")))
    layers = _int4(written)
    assert set(layers) == {f"layers.{i}.{p}" for i in range(2)
                           for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj")}
    assert {(m.group_size, m.symmetric) for m in layers.values()} == {(64, True)}
    ours, theirs = written.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    main(["quantize", str(src), str(tmp_path / "q2")])  # the defaults: group 128, offsets, lm_head float
    layers = _int4(fourbit.load_model(tmp_path / "q2", device="cpu"))
    assert len(layers) == 4 * 2 and "lm_head" not in layers
    assert {(m.group_size, m.symmetric) for m in layers.values()} == {(128, False)}


def test_bad_arguments_exit(capsys):
    with pytest.raises(SystemExit):
        main(["generate"])  # --prompt is required
    with pytest.raises(SystemExit):
        main(["nonsense"])


@pytest.mark.parametrize("argv, named", [
    (["quantize", "src", "out", "--group-size", "100"], "argument --group-size: .*got 100"),
    (["eval", "--group-size", "48"], "argument --group-size: .*got 48"),
    (["eval", "--backend", "tpu"], "argument --backend: invalid choice: 'tpu'"),
    (["generate", "--prompt", "x", "--symmetric"], "argument --symmetric: .*give --group-size"),
    (["eval", "--skip", "lm_head"], "argument --skip: .*give --group-size"),
    (["quantize", "src", "out", "--group-size", "48"], "argument --group-size: .*got 48"),
    (["eval", "--window", "0"], r"argument --window: must be at least 2 .*got 0"),
    (["eval", "--window", "1"], r"argument --window: must be at least 2 .*got 1"),
    (["eval", "--windows", "0"], r"argument --windows: must be at least 1, got 0"),
    (["eval", "--windows", "x"], r"argument --windows: expected an integer, got 'x'"),
    (["demo", "--windows", "0"], r"argument --windows: must be at least 1, got 0"),
    (["generate", "--prompt", "x", "--max-new-tokens", "-1"], r"argument --max-new-tokens: must be at least 0"),
    (["generate", "--prompt", "x", "--top-k", "-1"], r"argument --top-k: must be at least 0"),
    (["generate", "--prompt", "x", "--top-p", "1.5"], r"argument --top-p: must be in \(0, 1\], got 1.5"),
    (["generate", "--prompt", "x", "--top-p", "0"], r"argument --top-p: must be in \(0, 1\], got 0"),
    (["generate", "--prompt", "x", "--temperature", "nan"], r"argument --temperature: must be a number >= 0, got nan"),
], ids=["group-size", "eval-group-size", "backend", "symmetric-alone", "skip-alone", "quantize-group-size-48",
        "window-0", "window-1", "windows-0", "windows-not-a-number", "demo-windows-0", "max-new-tokens-negative",
        "top-k-negative", "top-p-above-1", "top-p-0", "temperature-nan"])
def test_bad_flags_are_usage_errors_naming_them(argv, named, capsys):
    """Checked before anything loads: exit status 2 and the flag and value in the message
    (never a ZeroDivisionError from --window 0, or "fewer than one window" for --windows 0)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert re.search(named, capsys.readouterr().err)
