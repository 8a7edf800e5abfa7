"""Corpus preparation: documents from a `datasets` source -> end-of-text separated token shards.

Documents are tokenized in worker processes, each prefixed with the end-of-text id, and the
token stream is cut into shards: the stream's first `val_tokens` tokens form the "val" split,
the rest "train", each cut into shards of `shard_tokens`; with `max_tokens` the stream stops
there. After each shard, progress.json records where the next shard starts (document index,
token offset in it), so a re-run skips finished shards and resumes there; manifest.json is
written last and its presence means the preparation finished. progress.json stays, so a later
run with a larger `max_tokens` extends the data, and a re-run rewrites a damaged shard: the
stream is deterministic, so either gives the bytes one uninterrupted run would have written.

Chat data (`format="chat"`: rows holding a list of messages) is the same stream of whole rows
instead of documents: each conversation is rendered with the tokenizer's chat template (or
ChatML, `_chat.py`), cut to and padded to `block_size + 1` tokens, one conversation per row,
and each shard gets a loss-mask shard beside it. Padding rather than packing several
conversations into a row: with right padding and causal attention no token ever sees another
conversation or the padding, for every preset and attention kernel, with no attention mask at
all (packing would need per-document attention masks the models do not take).

Preparation writes only into an empty or new directory, or one it made itself (its manifest or
progress.json is there).
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import functools
import itertools
import json
import logging as std_logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from absl import logging

from jaxpt.data._chat import (
    CHATML,
    chat_row,
    chat_template,
    check_messages,
    end_of_turn,
    plain_text,
)
from jaxpt.data._hub import hub_or_cache
from jaxpt.data._lock import lock_beside
from jaxpt.data._shards import (
    MANIFEST,
    MAX_SHARD_TOKENS,
    PROGRESS,
    Manifest,
    Shard,
    mask_file,
    parse_json,
    read_manifest,
    save_manifest,
    shard_dtype,
    shard_is_complete,
    write_atomic,
    write_shard,
)
from jaxpt.data._tokenizers import CharTokenizer, HFTokenizer, Tokenizer, get_tokenizer
from jaxpt.errors import DataError, DataNotFoundError

DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard
_DEFAULT_CONFIG_NAMES = {DEFAULT_DATASET: "sample-10BT"}  # used when config_name is None
_BUILDERS = {  # local file suffix -> `datasets` builder
    ".txt": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_TEXT_BUILDERS = ("text", "json", "csv")  # builders whose files must be UTF-8 text
_DISK_SUFFIXES = (".arrow", ".json")  # a `save_to_disk` directory's files
_BATCH_DOCS = 64  # documents per task sent to a worker process

# skip -> the documents skip, skip + 1, ...: texts, or conversations (lists of messages)
Documents = Callable[[int], Iterable]
FORMATS = ("text", "chat")


class SourceError(DataError):
    """A source that could not be loaded or read: the hub unreachable, a name that does not
    exist, a file that does not parse."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause  # the underlying error, in a few words


def prepare_dataset(
    dataset: str,
    out: str | os.PathLike,
    *,
    tokenizer: str = "gpt2",
    config_name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_shards: int = 1,
    max_tokens: int = 0,
    workers: int | None = None,
    streaming: bool = True,
    progress: bool = True,
    format: str = "text",
    block_size: int = 0,
    messages_field: str = "messages",
) -> Manifest:
    """Tokenizes a dataset into shards under `out` (resuming, extending or repairing what an
    earlier run with the same settings left there).

    Args:
        dataset: a Hugging Face hub name (the CLI's default is DEFAULT_DATASET, FineWeb-Edu
            sample-10BT), or a local file or directory of .txt/.md (one document
            per file), .json/.jsonl/.parquet/.csv (one per row) files, or a `save_to_disk` dir.
        out: the data directory to write: new, empty, or written by an earlier run (a
            leading `~` is the home directory, as in `dataset`).
        tokenizer: "gpt2", "char" (vocabulary built from the corpus), or a tokenizer.json path.
        config_name: the hub dataset's config; None picks "sample-10BT" for FineWeb-Edu.
        split: the split to read (local files have only "train").
        text_field: the column holding each document's text.
        shard_tokens: tokens per shard; the last shard holds the rest.
        val_shards: how many leading shards form the "val" split.
        max_tokens: stop after this many tokens (val and train); 0: the whole source.
        workers: tokenizer processes (default: one per CPU).
        streaming: read the source lazily instead of first converting it to Arrow.
        progress: show a progress bar with tokens/s.
        format: "text" (documents) or "chat" (conversations, see the module docstring).
        block_size: chat: the model's block size; rows hold block_size + 1 tokens, and
            shard_tokens and max_tokens are rounded down to whole rows.
        messages_field: chat: the column holding each conversation's list of messages.

    Returns:
        The manifest of the finished data directory.
    """
    _check_arguments(val_shards=(val_shards, 0))
    if format not in FORMATS:
        raise DataError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    if format == "chat":
        if block_size < 1:
            raise DataError(
                f"chat data needs block_size, the model's block size (each conversation fills "
                f"a row of block_size + 1 tokens), got {block_size}; pass --block_size"
            )
        source = chat_source(dataset, tokenizer, config_name, split, messages_field, block_size)
        shard_tokens, max_tokens = _whole_rows(shard_tokens, max_tokens, source["row_tokens"])
    else:
        source = dataset_source(dataset, tokenizer, config_name, split, text_field)
    val_tokens = val_shards * shard_tokens
    return prepare_source(
        source, out, shard_tokens, val_tokens, max_tokens, workers, streaming, progress
    )


