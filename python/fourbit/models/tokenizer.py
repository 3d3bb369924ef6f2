"""A model's tokenizer, on Hugging Face `tokenizers`, and its chat template, rendered with jinja2.

Three sources, one `tokenizers.Tokenizer` each:
- a Hugging Face directory: tokenizer.json as it is, tokenizer_config.json for the named special
  tokens and the chat template (chat_template.jinja first, as transformers reads it);
- a GGUF with a byte-level BPE vocabulary (tokenizer.ggml.model "gpt2": GPT-2, SmolLM2, Llama 3,
  Qwen2): vocabulary and merges from the file, text split by the expressions llama.cpp uses for
  its tokenizer.ggml.pre name, then mapped to bytes (ByteLevel);
- a GGUF with a SentencePiece vocabulary (tokenizer.ggml.model "llama": Llama 2, Mistral): BPE
  over the pieces with merges ranked by piece score, "▁" for spaces, a dummy prefix space and
  <0xNN> byte fallback, built as transformers converts a SentencePiece model (so that it encodes
  as SentencePiece and llama.cpp do).
Control tokens (and the named BOS/EOS/UNK/PAD) are special tokens, matched whole in the text;
user-defined tokens are matched whole as well.
"""

from __future__ import annotations

import json
import numbers
import re
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from ..gguf_file import read_gguf_metadata

# The named special tokens (transformers' names), and the GGUF fields that give their ids.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_GGUF_TOKEN_IDS = dict(zip(SPECIAL_TOKEN_NAMES, ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                                 "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id")))

# llama.cpp's token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The split expressions, as the models' tokenizer.json files write them.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# tokenizer.ggml.pre -> the expressions llama.cpp (src/llama-vocab.cpp) splits the text with, one
# after the other, each piece of one split again by the next.
_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), [GPT2_SPLIT]),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    [r"\p{N}", GPT2_SPLIT]),
    **dict.fromkeys((*_LLAMA3_NAMES, "dbrx", "smaug-bpe"), [LLAMA3_SPLIT]),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), [QWEN2_SPLIT]),
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"],
}
# Where llama.cpp looks a whole pre-token up in the vocabulary before merging (Llama 3's
# tokenizer.json says so too: "ignore_merges": true).
IGNORE_MERGES = frozenset(_LLAMA3_NAMES)


