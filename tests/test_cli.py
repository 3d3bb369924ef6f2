"""The `fourbit` command, run in-process on the embedded model."""

import pytest

import fourbit
from fourbit.cli import main


def test_generate_answers_a_chat_prompt(smollm_path, capsys):
    main(["generate", "--prompt", "What is 2+2? Answer with one number.", "--max-new-tokens", "8", "--device", "cpu"])
    assert "4" in capsys.readouterr().out


def test_eval_prints_a_perplexity(smollm_path, capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog. " * 40))
    main(["eval", "--text", str(text), "--window", "64", "--windows", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.startswith("perplexity ") and "over 2 windows of 64 tokens" in out
    assert 1.0 < float(out.split()[1]) < 20  # a repeated sentence is easy to predict


def test_quantize_writes_a_directory_load_model_reads(smollm_path, tmp_path, capsys):
    main(["quantize", str(smollm_path), str(tmp_path / "q"), "--group-size", "64"])
    model = fourbit.load_model(tmp_path / "q", device="cpu")
    layers = [m for m in model.modules() if isinstance(m, fourbit.Int4Linear)]
    # The GGUF's own Q4_1 layers stay as they are (group 32); only float layers would be re-quantized.
    assert len(layers) == 4 * model.config.num_layers and {m.group_size for m in layers} == {32}
    assert fourbit.load_tokenizer(tmp_path / "q").encode("Hello") == fourbit.load_tokenizer(smollm_path).encode("Hello")


def test_bad_arguments_exit(capsys):
    with pytest.raises(SystemExit):
        main(["generate"])  # --prompt is required
    with pytest.raises(SystemExit):
        main(["nonsense"])
