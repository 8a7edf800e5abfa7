"""The data a run's config names, prepared on first use.

`data.dataset` is "embedded" (the embedded corpus, `_embedded.py`), a directory (prepared by
`python -m jaxpt.data.prepare`, or bare llm.c `.bin` / `.npy` shards, `_formats.py`), or a
Hugging Face hub name. A hub dataset is prepared the first time a run needs it, into
`<cache>/<name>-<config>-<tokenizer>-val<V>`, streamed from the hub (nothing else is
downloaded) and only as far as the run reads: the V tokens of the validation split its
evaluation reads, then the training tokens of `train.steps` batches (or `data.max_tokens` in
all). A later run that reads more extends the cache where it stopped, and since the stream is
deterministic, any first part of the cache is what a preparation of just that many tokens
writes: each run reads the first tokens it needs (its manifest's `max_tokens`), whatever other
runs have added.

Processes that share the cache directory (a host's processes, or every host on a shared
filesystem) take turns under a file lock: the first prepares, the others wait and then find the
data there. Hosts with their own disks each prepare their own copy, the same bytes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Protocol

from jaxpt.data._embedded import EMBEDDED, prepare_embedded
from jaxpt.data._formats import read_shard_directory, shard_files
from jaxpt.data._loader import TokenNeed
from jaxpt.data._prepare import (
    SourceError,
    dataset_source,
    is_prepared,
    looks_like_path,
    no_local_path,
    prepare_source,
)
from jaxpt.data._shards import MANIFEST, Manifest, load_manifest
from jaxpt.data._tokenizers import Tokenizer, get_tokenizer, tokenizer_for, tokenizer_key
from jaxpt.errors import DataError, DataNotFoundError

CACHE_SHARD_TOKENS = 2**24  # tokens per shard of a hub dataset's cache (32 MiB of uint16)
_SERIAL_TOKENS = 2**22  # below this, one process tokenizes before a pool of them has started


class DataConfig(Protocol):
    """The fields of a run config's `data` section that choose its data."""

    dataset: str  # "embedded", a data directory, or a Hugging Face hub name
    tokenizer: str  # "gpt2", "char", or a tokenizer.json path
    max_tokens: int  # hub datasets: tokens to prepare and read; 0 or -1: what the run needs