def _whole_rows(shard_tokens: int, max_tokens: int, row: int) -> tuple[int, int]:
    """Chat data: `shard_tokens` and `max_tokens` rounded down to whole rows of `row` tokens
    (block_size + 1), each checked to hold at least one."""
    _check_arguments(shard_tokens=(shard_tokens, row))
    if 0 < max_tokens < row:  # rounded down to 0 rows, it would mean the whole source
        raise DataError(
            f"max_tokens must be 0 (the whole source) or at least one row of {row} tokens "
            f"(block_size + 1), got {max_tokens}"
        )
    return shard_tokens // row * row, max_tokens // row * row


def dataset_source(
    dataset: str,
    tokenizer: str = "gpt2",
    config_name: str | None = None,
    split: str = "train",
    text_field: str = "text",
) -> dict:
    """The description of a source that preparation records (local files are checked now)."""
    if not dataset:  # Path("") is the current directory
        raise DataError(
            "the dataset name is empty; name a hub dataset or a local file or directory"
        )
    path = Path(dataset).expanduser()
    fingerprint = {}
    if path.exists():
        builder, files = _local_source(path)  # fails early, before anything is written
        _check_local_split(path, builder, split)
        dataset, config_name = str(path.resolve()), None
        fingerprint = {"files": _fingerprint(path, builder, files)}
    elif looks_like_path(dataset):
        raise DataNotFoundError(f"dataset {dataset!r} does not exist (no such file or directory)")
    return {
        "dataset": dataset,
        "config_name": config_name or _DEFAULT_CONFIG_NAMES.get(dataset),
        "split": split,
        "text_field": text_field,
        "tokenizer": resolve_tokenizer_name(tokenizer),
        **fingerprint,
    }


def chat_source(
    dataset: str,
    tokenizer: str,
    config_name: str | None,
    split: str,
    messages_field: str,
    block_size: int,
) -> dict:
    """`dataset_source` of conversations, with the chat template they are rendered with and
    the row length (block_size + 1)."""
    source = dataset_source(dataset, tokenizer, config_name, split)
    del source["text_field"]
    name = source["tokenizer"]
    if name == "char":
        template = CHATML
    else:
        tok = get_tokenizer(name)
        template = chat_template(tok)
        _warn_without_end_of_turn(tok, template)
    return {
        **source,
        "format": "chat",
        "messages_field": messages_field,
        "row_tokens": block_size + 1,
        "chat_template": template,
    }


def _warn_without_end_of_turn(tok: Tokenizer, template: str) -> None:
    """A warning where chat (``jaxpt.chat``, ``--mode=chat``) could not use a model trained
    on rows of ``template``: it finds no end-of-turn marker after a reply."""
    try:
        end_of_turn(tok, template)
    except DataError as e:
        logging.warning("%s: a model trained on this data can be sampled but not chatted with", e)


def _is_chat(source: dict) -> bool:
    return source.get("format") == "chat"


def prepare_source(
    source: dict,
    out: str | os.PathLike,
    shard_tokens: int,
    val_tokens: int,
    max_tokens: int = 0,
    workers: int | None = None,
    streaming: bool = True,
    progress: bool = True,
) -> Manifest:
    """`prepare_documents` of the `datasets` source that `dataset_source` describes."""
    documents = functools.partial(_dataset_documents, source, streaming)
    workers = (os.cpu_count() or 1) if workers is None else workers
    return prepare_documents(
        documents, source, out, shard_tokens, val_tokens, max_tokens, workers, progress
    )


def prepare_documents(
    documents: Documents,
    source: dict,
    out: str | os.PathLike,
    shard_tokens: int,
    val_tokens: int,
    max_tokens: int,
    workers: int,
    progress: bool,
    *,
    private: bool = False,
) -> Manifest:
    """Tokenizes `documents(0)` with `source["tokenizer"]` into shards under `out`.

    `documents(n)` must yield the same texts on every call, from document n on; `source`
    describes them (it goes into the manifest, and a re-run resumes only if it is unchanged).
    The first `val_tokens` tokens form the val split; `max_tokens` > 0 stops the stream there.
    Processes preparing `out` at once (hosts on a shared filesystem) take turns (`lock_beside`):
    the first prepares, the others wait and then find it prepared. `private`: `out` is this
    process's alone (a temporary directory), so no lock is taken.
    """
    _check_sizes(shard_tokens, val_tokens, max_tokens, workers)
    out = Path(out).expanduser()  # as `dataset` and data.dataset: a shell leaves --out=~/...
    settings = {"source": source, "shard_tokens": shard_tokens, "val_tokens": val_tokens}
    finished = _finished(out, settings, max_tokens)
    if finished is not None:  # read only: needs no lock, nor a writable directory
        return finished
    with contextlib.nullcontext() if private else lock_beside(out, "preparing"):
        finished = _finished(out, settings, max_tokens)  # by a process this one waited for
        if finished is not None:
            return finished
        return _write_documents(documents, source, out, settings, max_tokens, workers, progress)


