"""Byte-level BPE tokenization (the GPT-2 family: SmolLM2, Llama 3, Qwen2, GPT-2), in plain Python.

encode: split the text on special-token strings (longest first); cut each piece between them
into pre-tokens with the vocabulary's pre-tokenizer (a regex in Hugging Face and llama.cpp,
a hand-written scanner here: Python's `re` has no \\p{L} or \\p{N}); map each pre-token's
UTF-8 bytes to printable characters (GPT-2's bytes_to_unicode); apply the BPE merges, lowest
rank first. decode: token strings back to bytes (special tokens as their text), then UTF-8.

Vocabularies come from a GGUF file (tokenizer.ggml.*) or a Hugging Face tokenizer.json, and
go back out as a tokenizer.json.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
import warnings
from pathlib import Path

from .gguf_file import read_gguf_metadata

SMOLLM_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (printable Latin-1 maps to itself)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
_LATIN1_TO_CHARS = str.maketrans({chr(b): c for b, c in _BYTE_TO_CHAR.items()})


def _byte_chars(text: str) -> str:
    return text.encode().decode("latin-1").translate(_LATIN1_TO_CHARS)


def _token_bytes(token: str) -> bytes:
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError:  # not byte-level (an added token): its literal text
        return token.encode()


# ---------------------------------------------------------------------------------------------
# Pre-tokenizers. Each reproduces a regex with leftmost-first alternation and greedy quantifiers:
# at position i, try the alternatives in order; the first that matches gives the pre-token.
# Characters are classified once: "L" letter (\p{L}), "N" number (\p{N}), "\n" for \r and \n,
# " " any other whitespace (\s: Unicode White_Space, which is str.isspace() without the
# separators \x1c-\x1f), "P" everything else ([^\s\p{L}\p{N}]).

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")


@functools.lru_cache(maxsize=1 << 16)
def _kind(ch: str) -> str:
    if ch in "\r\n":
        return "\n"
    if ch.isspace() and ch not in "\x1c\x1d\x1e\x1f":
        return " "
    category = unicodedata.category(ch)[0]
    return category if category in "LN" else "P"


def _run_end(kinds: str, i: int, accept: str) -> int:
    """End of the run of characters whose kind is in `accept`, starting at i."""
    while i < len(kinds) and kinds[i] in accept:
        i += 1
    return i


def _contraction(text: str, i: int, ignore_case: bool) -> int:
    """'s|'t|'re|'ve|'m|'ll|'d at i: the end of the match, or 0."""
    if text[i] != "'":
        return 0
    for suffix in ("s", "t", "re", "ve", "m", "ll", "d"):
        candidate = text[i + 1:i + 1 + len(suffix)]
        if len(candidate) == len(suffix) and all(
                (c.casefold() if ignore_case else c) == s for c, s in zip(candidate, suffix)):
            return i + 1 + len(suffix)
    return 0


def _space_then_run(text: str, kinds: str, i: int, kind: str) -> int:
    """ ?K+ for the character kind K: the end of the match, or 0."""
    start = i + 1 if text[i] == " " and kinds[i + 1:i + 2] == kind else i
    return _run_end(kinds, start, kind) if kinds[start:start + 1] == kind else 0


def _whitespace(kinds: str, i: int) -> int:
    """\\s+(?!\\S)|\\s+ at a whitespace character: a run before a non-space keeps its last
    character for the next pre-token (so " world" keeps its space), unless that is all of it."""
    end = _run_end(kinds, i, " \n")
    return end if end == len(kinds) or end - 1 == i else end - 1


def _gpt2_split(text: str) -> list[str]:
    kinds = "".join(map(_kind, text))
    pieces, i = [], 0
    while i < len(text):
        end = (_contraction(text, i, ignore_case=False) or _space_then_run(text, kinds, i, "L")
               or _space_then_run(text, kinds, i, "N") or _space_then_run(text, kinds, i, "P")
               or _whitespace(kinds, i))
        pieces.append(text[i:end])
        i = end
    return pieces


def _smollm_split(text: str) -> list[str]:
    """Every \\p{N} character on its own (HF's Digits(individual_digits=True)), then GPT-2."""
    pieces, start = [], 0
    for i, ch in enumerate(text):
        if _kind(ch) == "N":
            pieces += [*_gpt2_split(text[start:i]), ch]
            start = i + 1
    return pieces + _gpt2_split(text[start:])