class Tokenizer:
    """A `tokenizers.Tokenizer` (`backend`) with the model's named special tokens and chat template.

    backend: the tokenizer; its post-processor decides what encode adds (BOS, EOS).
    special_token_names: {"bos_token": "<s>", ...} for any of SPECIAL_TOKEN_NAMES the model names.
    chat_template: a jinja2 template (the model's tokenizer_config.json or GGUF
    tokenizer.chat_template), or None.
    """

    def __init__(self, backend: Backend, special_token_names: dict[str, str | None] | None = None,
                 chat_template: str | None = None):
        self.backend = backend
        self.special_token_names = {name: token for name, token in (special_token_names or {}).items() if token}
        self.chat_template = chat_template
        self._template = None
        self.bos_token_id = self.token_id(self.special_token_names.get("bos_token", ""))
        self.eos_token_id = self.token_id(self.special_token_names.get("eos_token", ""))

    @property
    def vocab_size(self) -> int:
        """The number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        """{text: id} of the special tokens, which encode matches whole in the text."""
        return {token.content: i for i, token in self.backend.get_added_tokens_decoder().items() if token.special}

    @property
    def add_bos(self) -> bool:
        """Whether encode puts the BOS token first."""
        return self.bos_token_id is not None and self.backend.encode("").ids[:1] == [self.bos_token_id]

    def token_id(self, text: str) -> int | None:
        """The id of a token given as its exact string (e.g. "<|im_end|>", "Ġworld"), or None."""
        return self.backend.token_to_id(text) if text else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (a str); special-token strings in it become their ids. With
        add_special_tokens, what the model adds around a sequence (BOS, for Llama) as well."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        """Text of token ids (a list of ints or a 1-D integer tensor or array), special tokens as
        their text; bytes that are not valid UTF-8 become U+FFFD. Raises TypeError for ids that
        are not integers (floats, bools, nested lists) and ValueError for a tensor that is not
        1-D or an id outside the vocabulary."""
        if hasattr(ids, "ndim") and hasattr(ids, "tolist"):  # a tensor or array
            if ids.ndim != 1:
                raise ValueError(f"ids must be one sequence (a 1-D tensor), got shape {tuple(ids.shape)}; "
                                 "decode each row on its own")
            kind, ids = f" (dtype {ids.dtype})", ids.tolist()
        elif isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TypeError(f"ids must be a list of token ids (ints) or a 1-D integer tensor, got {ids!r}")
        else:
            kind, ids = "", list(ids)
        for i, token in enumerate(ids):
            if not isinstance(token, numbers.Integral) or isinstance(token, bool):
                raise TypeError(f"ids[{i}] is {token!r}{kind}: token ids are integers")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} in ids is outside the vocabulary (size {self.vocab_size})")
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """The prompt text of `messages` ({"role", "content"} dicts) in the model's chat template,
        rendered as transformers' apply_chat_template(tokenize=False) renders it; `variables`
        (tools, documents, enable_thinking, ...) are passed to the template.

        Raises:
            TypeError: messages is not a list of dicts, or a role or content of another type.
            ValueError: a message without "role", or without "content" (which only an assistant
                message with "tool_calls" may leave out or set to None), named by its index;
                or the model has no chat template.
        """
        _check_messages(messages)
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (none in tokenizer_config.json, "
                             "chat_template.jinja or the GGUF's tokenizer.chat_template)")
        if self._template is None:
            self._template = _compile_chat_template(self.chat_template)
        # The sandbox is immutable: a template cannot change the caller's messages.
        return self._template.render(**{"tools": None, "documents": None, **self.special_token_names, **variables},
                                     messages=messages, add_generation_prompt=add_generation_prompt)

    # --- reading and writing --------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path) -> Tokenizer:
        """The tokenizer stored in the tokenizer.ggml.* fields of the GGUF file at `path` (a str or
        Path): a byte-level BPE ("gpt2") or SentencePiece ("llama") vocabulary."""
        fields = read_gguf_metadata(path)
        model = fields.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ValueError(f"{path}: tokenizer.ggml.model is {model!r}, but only byte-level BPE ('gpt2') and "
                             "SentencePiece ('llama') vocabularies are supported")
        tokens = fields["tokenizer.ggml.tokens"]
        types = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        build = _byte_level_bpe if model == "gpt2" else _sentencepiece_bpe
        backend = build(fields, tokens, types)
        ids = {name: fields.get(key) for name, key in _GGUF_TOKEN_IDS.items()}
        names = {name: tokens[i] for name, i in ids.items() if i is not None and 0 <= i < len(tokens)}
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i, kind in enumerate(types) if kind == CONTROL]
                                   + [AddedToken(token, special=True, normalized=False) for token in names.values()])
        # As transformers: BOS by the file's flag, which SentencePiece vocabularies default to on.
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", model == "llama"))
        add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
        backend.post_processor = _bos_eos_processor(names.get("bos_token") if add_bos else None,
                                                    names.get("eos_token") if add_eos else None, backend)
        return cls(backend, names, fields.get("tokenizer.chat_template"))

    @classmethod
    def from_hf(cls, directory) -> Tokenizer:
        """The tokenizer of a Hugging Face directory (a str or Path): its tokenizer.json, and the
        special tokens and chat template of its tokenizer_config.json and chat_template.jinja.
        As in transformers, tokenizer.json's post-processor alone decides about BOS and EOS."""
        directory = Path(directory)
        try:
            backend = Backend.from_file(str(directory / "tokenizer.json"))
        except Exception as error:  # tokenizers raises a bare Exception for a bad file
            raise ValueError(f"{directory / 'tokenizer.json'} is not a tokenizer.json that tokenizers reads: "
                             f"{error}") from error
        config_path = directory / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
        names = {name: _content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                    for token in names.values() if token and backend.token_to_id(token) is not None])
        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # named templates
            chat_template = {t["name"]: t["template"] for t in chat_template}.get("default")
        if (directory / "chat_template.jinja").exists():
            chat_template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, names, chat_template)

    def to_hf(self, directory) -> None:
        """Write tokenizer.json and tokenizer_config.json into `directory` (a str or Path, created
        if missing), which from_hf and transformers' AutoTokenizer read back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_token_names,
                  "add_bos_token": self.add_bos, "chat_template": self.chat_template}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2),
                                                         encoding="utf-8")


def _byte_level_bpe(fields: dict, tokens: list[str], types: list[int]) -> Backend:
    """GPT-2-style BPE over byte-level characters, split as llama.cpp splits for tokenizer.ggml.pre."""
    pre = fields.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZER_SPLITS:
        warnings.warn(f"unknown pre-tokenizer {pre!r}; splitting text as GPT-2 does", stacklevel=3)
        pre = "gpt2"
    merges = [tuple(merge.split(" ", 1)) for merge in fields.get("tokenizer.ggml.merges", [])]
    backend = Backend(BPE(_vocab(tokens), merges, ignore_merges=pre in IGNORE_MERGES))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    user_defined = [token for token, kind in zip(tokens, types) if kind == USER_DEFINED]
    backend.add_tokens([AddedToken(token, normalized=False) for token in user_defined])  # whole, not special
    return backend


def _sentencepiece_bpe(fields: dict, tokens: list[str], types: list[int]) -> Backend:
    """SentencePiece BPE as transformers' SpmConverter builds it from a model proto (the legacy
    scheme, which encodes as SentencePiece and llama.cpp do): only normal pieces merge, best score
    first; spaces are "▁"; a "▁" goes before the text (and after each special token); user-defined
    pieces are never merged."""
    scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    normal = {token: (scores[i], i) for i, token in enumerate(tokens) if types[i] == NORMAL}
    ranked = sorted((-score, i, token[:cut], token[cut:]) for token, (score, i) in normal.items()
                    for cut in range(1, len(token)) if token[:cut] in normal and token[cut:] in normal)
    user_defined = [token for token, kind in zip(tokens, types) if kind == USER_DEFINED]
    unknown = next((token for token, kind in zip(tokens, types) if kind == UNKNOWN), None)
    backend = Backend(BPE(_vocab(tokens), [(left, right) for *_, left, right in ranked], unk_token=unknown,
                          fuse_unk=True, byte_fallback=True, ignore_merges=bool(user_defined)))
    add_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    steps = []
    if fields.get("tokenizer.ggml.remove_extra_whitespaces", False):
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    steps.append(normalizers.Replace(" ", "▁"))
    if add_prefix:  # Metaspace adds no prefix to text that starts with "▁"; SentencePiece does
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    backend.normalizer = normalizers.Sequence(steps)
    splits = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)] if add_prefix else []
    if user_defined:
        pattern = "|".join(map(re.escape, sorted(user_defined, key=len, reverse=True)))
        splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(splits) if splits else None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *([decoders.Strip(content=" ", left=1)] if add_prefix else [])])
    return backend


def _vocab(tokens: list[str]) -> dict[str, int]:
    """{token: id} (a string listed twice keeps its last id, as in transformers; llama.cpp refuses such files)."""
    return {token: i for i, token in enumerate(tokens)}


def _bos_eos_processor(bos: str | None, eos: str | None, backend: Backend) -> processors.TemplateProcessing:
    """The post-processor transformers builds for add_bos_token / add_eos_token (update_post_processor)."""
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    special = [(token, backend.token_to_id(token)) for token in dict.fromkeys(t for t in (bos, eos) if t)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _content(token) -> str | None:
    """A tokenizer_config.json token: a string, or an AddedToken dict with its content."""
    return token.get("content") if isinstance(token, dict) else token


def _check_messages(messages) -> None:
    """Raise unless messages is a list of {"role": str, "content": str | list} dicts. A template
    renders a missing key as an empty string (silently dropping a turn's text) or fails deep
    inside jinja2; this names the message instead."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {messages!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] is {message!r}: expected a dict with 'role' and 'content'")
        if "role" not in message:
            raise ValueError(f"messages[{i}] has no 'role' (keys: {list(message)})")
        if not isinstance(message["role"], str):
            raise TypeError(f"messages[{i}]['role'] is {message['role']!r}: expected a str")
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            raise ValueError(f"messages[{i}] has no 'content' (keys: {list(message)}); only a message with "
                             "'tool_calls' may leave it out")
        if content is not None and not isinstance(content, (str, list, tuple)):
            raise TypeError(f"messages[{i}]['content'] is {content!r}: expected a str or a list of content parts")


def _compile_chat_template(source: str):
    """A jinja2 template in the environment transformers renders chat templates in: sandboxed,
    trim_blocks and lstrip_blocks, loop controls, raise_exception, strftime_now, a tojson that
    does not escape HTML, and {% generation %} blocks (which mark assistant text) as plain text."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment.from_string(source)


def load_tokenizer(source) -> Tokenizer:
    """The tokenizer of `source` (a str or Path): a .gguf file, or a directory with a tokenizer.json."""
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return Tokenizer.from_gguf(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return Tokenizer.from_hf(path)
    raise ValueError(f"no tokenizer at {str(source)!r}: expected a .gguf file or a directory with a tokenizer.json")
