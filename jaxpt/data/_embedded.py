"""The embedded corpus: real English text that needs no download.

The embedded corpus is the Python Language Reference as shipped in every Python's standard
library (`pydoc_data.topics`: 79 topics, about 465K characters of English prose with
grammar snippets, 139K GPT-2 tokens with Python 3.11), so a smoke run needs no download and no
set-up. It is prepared
on the fly into the usual shard format, in a cache directory keyed by its content and the
tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from jaxpt.data._prepare import prepare_documents, resolve_tokenizer_name
from jaxpt.data._shards import MANIFEST, Manifest, load_manifest
from jaxpt.data._tokenizers import tokenizer_key
from jaxpt.errors import DataError, DataNotFoundError

EMBEDDED = "embedded"
EMBEDDED_SHARD_TOKENS = 2**14  # a handful of shards; the first is the validation split


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


def prepare_embedded(cache_dir: str | os.PathLike, tokenizer: str = "gpt2") -> Manifest:
    """The embedded corpus as shards under `cache_dir`, prepared on the first call.

    Safe when several processes share `cache_dir`: each prepares into a temporary directory
    and renames it into place; the first rename wins and the others use its result. A cache
    damaged since (a shard or the manifest deleted or cut short, by a cache cleaner say) is
    repaired in place, as re-running `jaxpt.data.prepare` repairs the data it wrote.
    """
    texts = embedded_documents()
    name = resolve_tokenizer_name(tokenizer)
    final = (
        Path(cache_dir) / f"embedded-{tokenizer_key(name)}-{_digest(chr(0).join(texts).encode())}"
    )
    source = {
        "dataset": EMBEDDED,
        "corpus": "pydoc_data.topics",
        "python": platform.python_version(),
        "tokenizer": name,
    }
    if not final.exists():
        with _cache_errors(final):
            _prepare_beside(texts, source, final)
    try:
        return load_manifest(final)
    except DataError:
        with _cache_errors(final):
            _prepare(texts, source, final, private=False)  # rewrites what is damaged or missing
        return load_manifest(final)


def _prepare_beside(texts: list[str], source: dict, final: Path) -> None:
    """Prepares `texts` in a temporary directory beside `final`, then renames it to `final`;
    a process that another's rename beat uses that one."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _prepare(texts, source, tmp, private=True)
        os.rename(tmp, final)
    except OSError:
        if not (final / MANIFEST).is_file():  # else lost the race: another process's is there
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prepare(texts: list[str], source: dict, out: Path, *, private: bool) -> None:
    """Prepares `texts` as shards in `out`, or repairs those there; `private`: `out` is this
    process's alone (see `prepare_documents`)."""
    prepare_documents(
        lambda skip: texts[skip:],
        source,
        out,
        shard_tokens=EMBEDDED_SHARD_TOKENS,
        val_tokens=EMBEDDED_SHARD_TOKENS,
        max_tokens=0,
        workers=1,
        progress=False,
        private=private,
    )


@contextlib.contextmanager
def _cache_errors(final: Path) -> Iterator[None]:
    """Turns an OSError while preparing the cache directory `final` into one sentence."""
    try:
        yield
    except OSError as e:
        raise DataError(
            f"cannot prepare the embedded corpus in {final} ({e.strerror}); set "
            "JAXPT_CACHE_DIR to a writable directory with room"
        ) from None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]
