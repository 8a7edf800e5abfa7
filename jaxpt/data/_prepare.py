"""Corpus preparation: documents from a `datasets` source -> end-of-text separated token shards.

Documents are tokenized in worker processes, each prefixed with the end-of-text id, and the
token stream is cut into shards of `shard_tokens` tokens; the first `val_shards` shards form the
"val" split, the rest "train". After each shard, progress.json records where the next shard
starts (document index, token offset in it), so a re-run skips finished shards and resumes
there; manifest.json is written last and its presence means the preparation finished.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from absl import logging

from jaxpt.data._shards import (
    MANIFEST,
    MAX_SHARD_TOKENS,
    PROGRESS,
    Manifest,
    Shard,
    load_manifest,
    save_manifest,
    shard_dtype,
    shard_is_complete,
    write_atomic,
    write_shard,
)
from jaxpt.data._tokenizers import CharTokenizer, Tokenizer, get_tokenizer
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
_BATCH_DOCS = 64  # documents per task sent to a worker process

Documents = Callable[[int], Iterable[str]]  # skip -> the texts of documents skip, skip + 1, ...


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
    workers: int | None = None,
    streaming: bool = True,
    progress: bool = True,
) -> Manifest:
    """Tokenizes a dataset into shards under `out` (resuming an interrupted run there).

    Args:
        dataset: a Hugging Face hub name (the CLI's default is DEFAULT_DATASET, FineWeb-Edu
            sample-10BT), or a local file or directory of .txt/.md (one document
            per file), .json/.jsonl/.parquet/.csv (one per row) files, or a `save_to_disk` dir.
        out: the data directory to write.
        tokenizer: "gpt2", "char" (vocabulary built from the corpus), or a tokenizer.json path.
        config_name: the hub dataset's config; None picks "sample-10BT" for FineWeb-Edu.
        split: the split to read (local files have only "train").
        text_field: the column holding each document's text.
        shard_tokens: tokens per shard; the last shard holds the rest.
        val_shards: how many leading shards form the "val" split.
        workers: tokenizer processes (default: one per CPU).
        streaming: read the source lazily instead of first converting it to Arrow.
        progress: show a progress bar with tokens/s.

    Returns:
        The manifest of the finished data directory.
    """
    path = Path(dataset).expanduser()
    if path.exists():
        _local_source(path)  # fails early, before anything is written
        dataset, config_name = str(path.resolve()), None
    elif _looks_like_path(dataset):
        raise DataNotFoundError(f"dataset {dataset!r} does not exist (no such file or directory)")
    source = {
        "dataset": dataset,
        "config_name": config_name or _DEFAULT_CONFIG_NAMES.get(dataset),
        "split": split,
        "text_field": text_field,
        "tokenizer": resolve_tokenizer_name(tokenizer),
    }
    documents = functools.partial(_dataset_documents, source, streaming)
    workers = (os.cpu_count() or 1) if workers is None else workers
    return prepare_documents(documents, source, out, shard_tokens, val_shards, workers, progress)


def prepare_documents(
    documents: Documents,
    source: dict,
    out: str | os.PathLike,
    shard_tokens: int,
    val_shards: int,
    workers: int,
    progress: bool,
) -> Manifest:
    """Tokenizes `documents(0)` with `source["tokenizer"]` into shards under `out`.

    `documents(n)` must yield the same texts on every call, from document n on; `source`
    describes them (it goes into the manifest, and a re-run resumes only if it is unchanged).
    """
    _check_arguments(shard_tokens, val_shards, workers)
    out = Path(out)
    settings = {"source": source, "shard_tokens": shard_tokens, "val_shards": val_shards}
    finished = _finished(out, settings)
    if finished is not None:
        return finished
    records = _resumable_records(out, settings)
    tok = _tokenizer(source, documents, out if records else None)
    start_doc, start_offset = records[-1]["end"] if records else (0, 0)
    writer = _ShardWriter(out, tok, settings, records)
    stream = _token_stream(tok, documents(start_doc), start_doc, workers)
    docs = start_doc
    for doc, tokens in _progress_bar(stream, writer.tokens, progress, out.name):
        writer.add(tokens, doc, start_offset if doc == start_doc else 0)
        docs = doc + 1
    writer.finish(docs)
    if not writer.records:
        raise DataError(f"dataset {source['dataset']} is empty ({docs} documents, no text)")
    manifest = writer.manifest(docs)
    save_manifest(manifest)
    (out / PROGRESS).unlink()
    return manifest


def _check_arguments(shard_tokens: int, val_shards: int, workers: int) -> None:
    for name, value, least in (
        ("shard_tokens", shard_tokens, 1),
        ("val_shards", val_shards, 0),
        ("workers", workers, 1),
    ):
        if value < least:
            raise DataError(f"{name} must be at least {least}, got {value}")
    if shard_tokens > MAX_SHARD_TOKENS:
        raise DataError(f"shard_tokens must be at most {MAX_SHARD_TOKENS}, got {shard_tokens}")


def resolve_tokenizer_name(name: str) -> str:
    """The tokenizer argument as recorded: "gpt2", "char", or an absolute path."""
    if name in ("gpt2", "char"):
        return name
    get_tokenizer(name)  # a clear error now if it does not exist
    return str(Path(name).resolve())


def _tokenizer(source: dict, documents: Documents, saved_in: Path | None) -> Tokenizer:
    """The source's tokenizer; "char" loads the vocabulary saved in `saved_in` or builds it."""
    if source["tokenizer"] != "char":
        return get_tokenizer(source["tokenizer"])
    if saved_in is not None:
        return CharTokenizer.load(saved_in)
    try:
        return CharTokenizer.from_texts(documents(0))
    except DataError:
        raise DataError(f"dataset {source['dataset']} is empty (no text)") from None