def _write_documents(
    documents: Documents,
    source: dict,
    out: Path,
    settings: dict,
    max_tokens: int,
    workers: int,
    progress: bool,
) -> Manifest:
    """`prepare_documents`' work, where `out` is not finished: its intact shards are kept and
    the stream is tokenized from where they end."""
    records = _resumable_records(out, settings)
    tok = _tokenizer(source, documents, out if records else None)
    (out / MANIFEST).unlink(missing_ok=True)  # ours (_finished checked): written again at the end
    writer = _ShardWriter(out, tok, settings, records, max_tokens)
    encode = _encoder(source, tok, writer.dtype)
    if progress:
        print(_starting(out, source, records, writer.tokens, max_tokens), flush=True)
    start = records[-1]["end"] if records else (0, 0)
    docs = _tokenize_into(writer, encode, documents, start, workers, progress)
    if not writer.records:
        raise DataError(_nothing_to_write(source, docs))
    manifest = writer.manifest(docs)
    save_manifest(manifest)
    return manifest


def summary(manifest: Manifest) -> str:
    """The line the prepare command ends with: tokens per split, and the documents they came
    from (chat data: the conversations kept, one row each, and those skipped)."""
    splits = ", ".join(f"{s} {manifest.tokens(s):,}" for s in ("val", "train"))
    documents = _count(manifest.documents, "document")
    if manifest.row_tokens:
        rows = manifest.tokens() // manifest.row_tokens
        documents = (
            f"{_count(rows, 'conversation')}, one per row ({manifest.documents - rows:,} more "
            f"skipped: no assistant token within their first {manifest.row_tokens} tokens)"
        )
    return (
        f"{manifest.directory}: {manifest.tokens():,} {manifest.dtype} tokens ({splits}) from "
        f"{documents} in {_count(len(manifest.shards), 'shard')}"
    )


def _count(n: int, noun: str) -> str:
    """`n` and `noun`, plural unless `n` is 1: "1 document", "2,048 documents"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _nothing_to_write(source: dict, docs: int) -> str:
    """Why the `docs` documents of `source` gave no shard: they hold no text, or (chat data)
    no conversation has an assistant token in its row."""
    if not _is_chat(source):
        return f"dataset {source['dataset']} is empty ({_count(docs, 'document')}, no text)"
    return (
        f"none of the {docs} conversations of dataset {source['dataset']} has an assistant "
        f"token within its first {source['row_tokens']} tokens (block_size + 1), so there is "
        "nothing to train on; raise --block_size, or check that the conversations have "
        "assistant messages"
    )


def _check_arguments(**values: tuple[int, int]) -> None:
    """Each of `values` is (value, least allowed)."""
    for name, (value, least) in values.items():
        if value < least:
            raise DataError(f"{name} must be at least {least}, got {value}")


def _check_sizes(shard_tokens: int, val_tokens: int, max_tokens: int, workers: int) -> None:
    """Raises DataError naming the first of `prepare_documents`' sizes out of range."""
    _check_arguments(
        shard_tokens=(shard_tokens, 1),
        val_tokens=(val_tokens, 0),
        max_tokens=(max_tokens, 0),
        workers=(workers, 1),
    )
    if shard_tokens > MAX_SHARD_TOKENS:
        raise DataError(f"shard_tokens must be at most {MAX_SHARD_TOKENS}, got {shard_tokens}")


def _tokenize_into(
    writer: _ShardWriter,
    encode: Encode,
    documents: Documents,
    start: tuple[int, int],
    workers: int,
    progress: bool,
) -> int:
    """Feeds `writer` the documents' tokens from `start` (document index, token offset in it)
    until it is full or they end, then writes its last shard; returns how many documents have
    been read."""
    start_doc, start_offset = start
    docs = start_doc + (start_offset > 0)
    if writer.full:
        return docs
    stream = _token_stream(encode, documents(start_doc), start_doc, workers)
    with _progress_bar(writer.tokens, writer.max_tokens, progress, writer.out.name) as advance:
        for doc, tokens in stream:
            offset = start_offset if doc == start_doc else 0  # the finished shards hold the rest
            advance(tokens.shape[1] - offset)
            writer.add(tokens, doc, offset)
            docs = doc + 1
            if writer.full:
                break
    writer.finish(docs)
    return docs


def _starting(out: Path, source: dict, records: list, tokens: int, max_tokens: int) -> str:
    """The line said before preparing."""
    goal = f"{max_tokens:,} tokens" if max_tokens else "all of it"
    shards = _count(len(records), "shard")
    done = f"; {tokens:,} tokens in {shards} already there" if records else ""
    return f"preparing {out} from {source['dataset']} ({goal}{done})"


