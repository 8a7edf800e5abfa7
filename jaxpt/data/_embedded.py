"""The embedded corpus, and finding the prepared data a run's config names.

The embedded corpus is the Python Language Reference as shipped in every Python's standard
library (`pydoc_data.topics`: 79 topics, about 465K characters of English prose with
grammar snippets, 139K GPT-2 tokens with Python 3.11), so a smoke run needs no download and no
set-up. It is prepared
on the fly into the usual shard format, in a cache directory keyed by its content and the
tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import uuid
from pathlib import Path
from typing import Protocol

from jaxpt.data._prepare import prepare_documents, resolve_tokenizer_name
from jaxpt.data._shards import MANIFEST, PROGRESS, Manifest, load_manifest
from jaxpt.data._tokenizers import HFTokenizer
from jaxpt.errors import DataError, DataNotFoundError

EMBEDDED = "embedded"
EMBEDDED_SHARD_TOKENS = 2**14  # a handful of shards; the first is the validation split


class DataConfig(Protocol):
    """The fields of a run config's `data` section that choose its data."""

    dataset: str  # "embedded", or a directory written by `python -m jaxpt.data.prepare`
    tokenizer: str  # "gpt2", "char", or a tokenizer.json path


def embedded_documents() -> list[str]:
    """The embedded corpus: the Python Language Reference topics (stdlib pydoc_data), in order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise DataNotFoundError(
            "the embedded corpus comes from the stdlib module pydoc_data, which this Python "
            "build lacks; prepare a dataset with `python -m jaxpt.data.prepare` instead"
        ) from e
    return [topics[name] for name in sorted(topics)]


def default_cache_dir() -> Path:
    """$JAXPT_CACHE_DIR, else $XDG_CACHE_HOME/jaxpt, else ~/.cache/jaxpt."""
    if os.environ.get("JAXPT_CACHE_DIR"):
        return Path(os.environ["JAXPT_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "jaxpt"


def prepare_embedded(cache_dir: str | os.PathLike, tokenizer: str = "gpt2") -> Manifest:
    """The embedded corpus as shards under `cache_dir`, prepared on the first call.

    Safe when several processes share `cache_dir`: each prepares into a temporary directory
    and renames it into place; the first rename wins and the others use its result.
    """
    texts = embedded_documents()
    name = resolve_tokenizer_name(tokenizer)
    key = name if name in ("gpt2", "char") else "hf-" + HFTokenizer(name).spec()["sha256"][:12]
    final = Path(cache_dir) / f"embedded-{key}-{_digest(chr(0).join(texts).encode())}"
    if not (final / MANIFEST).is_file():
        source = {
            "dataset": EMBEDDED,
            "corpus": "pydoc_data.topics",
            "python": platform.python_version(),
            "tokenizer": name,
        }
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            prepare_documents(
                lambda skip: texts[skip:],
                source,
                tmp,
                shard_tokens=EMBEDDED_SHARD_TOKENS,
                val_shards=1,
                workers=1,
                progress=False,
            )
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # lost the race: another process's is there
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_manifest(final)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def ensure_prepared(
    data_config: DataConfig, cache_dir: str | os.PathLike | None = None
) -> Manifest:
    """The manifest of the data a run trains on, preparing the embedded corpus if needed.

    Args:
        data_config: `dataset` is "embedded" (prepared on the fly into `cache_dir`) or a data
            directory written by `python -m jaxpt.data.prepare`; `tokenizer` must match it.
        cache_dir: where the embedded corpus is prepared (default: `default_cache_dir()`).

    Raises:
        DataNotFoundError: `dataset` is not a prepared data directory (a hub name, say).
        DataError: a shard is truncated or corrupt, or the tokenizer does not match.
    """
    dataset, tokenizer = data_config.dataset, data_config.tokenizer
    if dataset == EMBEDDED:
        return prepare_embedded(cache_dir or default_cache_dir(), tokenizer)
    path = Path(dataset).expanduser()
    if not (path / MANIFEST).is_file() and not (path / PROGRESS).is_file():
        raise DataNotFoundError(
            f"data.dataset={dataset!r} is not a prepared data directory (no {MANIFEST}); run "
            f"`python -m jaxpt.data.prepare --dataset={dataset} --out=<dir>` and set "
            "data.dataset=<dir>, or use data.dataset='embedded'"
        )
    try:
        manifest = load_manifest(path)
    except DataError as e:
        raise type(e)(f"data.dataset={dataset!r}: {e}") from None
    wanted = tokenizer if tokenizer in ("gpt2", "char") else "hf"
    if manifest.tokenizer["kind"] != wanted:
        raise DataError(
            f"data.dataset={dataset!r} was prepared with the {manifest.tokenizer['kind']} "
            f"tokenizer but data.tokenizer is {tokenizer!r}; make them match"
        )
    return manifest