def _llama3_split(text: str, max_digits: int = 3) -> list[str]:
    kinds = "".join(map(_kind, text))
    pieces, i = [], 0
    while i < len(text):
        k = kinds[i]
        end = _contraction(text, i, ignore_case=True)
        if not end and (k == "L" or (k in " P" and kinds[i + 1:i + 2] == "L")):  # [^\r\n\p{L}\p{N}]?\p{L}+
            end = _run_end(kinds, i + (k != "L"), "L")
        if not end and k == "N":                                                 # \p{N}{1,max_digits}
            end = min(_run_end(kinds, i, "N"), i + max_digits)
        if not end and (k == "P" or (text[i] == " " and kinds[i + 1:i + 2] == "P")):  # ?[^\s\p{L}\p{N}]+[\r\n]*
            end = _run_end(kinds, _run_end(kinds, i + (k != "P"), "P"), "\n")
        if not end:                        # \s*[\r\n]+ : up to the last newline of the whitespace run
            last_newline = kinds.rfind("\n", i, _run_end(kinds, i, " \n"))
            end = last_newline + 1 if last_newline >= 0 else _whitespace(kinds, i)
        pieces.append(text[i:end])
        i = end
    return pieces


PRE_TOKENIZERS = {
    "gpt2": _gpt2_split,
    "smollm": _smollm_split,
    "llama-bpe": _llama3_split,
    "qwen2": functools.partial(_llama3_split, max_digits=1),
}
# Other tokenizer.ggml.pre names that llama.cpp splits with the same expressions.
_PRE_TOKENIZER_ALIASES = {
    "gpt-2": "gpt2", "starcoder": "smollm", "refact": "smollm", "codeshell": "smollm",
    "llama3": "llama-bpe", "llama-v3": "llama-bpe", "falcon3": "llama-bpe", "pixtral": "llama-bpe",
    "deepseek-r1-qwen": "qwen2", "megrez": "qwen2",
}


# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Byte-level BPE (GPT-2 family): SmolLM2, Llama-3, Qwen2 and GPT-2 vocabularies.

    tokens: the vocabulary, token id -> token string (byte-level characters; special tokens
    as their text). merges: "a b" strings, highest priority first. special_tokens: strings
    matched literally in the input ({text: id}, or a list of strings from `tokens`).
    pre_tokenizer: a name from PRE_TOKENIZERS (or a llama.cpp alias of one); unknown names
    warn and use "gpt2". ignore_merges (default: True for "llama-bpe", as in Llama 3's
    tokenizer.json and llama.cpp): a pre-token that is itself in the vocabulary is one token.
    nfc: apply Unicode NFC to the input first (Qwen2's tokenizer.json does).
    """

    def __init__(self, tokens: list[str], merges: list[str], special_tokens: dict[str, int] | list[str],
                 pre_tokenizer: str = "gpt2", bos_token_id: int | None = None, eos_token_id: int | None = None,
                 add_bos: bool = False, *, chat_template: str | None = None, ignore_merges: bool | None = None,
                 nfc: bool = False):
        self.tokens = list(tokens)
        self.merges = list(merges)
        self._ids = {token: i for i, token in reversed(list(enumerate(self.tokens)))}  # first id wins
        if not isinstance(special_tokens, dict):
            special_tokens = {text: self._ids[text] for text in special_tokens}
        self.special_tokens = dict(special_tokens)
        self._ids.update(self.special_tokens)
        self._special_ids = set(self.special_tokens.values())
        self._special_split = re.compile("(" + "|".join(
            map(re.escape, sorted(self.special_tokens, key=len, reverse=True))) + ")") if self.special_tokens else None
        name = _PRE_TOKENIZER_ALIASES.get(pre_tokenizer, pre_tokenizer)
        if name not in PRE_TOKENIZERS:
            warnings.warn(f"unknown pre-tokenizer {pre_tokenizer!r}; splitting text as GPT-2 does", stacklevel=2)
            name = "gpt2"
        self.pre_tokenizer = name
        self._split = PRE_TOKENIZERS[name]
        self.ignore_merges = name == "llama-bpe" if ignore_merges is None else ignore_merges
        self.nfc = nfc
        self.bos_token_id, self.eos_token_id, self.add_bos = bos_token_id, eos_token_id, add_bos
        self.chat_template = chat_template
        self._ranks = {tuple(merge.split(" ")): rank for rank, merge in enumerate(self.merges)}
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_id(self, text: str) -> int | None:
        """The id of a token given as its exact string (e.g. "<|im_end|>"), or None."""
        return self._ids.get(text)

    # --- encoding ---------------------------------------------------------------------------

    def _bpe(self, piece: str) -> list[int]:
        """Token ids of one pre-token (its byte-level characters), merging the best-ranked pair first."""
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        if self.ignore_merges and piece in self._ids:
            word = [piece]
        else:
            word = list(piece)
            while len(word) > 1:
                pair = min(zip(word, word[1:]), key=lambda p: self._ranks.get(p, len(self._ranks)))
                if pair not in self._ranks:
                    break
                merged, i = [], 0
                while i < len(word):  # every occurrence, left to right
                    if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                        merged.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                word = merged
        ids = self._cache[piece] = [self._ids[token] for token in word]
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids. Prepends the BOS
        token when add_bos is set."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        ids = [self.bos_token_id] if self.add_bos and self.bos_token_id is not None else []
        parts = self._special_split.split(text) if self._special_split else [text]
        for n, part in enumerate(parts):  # odd positions hold the special tokens
            if n % 2:
                ids.append(self.special_tokens[part])
            else:
                for piece in self._split(part):
                    ids += self._bpe(_byte_chars(piece))
        return ids

    def decode(self, ids) -> str:
        """Text of token ids (a list or a 1-D tensor); bytes that are not valid UTF-8 become U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        out = bytearray()
        for i in ids:
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(self.tokens)})")
            token = self.tokens[i]
            out += token.encode() if i in self._special_ids else _token_bytes(token)
        return out.decode("utf-8", errors="replace")

    # --- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The ChatML prompt of `messages` ({"role", "content"} dicts), as SmolLM2, Qwen2 and
        others format it. SmolLM2's default system message is added when the conversation has
        none and this tokenizer's chat_template contains it."""
        if self.token_id("<|im_start|>") is None:
            raise ValueError("apply_chat_template supports ChatML only, and this vocabulary has no <|im_start|>")
        if (messages and messages[0]["role"] != "system" and self.chat_template
                and SMOLLM_SYSTEM_PROMPT in self.chat_template):
            messages = [{"role": "system", "content": SMOLLM_SYSTEM_PROMPT}, *messages]
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    # --- reading and writing --------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path) -> Tokenizer:
        """The tokenizer stored in a GGUF file's tokenizer.ggml.* fields (llama.cpp's names)."""
        fields = read_gguf_metadata(path)
        model = fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{path}: tokenizer.ggml.model is {model!r}, but only byte-level BPE ('gpt2') "
                             "vocabularies are supported")
        tokens = fields["tokenizer.ggml.tokens"]
        types = fields.get("tokenizer.ggml.token_type", [])
        special = {tokens[i]: i for i, kind in enumerate(types) if kind in (3, 4)}  # CONTROL, USER_DEFINED
        return cls(tokens, fields.get("tokenizer.ggml.merges", []), special,
                   pre_tokenizer=fields.get("tokenizer.ggml.pre", "gpt2"),
                   bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
                   eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=fields.get("tokenizer.chat_template"))

    @classmethod
    def from_hf(cls, directory) -> Tokenizer:
        """The tokenizer of a Hugging Face tokenizer.json (and tokenizer_config.json, if present)."""
        directory = Path(directory)
        spec = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
        model = spec["model"]
        if model.get("type", "BPE") != "BPE":
            raise ValueError(f"{directory}: model type {model.get('type')!r}, but only byte-level BPE vocabularies "
                             "are supported")
        pre_tokenizer = _hf_pre_tokenizer_name(spec.get("pre_tokenizer"), directory)
        normalizer = spec.get("normalizer")
        if normalizer not in (None, {"type": "NFC"}):
            raise NotImplementedError(f"{directory}: normalizer {json.dumps(normalizer)} is not supported")
        special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        ids = {**model["vocab"], **special}
        tokens = [""] * (max(ids.values()) + 1)  # ids that nothing names stay "" (never produced)
        for token, i in ids.items():
            tokens[i] = token
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        bos, eos = (_content(config.get(key)) for key in ("bos_token", "eos_token"))
        bos_id, eos_id = ids.get(bos), ids.get(eos)
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = _template_adds(spec.get("post_processor"), bos)
        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # named templates
            chat_template = {t["name"]: t["template"] for t in chat_template}.get("default")
        if chat_template is None and (directory / "chat_template.jinja").exists():
            chat_template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tokens, merges, special, pre_tokenizer=pre_tokenizer, bos_token_id=bos_id, eos_token_id=eos_id,
                   add_bos=bool(add_bos), chat_template=chat_template,
                   ignore_merges=bool(model.get("ignore_merges", False)), nfc=normalizer is not None)

    def to_hf(self, directory) -> None:
        """Write tokenizer.json and tokenizer_config.json, which from_hf (and Hugging Face) read back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        special = sorted(self.special_tokens.items(), key=lambda item: item[1])
        bos = self.tokens[self.bos_token_id] if self.bos_token_id is not None else None
        eos = self.tokens[self.eos_token_id] if self.eos_token_id is not None else None
        post_processor = None
        if self.add_bos and bos is not None:
            post_processor = {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [self.bos_token_id], "tokens": [bos]}}}
        spec = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for text, i in special],
            "normalizer": {"type": "NFC"} if self.nfc else None,
            "pre_tokenizer": _HF_PRE_TOKENIZERS[self.pre_tokenizer],
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": self.ignore_merges,
                      "vocab": {token: i for i, token in enumerate(self.tokens) if token},
                      "merges": [merge.split(" ") for merge in self.merges]},
        }
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
                  "add_bos_token": self.add_bos, "chat_template": self.chat_template}
        (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2),
                                                         encoding="utf-8")


# The tokenizer.json pre_tokenizer of each supported name (as in the models' own files).
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_HF_PRE_TOKENIZERS = {
    "gpt2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    **{name: {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]}
       for name, pattern in (("llama-bpe", LLAMA3_PATTERN), ("qwen2", QWEN2_PATTERN))},
}


def _split_signature(spec: dict | None) -> tuple:
    """What of a tokenizer.json pre_tokenizer decides the split (options like trim_offsets do not)."""
    def step_signature(step):
        kind = (step or {}).get("type")
        if kind == "ByteLevel":
            return kind, step.get("add_prefix_space", False), step.get("use_regex", True)
        if kind == "Digits":
            return kind, step.get("individual_digits", False)
        if kind == "Split":
            return kind, json.dumps(step["pattern"]), step["behavior"], step.get("invert", False)
        return (json.dumps(step),)
    steps = spec["pretokenizers"] if spec and spec.get("type") == "Sequence" else [spec]
    return tuple(map(step_signature, steps))


def _hf_pre_tokenizer_name(spec: dict | None, directory) -> str:
    signature = _split_signature(spec)
    if not any(step[0] == "ByteLevel" for step in signature):
        raise ValueError(f"{directory}: pre-tokenizer {json.dumps(spec)} is not byte-level; only byte-level BPE "
                         "vocabularies are supported")
    names = {_split_signature(known): name for name, known in _HF_PRE_TOKENIZERS.items()}
    if signature not in names:
        raise NotImplementedError(f"{directory}: pre-tokenizer {json.dumps(spec)} is not supported "
                                  f"(supported: {', '.join(PRE_TOKENIZERS)})")
    return names[signature]


def _content(token) -> str | None:
    """A tokenizer_config.json token: a string, or an AddedToken dict with its content."""
    return token.get("content") if isinstance(token, dict) else token


def _template_adds(post_processor: dict | None, token: str | None) -> bool:
    """Whether a tokenizer.json post_processor puts `token` first in every single sequence (Llama 3's BOS)."""
    steps = post_processor.get("processors", [post_processor]) if post_processor else []
    first = [{"SpecialToken": {"id": token, "type_id": 0}}]
    return token is not None and any(
        step.get("type") == "TemplateProcessing" and step["single"][:1] == first for step in steps)


def load_tokenizer(source) -> Tokenizer:
    """The tokenizer of a .gguf file or of a directory with a tokenizer.json."""
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return Tokenizer.from_gguf(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return Tokenizer.from_hf(path)
    raise ValueError(f"no tokenizer at {str(source)!r}: expected a .gguf file or a directory with a tokenizer.json")