def resolve_tokenizer_name(name: str) -> str:
    """The tokenizer argument as recorded: "gpt2", "char", or an absolute path."""
    if name in ("gpt2", "char"):
        return name
    get_tokenizer(name)  # a clear error now if it does not exist
    return str(Path(name).expanduser().resolve())


def _tokenizer(source: dict, documents: Documents, saved_in: Path | None) -> Tokenizer:
    """The source's tokenizer; "char" loads the vocabulary saved in `saved_in` or builds it.
    Another tokenizer must be the one whose copy is saved in `saved_in` (the data there goes
    on with its ids)."""
    if source["tokenizer"] != "char":
        tok = get_tokenizer(source["tokenizer"])
        if saved_in is not None:
            _check_same_tokenizer(tok, source["tokenizer"], saved_in)
        return tok
    if saved_in is not None:
        return CharTokenizer.load(saved_in)
    texts = documents(0)
    if _is_chat(source):
        texts = (plain_text(source["chat_template"], messages) for messages in texts)
    return CharTokenizer.from_texts(texts, corpus=f"dataset {source['dataset']}")


def _check_same_tokenizer(tok: Tokenizer, name: str, saved_in: Path) -> None:
    """Raises DataError when the Hugging Face tokenizer `tok` (at `name`) is not the one whose
    copy `saved_in` holds: its tokenizer.json or end-of-text token changed since (a copy that
    is missing or does not read is not compared)."""
    if not isinstance(tok, HFTokenizer) or not (saved_in / HFTokenizer.file).is_file():
        return
    try:
        saved = HFTokenizer(saved_in).spec()
    except DataError:
        return
    if tok.spec() != saved:
        raise DataError(
            f"{saved_in} was prepared with another tokenizer than {name} holds now (its copy of "
            f"{HFTokenizer.file} there differs); restore the tokenizer it was made with to go "
            "on, or prepare into a new directory"
        )


# ----------------------------------------------------------------------------- the output


def _check_ours(out: Path) -> None:
    """Raises unless `out` is absent, an empty directory (but for a temporary progress.json),
    or holds a manifest or progress.json."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file, not a directory")
    if out.is_symlink() and not out.exists():  # mkdir would fail only at the first shard
        raise DataError(
            f"output {out} is a symbolic link to {os.readlink(out)}, which does not exist; "
            "create that directory or choose another output directory"
        )
    if not out.is_dir() or is_prepared(out):
        return
    # a run killed before its first progress.json was renamed into place left its temporary
    names = sorted(p.name for p in out.iterdir() if p.name != f"{PROGRESS}.tmp")
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise DataError(
            f"output {out} already holds files ({shown}) and was not made by "
            f"`jaxpt.data.prepare` (no {MANIFEST} or {PROGRESS}); choose a new or empty directory"
        )


def _finished(out: Path, settings: dict, max_tokens: int) -> Manifest | None:
    """The manifest already in `out` if it was prepared with `settings`, holds `max_tokens`
    tokens (or the whole source) and its shards are intact; None if there is work to do."""
    _check_ours(out)
    if not (out / MANIFEST).is_file():
        return None
    resumable = (out / PROGRESS).is_file()
    try:
        manifest = read_manifest(out)
    except DataError:
        if resumable:
            return None  # a damaged manifest of ours: written again
        raise
    _check_settings(out, settings, _settings_of(manifest))
    intact = all(
        _shard_intact(out, s.file, manifest.dtype, s.tokens, manifest.row_tokens > 0)
        for s in manifest.shards
    )
    exhausted = not manifest.max_tokens or manifest.tokens() < manifest.max_tokens
    if intact and (exhausted or manifest.max_tokens >= max_tokens > 0):
        logging.info("%s is already prepared; nothing to do", out)
        return manifest
    if not resumable:
        raise DataError(
            f"{out} was prepared by an earlier version of jaxpt, which kept no {PROGRESS} to "
            "extend or repair it from; prepare the data again into a new directory"
        )
    return None


def _shard_intact(out: Path, file: str, dtype: str, tokens: int, masked: bool) -> bool:
    """Whether shard `file` of `out` (and its loss-mask shard, if `masked`) is whole."""
    files = (file, mask_file(file)) if masked else (file,)
    return all(shard_is_complete(out / f, dtype, tokens) for f in files)


def _settings_of(manifest: Manifest) -> dict:
    keys = ("source", "shard_tokens", "val_tokens")
    return {k: getattr(manifest, k) for k in keys}


def _check_settings(out: Path, wanted: dict, found: dict) -> None:
    """Raises DataError unless `found`, the settings `out` was prepared with, are `wanted`.
    A local source's files are compared last, where `found` records them (jaxpt did not
    before), so that their change is named."""
    recorded = found.get("source")
    files = recorded.get("files") if isinstance(recorded, dict) else None
    wanted_files = wanted["source"].get("files", {})
    wanted, found = _without_files(wanted), _without_files(found)
    if wanted != found:
        diff = ", ".join(k for k in wanted if wanted[k] != found.get(k))
        raise DataError(
            f"{out} already holds data prepared with other settings ({diff} differ); "
            "choose another output directory"
        )
    if files is not None and files != wanted_files:
        raise DataError(
            f"dataset {wanted['source']['dataset']} changed since {out} was prepared from it "
            f"({_files_changed(files, wanted_files)}); prepare it into a new output directory, "
            f"or restore its files as they were to go on with {out}"
        )


def _without_files(settings: dict) -> dict:
    """`settings` less its source's fingerprint of files."""
    source = settings.get("source")
    if not isinstance(source, dict):
        return settings
    return {**settings, "source": {k: v for k, v in source.items() if k != "files"}}


