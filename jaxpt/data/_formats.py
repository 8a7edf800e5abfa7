"""Data directories without a manifest: llm.c / modded-nanogpt `.bin` shards, `.npy` shards.

llm.c's dev/data scripts and kjj0/fineweb10B-gpt2 name their shards `fineweb_val_000000.bin`,
`fineweb_train_000001.bin`, ...; the original JaxPT and build-nanogpt write `.npy` arrays such
as `edufineweb_val_000000.npy` or `panchatantra_train_0.npy`. A shard's split comes from its
name (a word "train", or "val" / "valid" / "validation"), its dtype and token count from its
header. The largest token id and the end-of-text count of each shard are found by reading it
once and remembered in the cache directory, keyed by the file's path, size and modification
time; nothing is written into the data directory.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

from jaxpt.data._shards import (
    Manifest,
    NotAShard,
    Shard,
    ShardProblem,
    open_shard,
    shard_info,
    write_atomic,
)
from jaxpt.data._tokenizers import HFTokenizer, Tokenizer, get_tokenizer
from jaxpt.errors import DataError

SUFFIXES = {".bin": "llm.c", ".npy": "npy"}  # shard file suffix -> Manifest.source["format"]
_SPLIT_WORDS = {"val": "val", "valid": "val", "validation": "val", "train": "train"}
_CHUNK = 2**24  # tokens read at a time when counting


def shard_files(directory: Path) -> list[Path]:
    """The .bin and .npy files directly in `directory` (not hidden), in natural name order."""
    files = [
        p
        for p in directory.iterdir()
        if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file()
    ]
    return sorted(
        files, key=lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)]
    )


def _split_of(path: Path) -> str:
    words = re.split(r"[^a-z]+", path.stem.lower())
    splits = {_SPLIT_WORDS[w] for w in words if w in _SPLIT_WORDS}
    if len(splits) != 1:
        raise DataError(
            f"cannot tell the split of shard {path}: its name must hold the word 'train' or "
            "'val' (as in fineweb_train_000001.bin), not both or neither"
        )
    return splits.pop()


def _tokenizer(name: str, directory: Path) -> tuple[Tokenizer, dict]:
    """The tokenizer `data.tokenizer` names, and its manifest spec (files by absolute path)."""
    if name == "char":
        raise DataError(
            f"data.tokenizer='char' needs a directory prepared by `python -m jaxpt.data.prepare` "
            f"(the vocabulary is saved with the data), and {directory} holds bare shards; set "
            "data.tokenizer to 'gpt2' or the tokenizer.json the shards were made with"
        )
    tok = get_tokenizer(name)
    if isinstance(tok, HFTokenizer):  # tokenizer_for joins the directory with an absolute path
        return tok, {**tok.spec(), "file": str(tok.path.resolve())}
    return tok, tok.spec()


def _checked_info(path: Path) -> tuple[str, int]:
    try:
        return shard_info(path)
    except NotAShard as e:  # often bare tokens: nanoGPT's train.bin has no header
        raise DataError(
            f"shard {path} {e}; for bare tokens without llm.c's header (nanoGPT's train.bin), "
            "save them as a 1-D .npy array, or prepare the text with python -m jaxpt.data.prepare"
        ) from None
    except ShardProblem as e:
        raise DataError(f"shard {path} {e}; replace it with an intact copy") from None


def _count(path: Path, dtype: str, tokens: int, eot_id: int) -> dict:
    """{"max_token_id", "documents"} of a shard, reading it in chunks."""
    data = open_shard(path, dtype, tokens)
    high = low = documents = 0
    for start in range(0, tokens, _CHUNK):
        chunk = np.asarray(data[start : start + _CHUNK])
        high, low = max(high, int(chunk.max())), min(low, int(chunk.min()))
        documents += int(np.count_nonzero(chunk == eot_id))
    if low < 0:
        raise DataError(f"shard {path} holds a negative token id ({low}); it is not token data")
    return {"max_token_id": high, "documents": documents}


def _read_memo(path: Path) -> dict:
    """The remembered counts in `path`: {file name: entry}; none if it is absent or damaged."""
    try:
        known = json.loads(path.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return known if isinstance(known, dict) else {}


def _token_stats(files: list[Path], infos: list, eot_id: int, cache_dir: Path) -> list[dict]:
    """`_count` of each file, reusing the counts remembered for unchanged files."""
    directory = files[0].parent.resolve()
    memo = (
        cache_dir
        / "shard-stats"
        / f"{hashlib.sha256(str(directory).encode()).hexdigest()[:16]}.json"
    )
    known = _read_memo(memo)
    stats, changed = [], False
    for path, (dtype, tokens) in zip(files, infos, strict=True):
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, eot_id]
        entry = known.get(path.name)
        if not isinstance(entry, dict) or entry.get("stamp") != stamp:
            entry, changed = {"stamp": stamp, **_count(path, dtype, tokens, eot_id)}, True
            known[path.name] = entry
        stats.append(entry)
    if changed:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(memo, json.dumps({"directory": str(directory), "files": known}).encode())
        except OSError as e:
            print(
                f"note: could not remember shard counts in {memo} ({e.strerror})", file=sys.stderr
            )
    return stats


def read_shard_directory(directory: Path, tokenizer: str, cache_dir: Path) -> Manifest:
    """The manifest of a directory of llm.c `.bin` or `.npy` shards (`shard_files`).

    Args:
        directory: holds the shards, named with their split.
        tokenizer: `data.tokenizer`, the tokenizer the shards were made with ("gpt2" or a
            tokenizer.json path).
        cache_dir: where the shards' token counts are remembered.

    Raises:
        DataError: one sentence naming the file: a header or size that is wrong, a name without
            its split, mixed formats or dtypes, a missing split, ids beyond the tokenizer's.
    """
    files = shard_files(directory)
    formats = {SUFFIXES[p.suffix] for p in files}
    if len(formats) != 1:
        raise DataError(f"{directory} mixes .bin and .npy shards; keep one format per directory")
    splits = [_split_of(p) for p in files]
    infos = [_checked_info(p) for p in files]
    dtype = _one_dtype(directory, infos)
    _check_both_splits(directory, splits, files[0].suffix)
    tok, spec = _tokenizer(tokenizer, directory)
    stats = _token_stats(files, infos, tok.eot_id, cache_dir)
    _check_ids_fit(directory, stats, tokenizer, tok.vocab_size)
    order = sorted(range(len(files)), key=lambda i: splits[i] != "val")  # val first, stable
    shards = tuple(
        Shard(files[i].name, splits[i], infos[i][1], stats[i]["max_token_id"]) for i in order
    )
    return Manifest(
        directory=directory,
        tokenizer=spec,
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
        dtype=dtype,
        source={"dataset": str(directory), "format": formats.pop()},
        shard_tokens=max(s.tokens for s in shards),
        val_shards=splits.count("val"),
        documents=sum(s["documents"] for s in stats),
        shards=shards,
        val_tokens=sum(s.tokens for s in shards if s.split == "val"),
    )


def _one_dtype(directory: Path, infos: list[tuple[str, int]]) -> str:
    """The token dtype of every shard (`infos`: each shard's (dtype, tokens))."""
    dtypes = sorted({dtype for dtype, _ in infos})
    if len(dtypes) > 1:
        raise DataError(
            f"the shards in {directory} mix token dtypes ({', '.join(dtypes)}); use one"
        )
    return dtypes[0]


def _check_both_splits(directory: Path, splits: list[str], suffix: str) -> None:
    """Raises DataError unless the shards' `splits` hold both "val" and "train"."""
    for split in ("val", "train"):
        if split not in splits:
            raise DataError(
                f"{directory} has no {split} shard (a file named like fineweb_{split}_000000"
                f"{suffix}); add one"
            )


def _check_ids_fit(directory: Path, stats: list[dict], tokenizer: str, vocab_size: int) -> None:
    """Raises DataError if a shard holds a token id the tokenizer (`data.tokenizer`) lacks."""
    highest = max(s["max_token_id"] for s in stats)
    if highest >= vocab_size:
        raise DataError(
            f"the shards in {directory} hold token ids up to {highest} but data.tokenizer="
            f"{tokenizer!r} has {vocab_size} ids; set data.tokenizer to the tokenizer the "
            "shards were made with"
        )