def default_cache_dir() -> Path:
    """$JAXPT_CACHE_DIR, else $XDG_CACHE_HOME/jaxpt, else ~/.cache/jaxpt."""
    if os.environ.get("JAXPT_CACHE_DIR"):
        return Path(os.environ["JAXPT_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "jaxpt"


def ensure_prepared(
    data_config: DataConfig,
    cache_dir: str | os.PathLike | None = None,
    *,
    need: TokenNeed | None = None,
) -> Manifest:
    """The manifest of the data a run reads, preparing it if needed.

    Args:
        data_config: `dataset` and `tokenizer` choose the data (see the module docstring);
            `max_tokens` > 0 sets how much of a hub dataset to prepare and read.
        cache_dir: where the embedded corpus and hub datasets are prepared and bare shards'
            token counts remembered (default: `default_cache_dir()`).
        need: the tokens the run reads (`tokens_needed`); without it a hub dataset is not
            prepared, and DataNotFoundError says so.

    Raises:
        DataNotFoundError: a directory that does not exist or holds no data, a
            `data.tokenizer` that names no tokenizer.
        DataError: a damaged manifest or shard, a tokenizer that does not match, a hub dataset
            that cannot be streamed (offline, say) where the cache lacks what the run reads.
    """
    dataset, tokenizer, max_tokens = (
        data_config.dataset,
        data_config.tokenizer,
        data_config.max_tokens,
    )
    if not dataset:  # Path("") is the current directory
        raise DataError(
            "data.dataset is empty; name a data directory or a hub dataset, or use "
            "data.dataset='embedded'"
        )
    cache_dir = Path(cache_dir or default_cache_dir())
    path = Path(dataset).expanduser()
    # the char vocabulary comes with its data, and prepared data keeps a copy of its tokenizer
    if tokenizer != "char" and not is_prepared(path):
        _named_tokenizer(tokenizer)
    hub = dataset != EMBEDDED and not path.exists() and not looks_like_path(dataset)
    if max_tokens < -1 or (max_tokens > 0 and not hub):
        raise DataError(
            f"data.max_tokens={max_tokens} must be 0 or -1 (what the run reads), or a token "
            "count for a hub dataset prepared on first use; set it to 0"
        )
    if dataset == EMBEDDED:
        return prepare_embedded(cache_dir, tokenizer)
    if hub:
        return _hub_manifest(dataset, tokenizer, max_tokens, need, cache_dir)
    try:
        manifest = _directory_manifest(path, dataset, tokenizer, cache_dir)
    except DataError as e:
        raise type(e)(f"data.dataset={dataset!r}: {e}") from None
    _check_tokenizer(manifest, dataset, tokenizer)
    return manifest


def _directory_manifest(path: Path, dataset: str, tokenizer: str, cache_dir: Path) -> Manifest:
    if is_prepared(path):
        return load_manifest(path)
    if path.is_dir() and shard_files(path):
        return read_shard_directory(path, tokenizer, cache_dir)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        problem = "does not exist" if not path.exists() else f"holds no {MANIFEST} and no shards"
        prepare = f"--dataset=<source> --out={dataset}` to prepare a source there"
    else:  # the user's files, which prepare reads but never writes among
        problem = "is a file" if path.is_file() else f"holds no {MANIFEST} and no shards"
        prepare = f"--dataset={dataset} --out=<new dir>` and set data.dataset=<new dir>"
    raise DataNotFoundError(
        f"{path} {problem}; run `python -m jaxpt.data.prepare {prepare}, point data.dataset at "
        "a directory of llm.c .bin or .npy shards, or use data.dataset='embedded'"
    )


def _check_tokenizer(manifest: Manifest, dataset: str, tokenizer: str) -> None:
    wanted = tokenizer if tokenizer in ("gpt2", "char") else "hf"
    if manifest.tokenizer["kind"] != wanted:
        raise DataError(
            f"data.dataset={dataset!r} was prepared with the {manifest.tokenizer['kind']} "
            f"tokenizer but data.tokenizer is {tokenizer!r}; make them match"
        )


def _hub_manifest(
    dataset: str, tokenizer: str, max_tokens: int, need: TokenNeed | None, cache_dir: Path
) -> Manifest:
    """The first `max_tokens` (else `need`'s) tokens of a hub dataset, prepared in the cache."""
    if tokenizer == "char":
        raise DataError(
            f"data.tokenizer='char' builds its vocabulary from a whole corpus, which preparing "
            f"data.dataset={dataset!r} on first use does not read{no_local_path(dataset)}; "
            "prepare it with `python -m jaxpt.data.prepare --tokenizer=char` and set "
            "data.dataset to that directory"
        )
    if need is None:
        raise DataNotFoundError(
            f"data.dataset={dataset!r} is a hub dataset, prepared when a run trains on it"
        )
    budget = max_tokens if max_tokens > 0 else need.val + need.train
    least = need.val + need.first_step
    if budget < least:
        raise DataError(
            f"data.max_tokens={max_tokens} is fewer tokens than the {need.val} validation "
            f"tokens that eval.batches reads and the {need.first_step} of the first training "
            f"batch; raise it to at least {least}, or set it to 0 (the {need.val + need.train} "
            "tokens the run reads)"
        )
    source = dataset_source(dataset, tokenizer)
    out = cache_dir / _cache_name(source, need.val)
    workers = 1 if budget <= _SERIAL_TOKENS else None
    try:
        manifest = prepare_source(source, out, CACHE_SHARD_TOKENS, need.val, budget, workers)
    except SourceError as e:
        raise DataError(
            f"data.dataset={dataset!r} is not prepared in {out} and could not be streamed from "
            f"the hub ({e.cause}){no_local_path(dataset)}; connect to the network, or run "
            f"`python -m jaxpt.data.prepare --dataset={dataset} --out=<dir>` where the hub is "
            "reachable and set data.dataset=<dir>, or use data.dataset='embedded'"
        ) from None
    except OSError as e:
        raise DataError(
            f"cannot prepare data.dataset={dataset!r} in {out} ({e.strerror}); free space there "
            "or set JAXPT_CACHE_DIR to a writable directory with room"
        ) from None
    if not manifest.tokens("train"):
        raise DataError(
            f"data.dataset={dataset!r} holds only {manifest.tokens()} tokens, no more than the "
            f"{need.val} validation tokens that eval.batches reads; lower eval.batches"
        )
    return dataclasses.replace(manifest, max_tokens=budget)


def _cache_name(source: dict, val_tokens: int) -> str:
    """The cache directory's name: dataset, config, tokenizer and validation split size."""
    parts = (
        source["dataset"].replace("/", "--"),
        source["config_name"],
        tokenizer_key(source["tokenizer"]),
        f"val{val_tokens}",
    )
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(p for p in parts if p))


def run_tokenizer(data_config: DataConfig) -> Tokenizer:
    """The tokenizer a run's data was prepared with (the char vocabulary lives there), or
    ``data.tokenizer`` by name when the data directory is not on this machine."""
    try:
        return tokenizer_for(ensure_prepared(data_config))
    except DataNotFoundError:
        return _named_tokenizer(data_config.tokenizer)


def _named_tokenizer(name: str) -> Tokenizer:
    """The tokenizer ``data.tokenizer`` names; a DataError about it names the field."""
    try:
        return get_tokenizer(name)
    except DataError as e:
        raise type(e)(f"data.tokenizer={name!r}: {e}") from None