def _files_changed(old: dict, new: dict) -> str:
    """How the fingerprint `new` differs from `old` (`_fingerprint`'s): the first file, in
    name order, that was added, removed or changed, and how many more differ."""
    names = [n for n in sorted(old.keys() | new.keys()) if old.get(n) != new.get(n)]
    first = names[0]
    how = "added" if first not in old else "removed" if first not in new else "changed"
    more = f", and {_count(len(names) - 1, 'more file')}" if len(names) > 1 else ""
    return f"{first} was {how}{more}"


_RECORD_TYPES = {"file": str, "split": str, "tokens": int, "max_token_id": int, "end": list}


def _read_progress(path: Path) -> dict:
    """progress.json: {"settings", "dtype", "shards": [record, ...]}; DataError if damaged."""
    what = "prepare the data again into a new directory"
    state = parse_json(path, what)
    records = state.get("shards")
    valid = (
        isinstance(state.get("settings"), dict)
        and isinstance(state.get("dtype"), str)
        and isinstance(records, list)
        and all(
            isinstance(r, dict)
            and all(isinstance(r.get(k), t) for k, t in _RECORD_TYPES.items())
            and Path(r["file"]).name == r["file"]
            for r in records
        )
    )
    if not valid:
        raise DataError(f"{path} is not a jaxpt progress file; {what}")
    return state


def _capacity(start: int, settings: dict) -> int:
    """The size of a full shard that starts at stream offset `start`."""
    val, size = settings["val_tokens"], settings["shard_tokens"]
    return min(size, val - start) if start < val else size


def _resumable_records(out: Path, settings: dict) -> list[dict]:
    """The records of the intact leading shards in `out`, less a last one cut short (by the
    end of the stream or `max_tokens`), which a longer run writes again in full."""
    path = out / PROGRESS
    if not path.is_file():
        return []
    state = _read_progress(path)
    _check_settings(out, settings, state["settings"])
    masked = _is_chat(settings["source"])
    records = list(
        itertools.takewhile(
            lambda r: _shard_intact(out, r["file"], state["dtype"], r["tokens"], masked),
            state["shards"],
        )
    )
    start = sum(r["tokens"] for r in records[:-1])
    if records and records[-1]["tokens"] < _capacity(start, settings):
        records.pop()
    logging.info("resuming %s: %d finished shards are kept", out, len(records))
    return records


class _ShardWriter:
    """Cuts the token stream into shards; after each, records where the next one starts.

    The stream has C columns: tokens, and for chat data their loss mask, written to a mask
    shard beside each token shard.
    """

    def __init__(
        self, out: Path, tok: Tokenizer, settings: dict, records: list[dict], max_tokens: int
    ) -> None:
        self.out, self.tok, self.settings, self.records = out, tok, settings, records
        self.max_tokens = max_tokens
        self.dtype = shard_dtype(tok.vocab_size)
        self.row_tokens = settings["source"]["row_tokens"] if _is_chat(settings["source"]) else 0
        columns = 2 if self.row_tokens else 1
        self.buffer = np.empty((columns, settings["shard_tokens"]), self.dtype)  # (C, shard)
        self.fill = 0
        self.tokens = sum(r["tokens"] for r in records)  # in finished shards

    @property
    def full(self) -> bool:
        """Whether the finished shards hold `max_tokens` (> 0) tokens."""
        return 0 < self.max_tokens <= self.tokens

    def _capacity(self) -> int:
        """The size of the shard being filled."""
        size = _capacity(self.tokens, self.settings)
        return min(size, self.max_tokens - self.tokens) if self.max_tokens else size

    def add(self, tokens: np.ndarray, doc: int, start: int) -> None:
        """Appends tokens[:, start:] of document `doc` (C, N), writing every shard that fills
        up, until `full`."""
        pos, length = start, tokens.shape[1]
        while pos < length and not self.full:
            take = min(length - pos, self._capacity() - self.fill)
            self.buffer[:, self.fill : self.fill + take] = tokens[:, pos : pos + take]
            self.fill, pos = self.fill + take, pos + take
            if self.fill == self._capacity():
                self._write((doc, pos) if pos < length else (doc + 1, 0))

    def finish(self, docs: int) -> None:
        """Writes the last, partial shard; `docs` documents have been read."""
        if self.fill:
            self._write((docs, 0))

    def manifest(self, docs: int) -> Manifest:
        """The manifest of the shards written."""
        keys = ("file", "split", "tokens", "max_token_id")
        shards = tuple(Shard(**{k: r[k] for k in keys}) for r in self.records)
        return Manifest(
            directory=self.out,
            tokenizer=self.tok.spec(),
            vocab_size=self.tok.vocab_size,
            eot_id=self.tok.eot_id,
            dtype=self.dtype,
            documents=docs,
            shards=shards,
            val_shards=sum(s.split == "val" for s in shards),
            max_tokens=self.max_tokens,
            row_tokens=self.row_tokens,
            **self.settings,
        )

    def _write(self, end: tuple[int, int]) -> None:
        index = len(self.records)
        if index == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self._save_progress()  # before any other file: `out` reads as prepare's at once
            self.tok.save(self.out)
        split = "val" if self.tokens < self.settings["val_tokens"] else "train"
        tokens = self.buffer[0, : self.fill]
        name = f"{split}_{index:06d}.bin"
        write_shard(self.out / name, tokens)
        if self.row_tokens:
            write_shard(self.out / mask_file(name), self.buffer[1, : self.fill])
        record = {
            "file": name,
            "split": split,
            "tokens": self.fill,
            "max_token_id": int(tokens.max()),
            "end": list(end),
        }
        self.records.append(record)
        self.tokens += self.fill
        self._save_progress()
        self.fill = 0

    def _save_progress(self) -> None:
        """progress.json: the settings and the records of the shards written."""
        state = {"settings": self.settings, "dtype": self.dtype, "shards": self.records}
        write_atomic(self.out / PROGRESS, json.dumps(state, indent=1).encode())


