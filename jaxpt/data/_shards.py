"""Token shards on disk and the manifest that lists them.

A shard is llm.c's token file (karpathy/llm.c dev/data/data_common.py): a header of 256 int32
(magic, version, token count; magic 20240520 version 1 for uint16 tokens, 20240801 version 7
for uint32), then the tokens, little-endian. A data directory holds the
shards, `manifest.json` (written last: its presence means the preparation finished) and the
tokenizer's files (`vocab.json` for characters, `tokenizer.json` for Hugging Face).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from jaxpt.errors import DataError, DataNotFoundError

FORMAT = "jaxpt.shards.v1"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # an unfinished preparation's state (see _prepare.py)
HEADER_BYTES = 256 * 4  # (256,) int32
MAX_SHARD_TOKENS = 2**31 - 1  # the header's int32 count
_HEADERS = {"uint16": (20240520, 1), "uint32": (20240801, 7)}  # llm.c's GPT-2, Llama 3


def shard_dtype(vocab_size: int) -> str:
    """The shard dtype for ids in [0, vocab_size): uint16 when they fit, else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_atomic(path: Path, data: bytes) -> None:
    """Writes `data` under a temporary name, then renames it: `path` is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Writes `tokens` (N,) uint16/uint32 as one shard, atomically."""
    header = np.zeros(256, np.int32)
    header[:3] = *_HEADERS[tokens.dtype.name], len(tokens)
    little_endian = np.dtype(tokens.dtype.name).newbyteorder("<")
    write_atomic(path, header.astype("<i4").tobytes() + tokens.astype(little_endian).tobytes())


def _shard_problem(path: Path, dtype: str, tokens: int) -> str | None:
    """Why the shard at `path` is not `tokens` tokens of `dtype`, or None if it is."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size < HEADER_BYTES:
        return f"is truncated ({size} bytes, shorter than the header)"
    magic, version, count = np.fromfile(path, dtype="<i4", count=3)
    found = {v: k for k, v in _HEADERS.items()}.get((int(magic), int(version)))
    if found is None:
        return f"is not a token shard (header magic {magic}, version {version})"
    if found != dtype:
        return f"holds {found} tokens but the manifest says {dtype}"
    if count != tokens:
        return f"holds {count} tokens but the manifest says {tokens}"
    expected = HEADER_BYTES + tokens * np.dtype(dtype).itemsize
    if size != expected:
        damage = "truncated" if size < expected else "too long"
        return f"is {size} bytes but {tokens} {dtype} tokens take {expected}: it is {damage}"
    return None


def shard_is_complete(path: Path, dtype: str, tokens: int) -> bool:
    """Whether `path` is a whole shard of `tokens` tokens of `dtype`."""
    return _shard_problem(path, dtype, tokens) is None


def open_shard(path: Path, dtype: str, tokens: int) -> np.memmap:
    """The tokens (N,) of a validated shard, memory-mapped read-only."""
    problem = _shard_problem(path, dtype, tokens)
    if problem is not None:
        error = DataNotFoundError if problem == "is missing" else DataError
        raise error(f"shard {path} {problem}; prepare the data again (re-run the prepare command)")
    return np.memmap(
        path,
        dtype=np.dtype(dtype).newbyteorder("<"),
        mode="r",
        offset=HEADER_BYTES,
        shape=(tokens,),
    )


@dataclasses.dataclass(frozen=True)
class Shard:
    """One shard file of a data directory."""

    file: str  # name inside the data directory, e.g. "train_000001.bin"
    split: str  # "val" or "train"
    tokens: int
    max_token_id: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A finished data directory: its tokenizer, token dtype, where the text came from, shards."""

    directory: Path  # where manifest.json was read from (not stored in the file)
    tokenizer: dict  # Tokenizer.spec(): {"kind": "gpt2" | "char" | "hf", ...}
    vocab_size: int
    eot_id: int
    dtype: str  # "uint16" | "uint32"
    source: dict  # what was prepared: {"dataset": ..., ...}
    shard_tokens: int  # tokens per shard (the last one may hold fewer)
    val_shards: int  # the first val_shards shards form the "val" split
    documents: int
    shards: tuple[Shard, ...]

    @property
    def max_token_id(self) -> int:
        """The largest token id in the data."""
        return max(s.max_token_id for s in self.shards)

    def split(self, name: str) -> tuple[Shard, ...]:
        """The shards of split `name` ("val" or "train"), in stream order."""
        return tuple(s for s in self.shards if s.split == name)

    def tokens(self, split: str | None = None) -> int:
        """Tokens in `split`, or in all shards."""
        return sum(s.tokens for s in self.shards if split in (None, s.split))

    def to_json(self) -> dict:
        """The manifest.json object (with per-split totals for people reading it)."""
        obj = {k: v for k, v in dataclasses.asdict(self).items() if k != "directory"}
        shards = obj.pop("shards")
        splits = sorted({s.split for s in self.shards}, reverse=True)  # val, train
        obj["tokens"] = {split: self.tokens(split) for split in splits}
        obj["max_token_id"] = self.max_token_id
        return {"format": FORMAT, **obj, "shards": shards}


def manifest_from_json(directory: Path, obj: dict) -> Manifest:
    """The Manifest of a manifest.json object read from `directory`."""
    if obj.get("format") != FORMAT:
        raise DataError(
            f"{directory / MANIFEST} is not a {FORMAT} manifest (format {obj.get('format')!r}); "
            "prepare the data again with this version of jaxpt"
        )
    fields = {f.name for f in dataclasses.fields(Manifest)} - {"directory", "shards"}
    shards = tuple(Shard(**s) for s in obj["shards"])
    return Manifest(directory=directory, shards=shards, **{k: obj[k] for k in fields})


def save_manifest(manifest: Manifest) -> None:
    """Writes manifest.json into the manifest's directory, atomically."""
    text = json.dumps(manifest.to_json(), indent=1)
    write_atomic(manifest.directory / MANIFEST, text.encode())


def load_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of a prepared data directory, after checking every shard's header and size.

    Raises:
        DataNotFoundError: `directory` or its manifest.json is missing, or a shard is.
        DataError: a shard is truncated, has another dtype or count than the manifest says.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise DataNotFoundError(
            f"data directory {directory} does not exist; run `python -m jaxpt.data.prepare "
            f"--dataset=<source> --out={directory}` to make it"
        )
    if not path.is_file() and (directory / PROGRESS).is_file():
        raise DataError(
            f"the preparation of {directory} did not finish; re-run the prepare command that "
            "started it to resume"
        )
    if not path.is_file():
        raise DataNotFoundError(
            f"{directory} is not a prepared data directory (no {MANIFEST}); run "
            f"`python -m jaxpt.data.prepare --dataset=<source> --out={directory}` first"
        )
    manifest = manifest_from_json(directory, json.loads(path.read_text()))
    for s in manifest.shards:
        open_shard(directory / s.file, manifest.dtype, s.tokens)
    return manifest