def _finished(out: Path, settings: dict) -> Manifest | None:
    """The manifest already in `out` if it was prepared with `settings`."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file, not a directory")
    if not (out / MANIFEST).is_file():
        return None
    manifest = load_manifest(out)
    _check_settings(out, settings, _settings_of(manifest))
    logging.info("%s is already prepared; nothing to do", out)
    return manifest


def _settings_of(manifest: Manifest) -> dict:
    keys = ("source", "shard_tokens", "val_shards")
    return {k: getattr(manifest, k) for k in keys}


def _check_settings(out: Path, wanted: dict, found: dict) -> None:
    if wanted != found:
        diff = ", ".join(k for k in wanted if wanted[k] != found.get(k))
        raise DataError(
            f"{out} already holds data prepared with other settings ({diff} differ); "
            "choose another output directory or delete it"
        )


def _resumable_records(out: Path, settings: dict) -> list[dict]:
    """The records of the finished shards of an interrupted run into `out` (leading, intact)."""
    path = out / PROGRESS
    if not path.is_file():
        return []
    state = json.loads(path.read_text())
    _check_settings(out, settings, state["settings"])
    records = list(
        itertools.takewhile(
            lambda r: shard_is_complete(out / r["file"], state["dtype"], r["tokens"]),
            state["shards"],
        )
    )
    logging.info("resuming %s: %d finished shards are kept", out, len(records))
    return records


class _ShardWriter:
    """Cuts the token stream into shards; after each, records where the next one starts."""

    def __init__(self, out: Path, tok: Tokenizer, settings: dict, records: list[dict]) -> None:
        self.out, self.tok, self.settings, self.records = out, tok, settings, records
        self.dtype = shard_dtype(tok.vocab_size)
        self.buffer = np.empty(settings["shard_tokens"], self.dtype)  # (shard_tokens,)
        self.fill = 0

    @property
    def tokens(self) -> int:
        """Tokens in finished shards."""
        return sum(r["tokens"] for r in self.records)

    def add(self, tokens: np.ndarray, doc: int, start: int) -> None:
        """Appends tokens[start:] of document `doc` (N,), writing every shard that fills up."""
        pos = start
        while pos < len(tokens):
            take = min(len(tokens) - pos, len(self.buffer) - self.fill)
            self.buffer[self.fill : self.fill + take] = tokens[pos : pos + take]
            self.fill, pos = self.fill + take, pos + take
            if self.fill == len(self.buffer):
                self._write((doc, pos) if pos < len(tokens) else (doc + 1, 0))

    def finish(self, docs: int) -> None:
        """Writes the last, partial shard; `docs` documents have been read."""
        if self.fill:
            self._write((docs, 0))

    def manifest(self, docs: int) -> Manifest:
        """The manifest of the shards written."""
        keys = ("file", "split", "tokens", "max_token_id")
        return Manifest(
            directory=self.out,
            tokenizer=self.tok.spec(),
            vocab_size=self.tok.vocab_size,
            eot_id=self.tok.eot_id,
            dtype=self.dtype,
            documents=docs,
            shards=tuple(Shard(**{k: r[k] for k in keys}) for r in self.records),
            **self.settings,
        )

    def _write(self, end: tuple[int, int]) -> None:
        index = len(self.records)
        if index == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.tok.save(self.out)
        split = "val" if index < self.settings["val_shards"] else "train"
        tokens = self.buffer[: self.fill]
        name = f"{split}_{index:06d}.bin"
        write_shard(self.out / name, tokens)
        record = {
            "file": name,
            "split": split,
            "tokens": self.fill,
            "max_token_id": int(tokens.max()),
            "end": list(end),
        }
        self.records.append(record)
        state = {"settings": self.settings, "dtype": self.dtype, "shards": self.records}
        write_atomic(self.out / PROGRESS, json.dumps(state, indent=1).encode())
        self.fill = 0


def _progress_bar(stream: Iterator, initial: int, enabled: bool, name: str) -> Iterator:
    """Passes `stream` through, counting its tokens on a tqdm bar (tokens/s)."""
    from tqdm import tqdm

    with tqdm(desc=name, unit="tok", unit_scale=True, initial=initial, disable=not enabled) as bar:
        for doc, tokens in stream:
            yield doc, tokens
            bar.update(len(tokens))


# ----------------------------------------------------------------------------- tokenizing


def _token_stream(
    tok: Tokenizer, texts: Iterable[str], first: int, workers: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(document index, [eot, *tokens] (N,)) for each text, in order; empty texts give (0,)."""
    dtype = shard_dtype(tok.vocab_size)
    batches = _batched(texts, _BATCH_DOCS)
    if workers == 1:
        encoded = (_encode(tok, dtype, batch) for batch in batches)
    else:
        encoded = _encode_in_pool(tok, dtype, batches, workers)
    return zip(itertools.count(first), itertools.chain.from_iterable(encoded), strict=False)


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _encode(tok: Tokenizer, dtype: str, texts: list[str]) -> list[np.ndarray]:
    return [np.array([tok.eot_id, *tok.encode(t)] if t else [], dtype) for t in texts]