@contextlib.contextmanager
def _progress_bar(initial: int, total: int, enabled: bool, name: str) -> Iterator[Callable]:
    """A tqdm bar of tokens (tokens/s) up to `total`, for a block given its `advance(count)`.
    The bar stays on the console when the block ends and is wiped when it raises: the error's
    sentence (or Ctrl-C's) is then the last word, not a bar stopped short."""
    from tqdm import tqdm

    bar = tqdm(
        desc=name,
        unit="tok",
        unit_scale=True,
        initial=initial,
        total=total or None,
        disable=not enabled,
    )
    with bar:
        try:
            yield lambda count: bar.update(min(count, total - bar.n) if total else count)
        except BaseException:
            bar.leave = False
            raise


# ----------------------------------------------------------------------------- tokenizing


# (the index of a batch's first document, the batch) -> a (C, N) array per document
Encode = Callable[[int, list], list[np.ndarray]]


def _encoder(source: dict, tok: Tokenizer, dtype: str) -> Encode:
    """Documents -> arrays: [[eot, *tokens]] (1, N) of a text (empty texts give (1, 0)), or
    a conversation's row of ids and loss mask (2, row_tokens) (or (2, 0), `chat_row`)."""
    if _is_chat(source):
        return functools.partial(
            _encode_chats,
            tok,
            dtype,
            source["chat_template"],
            source["row_tokens"],
            source["dataset"],
        )
    return functools.partial(_encode_texts, tok, dtype)


def _encode_texts(tok: Tokenizer, dtype: str, first: int, texts: list[str]) -> list[np.ndarray]:
    """Each text's ids after end-of-text (1, N); `first` is `Encode`'s, unused: any text
    encodes."""
    return [np.array([[tok.eot_id, *tok.encode(t)] if t else []], dtype) for t in texts]


def _encode_chats(
    tok: Tokenizer,
    dtype: str,
    template: str,
    row_tokens: int,
    dataset: str,
    first: int,
    conversations: list[list],
) -> list[np.ndarray]:
    """`chat_row` of each conversation; a DataError names the row of `dataset` it is, from
    `first` on (a template's `raise_exception` gives only its own message)."""
    rows = []
    for index, messages in enumerate(conversations, start=first):
        try:
            rows.append(chat_row(tok, messages, template, row_tokens, dtype))
        except DataError as e:
            raise DataError(f"row {index} of dataset {dataset}: {e}") from None
    return rows


def _token_stream(
    encode: Encode, documents: Iterable, first: int, workers: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(document index, `encode`'s (C, N) array) for each document, in order."""
    batches = zip(itertools.count(first, _BATCH_DOCS), _batched(documents, _BATCH_DOCS))
    if workers == 1:
        encoded = (encode(start, batch) for start, batch in batches)
    else:
        encoded = _encode_in_pool(encode, batches, workers)
    return zip(itertools.count(first), itertools.chain.from_iterable(encoded), strict=False)


def _batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


_worker: Encode | None = None  # each worker process's encoder


def _init_worker(encode: Encode) -> None:
    global _worker
    _worker = encode


def _encode_in_worker(first: int, documents: list) -> list[np.ndarray]:
    return _worker(first, documents)


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Processes started meanwhile ignore SIGINT (SIG_IGN survives exec, and Python then
    installs no KeyboardInterrupt handler): Ctrl-C, which a terminal sends to its whole process
    group, then interrupts the caller alone, which says so in one line, rather than each worker
    too, with a traceback. A SIGINT meanwhile is held back (blocked in this thread) and
    delivered after, unless another thread that does not block it takes it first: then it is
    lost, and a second Ctrl-C interrupts. Only the main thread can set handlers; elsewhere
    nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)


def _encode_in_pool(
    encode: Encode, batches: Iterator[tuple[int, list]], workers: int
) -> Iterator[list[np.ndarray]]:
    """`encode` over `batches` (first index, documents) in worker processes, in order, with a
    bounded read-ahead."""
    # spawn, not fork: the caller may already run threads (JAX, datasets' prefetching).
    context = multiprocessing.get_context("spawn")
    with _children_ignore_sigint():
        pool = context.Pool(workers, initializer=_init_worker, initargs=(encode,))
    with pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, batch))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- sources


def is_prepared(directory: Path) -> bool:
    """Whether `directory` is one preparation wrote (or is writing)."""
    return (directory / MANIFEST).is_file() or (directory / PROGRESS).is_file()


def looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a hub name like "owner/name"."""
    local = name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1
    return local or _builder(Path(name)) is not None


def no_local_path(name: str) -> str:
    """For an error about `name` taken for a hub name: that no local file or directory of that
    name exists, where it could be a relative path meant as one (it holds a "/", as "data/book"
    does, and as hub names "owner/name" do too); else "" (a bare name is the hub's)."""
    if "/" not in name:
        return ""
    return f", and no local file or directory {name} exists in {Path.cwd()}"


def _builder(path: Path) -> str | None:
    """The `datasets` builder of a local file, by its suffix in any case (BOOK.TXT), or None."""
    return _BUILDERS.get(path.suffix.lower())


def _local_source(path: Path) -> tuple[str, list[str]]:
    """The `datasets` builder and files for a local file or directory ("disk": save_to_disk)."""
    if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
        return "disk", [str(path)]
    if is_prepared(path):
        raise DataError(
            f"dataset {path} is data `jaxpt.data.prepare` wrote (it holds {MANIFEST} or "
            f"{PROGRESS}), not a source; train on it with data.dataset={path}"
        )
    files = [path] if path.is_file() else _files_under(path, _builder)
    if not files:
        raise DataError(f"dataset {path} holds no {'/'.join(_BUILDERS)} files")
    builders = {_builder(p) for p in files}
    if None in builders:
        raise DataError(f"cannot read {path}: its type is not one of {'/'.join(_BUILDERS)}")
    if len(builders) > 1:
        raise DataError(f"dataset {path} mixes file types ({', '.join(sorted(builders))})")
    if all(p.stat().st_size == 0 for p in files):
        raise DataError(f"dataset {path} is empty")
    return builders.pop(), [str(p) for p in files]


def _fingerprint(path: Path, builder: str, files: list[str]) -> dict[str, int]:
    """A cheap fingerprint of the local source at `path` (`_local_source`'s `builder` and
    `files`): each file's name (relative to the directory, or the file's own) -> its size in
    bytes, in name order. No file is read (a large corpus costs a `stat` per file), and
    modification times are not compared: a copy, a checkout or `touch` changes them alone."""
    if builder == "disk":
        files = _files_under(path, lambda p: p.suffix in _DISK_SUFFIXES)
    root = path.parent if path.is_file() else path
    return {Path(f).relative_to(root).as_posix(): os.path.getsize(f) for f in files}


def _check_local_split(path: Path, builder: str, split: str) -> None:
    """Raises DataError unless the local source at `path` (read by `builder`) has `split`:
    `datasets` reads local files as the one split "train"; a saved DatasetDict lists its own
    (a saved Dataset is one split, read whatever `split` says)."""
    if builder != "disk":
        if split != "train":
            raise DataError(
                f"dataset {path} has one split, 'train' (local {'/'.join(_BUILDERS)} files are "
                f"read as one), not {split!r}; leave --split out"
            )
        return
    listing = path / "dataset_dict.json"
    if not listing.is_file():
        return
    splits = parse_json(listing, "save the dataset again").get("splits")
    if isinstance(splits, list) and split not in splits:
        raise DataError(
            f"dataset {path} has no split {split!r} (its splits: "
            f"{', '.join(sorted(map(str, splits)))}); pass one of them as --split"
        )


def _files_under(root: Path, kind: Callable[[Path], object]) -> list[Path]:
    """The files under the dataset directory `root` that `kind` is true of (`_builder`: the
    document files), in path order; not hidden ones, nor those in a directory a preparation
    wrote (an `--out` under `root` held its manifest and progress.json, which a re-run read as
    documents)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and kind(p) and _in_corpus(p, root))


def _in_corpus(path: Path, root: Path) -> bool:
    """Whether `path`, under `root`, is neither hidden nor in a directory a preparation wrote."""
    below = path.relative_to(root)
    return not any(part.startswith(".") for part in below.parts) and not any(
        is_prepared(root / parent) for parent in below.parents
    )


# `datasets`' file readers log each error they then raise ("Failed to load JSON from file ...",
# through its handler and absl's): the sentence that quotes the raised error says it once.
_FILE_READERS = ("json.json", "csv.csv", "parquet.parquet")


def _is_not_a_raised_read_error(record: std_logging.LogRecord) -> bool:
    return not (record.levelno == std_logging.ERROR and record.getMessage().startswith("Failed"))


def _load(source: dict, streaming: bool):
    """The `datasets` Dataset or IterableDataset that `source` names."""
    if "datasets" not in sys.modules:  # its import logs which frameworks it found (at INFO,
        std_logging.getLogger("datasets").setLevel(std_logging.WARNING)  # before its own level)
    for reader in _FILE_READERS:  # the same filter is added once
        logger = std_logging.getLogger(f"datasets.packaged_modules.{reader}")
        logger.addFilter(_is_not_a_raised_read_error)
    import datasets

    name, split = source["dataset"], source["split"]
    if Path(name).exists():
        builder, files = _local_source(Path(name))
        if builder in _TEXT_BUILDERS:
            _check_text_files(files)  # `datasets` would fail later, without the file's name
        if builder == "disk":
            ds = datasets.load_from_disk(name)
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        options = {"sample_by": "document"} if builder == "text" else {}
        if builder == "csv" and not _is_chat(source):  # the text as written, not a guessed
            # number (1.50 -> 1.5), and "NA", "null" or "None" not a missing (empty) document
            options = {"converters": {source["text_field"]: str}, "keep_default_na": False}
        return datasets.load_dataset(
            builder, data_files=files, split=split, streaming=streaming, **options
        )
    with hub_or_cache():
        return datasets.load_dataset(name, source["config_name"], split=split, streaming=streaming)


def _check_text_files(files: list[str]) -> None:
    """Raises DataError naming the first of `files` that is not UTF-8 text."""
    for name in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with open(name, "rb") as f:
            while chunk := f.read(2**22):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{name} is not UTF-8 text (byte {e.object[e.start]:#04x} near offset "
                        f"{offset + e.start}); convert it to UTF-8 (with `iconv -f latin1 -t "
                        "utf-8`, say) or move it out of the dataset"
                    ) from None
                if b"\0" in chunk:
                    raise DataError(
                        f"{name} is binary, not text (it holds NUL bytes); move it out of the "
                        "dataset"
                    )
                offset += len(chunk)
        if decoder.getstate()[0]:
            raise DataError(f"{name} is not UTF-8 text (it ends inside a character); fix its end")


def _dataset_documents(source: dict, streaming: bool, skip: int) -> Iterator:
    """`source`'s documents from index `skip` on: texts, or conversations (lists of messages)."""
    chat = _is_chat(source)
    kind = "messages" if chat else "text"
    column = source[f"{kind}_field"]
    try:
        ds = _load(source, streaming)
        for index, row in enumerate(ds.skip(skip) if skip else ds, start=skip):
            if column not in row:
                raise DataError(
                    f"dataset {source['dataset']} has no field {column!r} (its fields: "
                    f"{', '.join(row)}); pass the {kind} column's name as {kind}_field"
                )
            if chat:
                where = f"row {index} of dataset {source['dataset']}"
                yield check_messages(row[column] or [], where)
                continue
            text = row[column] or ""
            if not isinstance(text, str):
                raise DataError(f"field {column!r} of dataset {source['dataset']} is not text")
            yield text
    except DataError:
        raise
    except Exception as e:  # `datasets`, the hub and file parsers raise many kinds
        text = str(e).strip()
        cause = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(e).__name__
        name = source["dataset"]
        bad_line = _first_bad_json_line(Path(name)) if Path(name).exists() else None
        if bad_line:
            message = f"could not read dataset {name!r}: {bad_line}; fix that line or remove it"
            raise SourceError(message, cause) from e
        advice = (
            "; check that its files are whole and in their format"
            if Path(name).exists()
            else f"{no_local_path(name)}; check its name, config name and split, and the network"
        )
        raise SourceError(f"could not read dataset {name!r} ({cause}){advice}", cause) from e


def _first_bad_json_line(path: Path) -> str | None:
    """``"<file>, line <n> is not a JSON object (<why>)"`` for the first line of the local
    source `path`'s JSON files that `datasets` cannot read as a record (one object per line,
    in a file that is not one JSON document); None where there is none, or no JSON files."""
    builder, files = _local_source(path)
    for name in files if builder == "json" else []:
        if bad_line := _first_bad_line(name):
            return bad_line
    return None


def _first_bad_line(name: str) -> str | None:
    """The JSON file `name`'s first line that is not a record, as `_first_bad_json_line`
    says it; read line by line, and whole only where no record precedes it."""
    with open(name, encoding="utf-8") as lines:
        records = 0
        for number, line in enumerate(map(str.rstrip, lines), start=1):
            why = _not_a_record(line) if line else None
            if why is None:
                records += bool(line)
                continue
            whole = Path(name).read_text(encoding="utf-8") if records == 0 else ""
            if whole and _not_a_record(whole, whole=True) is None:
                return None  # one document, e.g. a list of records over many lines
            return f"{name}, line {number} is not a JSON object ({why})"
    return None


_JSON_KINDS = {list: "it is an array", str: "it is a string"}


def _not_a_record(text: str, whole: bool = False) -> str | None:
    """Why `text` is not a JSON object (`whole`, a file's text: not any JSON document), or
    None."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"column {e.colno}: {e.msg}"
    if whole or isinstance(value, dict):
        return None
    return _JSON_KINDS.get(type(value), "it is a number, true, false or null")