_worker: tuple[Tokenizer, str] | None = None  # each worker process's (tokenizer, dtype)


def _init_worker(tok: Tokenizer, dtype: str) -> None:
    global _worker
    _worker = (tok, dtype)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _encode(*_worker, texts)


def _encode_in_pool(
    tok: Tokenizer, dtype: str, batches: Iterator[list[str]], workers: int
) -> Iterator[list[np.ndarray]]:
    """_encode over `batches` in worker processes, in order, with a bounded read-ahead."""
    # spawn, not fork: the caller may already run threads (JAX, datasets' prefetching).
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tok, dtype)) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- sources


def _looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a hub name like "owner/name"."""
    return name.startswith(("/", ".", "~")) or Path(name).suffix in _BUILDERS or name.count("/") > 1


def _local_source(path: Path) -> tuple[str, list[str]]:
    """The `datasets` builder and files for a local file or directory ("disk": save_to_disk)."""
    if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
        return "disk", [str(path)]
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix in _BUILDERS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    if not files:
        raise DataError(f"dataset {path} holds no {'/'.join(_BUILDERS)} files")
    builders = {_BUILDERS.get(p.suffix) for p in files}
    if None in builders:
        raise DataError(f"cannot read {path}: its type is not one of {'/'.join(_BUILDERS)}")
    if len(builders) > 1:
        raise DataError(f"dataset {path} mixes file types ({', '.join(sorted(builders))})")
    if all(p.stat().st_size == 0 for p in files):
        raise DataError(f"dataset {path} is empty")
    return builders.pop(), [str(p) for p in files]


def _load(source: dict, streaming: bool):
    """The `datasets` Dataset or IterableDataset that `source` names."""
    import datasets

    name, split = source["dataset"], source["split"]
    if Path(name).exists():
        builder, files = _local_source(Path(name))
        if builder == "disk":
            ds = datasets.load_from_disk(name)
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        options = {"sample_by": "document"} if builder == "text" else {}
        return datasets.load_dataset(
            builder, data_files=files, split=split, streaming=streaming, **options
        )
    return datasets.load_dataset(name, source["config_name"], split=split, streaming=streaming)


def _dataset_documents(source: dict, streaming: bool, skip: int) -> Iterator[str]:
    """The texts of `source`'s documents from index `skip` on."""
    try:
        ds = _load(source, streaming)
    except DataError:
        raise
    except Exception as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"could not load dataset {source['dataset']!r} ({cause}); check its name, config "
            "name and split, and the network"
        ) from e
    field = source["text_field"]
    for row in ds.skip(skip) if skip else ds:
        if field not in row:
            raise DataError(
                f"dataset {source['dataset']} has no field {field!r} (its fields: "
                f"{', '.join(row)}); pass the text column's name as text_field"
            )
        text = row[field] or ""
        if not isinstance(text, str):
            raise DataError(f"field {field!r} of dataset {source['dataset']} is not text")
        yield text
