"""Token shards on disk and the manifest that lists them.

A shard is llm.c's token file (karpathy/llm.c dev/data/data_common.py): a header of 256 int32
(magic, version, token count; magic 20240520 version 1 for uint16 tokens, 20240801 version 7
for uint32), then the tokens, little-endian; or a NumPy `.npy` file holding a 1-D integer array
(the original JaxPT's shards). A prepared data directory holds llm.c shards, `manifest.json`
(written last: its presence means the preparation finished), `progress.json` (where each shard
starts in the source, kept so a later run can resume, extend or repair it) and the tokenizer's
files (`vocab.json` for characters, `tokenizer.json` for Hugging Face). Chat data (prepared
with `--format=chat`) is rows of `row_tokens` tokens, one conversation each, and beside each
shard a mask shard of the same dtype and length (`mask_file`): 1 where the token is one the
loss counts (the assistant's), 0 elsewhere.
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
_DTYPE_OF_MAGIC = {magic: dtype for dtype, (magic, _) in _HEADERS.items()}
FOREIGN_FORMATS = ("llm.c", "npy")  # Manifest.source["format"] of a directory read without one


def shard_dtype(vocab_size: int) -> str:
    """The shard dtype for ids in [0, vocab_size): uint16 when they fit, else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def mask_file(file: str) -> str:
    """The loss-mask shard beside token shard `file`: train_000001.bin -> train_000001.mask.bin."""
    path = Path(file)
    return path.stem + ".mask" + path.suffix


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


class ShardProblem(DataError):
    """A shard file that cannot be read as it says (its text lacks the file's name)."""


class NotAShard(ShardProblem):
    """A .bin file without llm.c's header (bare tokens, such as nanoGPT's train.bin)."""


def _size_problem(size: int, offset: int, tokens: int, dtype: np.dtype) -> None:
    expected = offset + tokens * dtype.itemsize
    if size != expected:
        damage = "truncated" if size < expected else "too long"
        raise ShardProblem(
            f"is {size} bytes but {tokens} {dtype.name} tokens after its header take "
            f"{expected}: it is {damage}"
        )


def _llmc_info(path: Path, size: int) -> tuple[str, int]:
    if size < HEADER_BYTES:
        raise ShardProblem(
            f"is truncated ({size} bytes, shorter than llm.c's {HEADER_BYTES}-byte header)"
        )
    magic, version, count = (int(v) for v in np.fromfile(path, dtype="<i4", count=3))
    dtype = _DTYPE_OF_MAGIC.get(magic)
    if dtype is None:
        raise NotAShard(
            f"is not a token shard (header magic {magic}, version {version}; llm.c's are "
            f"{_HEADERS['uint16'][0]} for uint16 and {_HEADERS['uint32'][0]} for uint32 tokens)"
        )
    if version != _HEADERS[dtype][1]:
        raise ShardProblem(
            f"has header version {version}, but llm.c's {dtype} shards (magic {magic}) are "
            f"version {_HEADERS[dtype][1]}"
        )
    if count < 0:
        raise ShardProblem(f"has a negative token count ({count}) in its header")
    _size_problem(size, HEADER_BYTES, count, np.dtype(dtype))
    return dtype, count


def _npy_layout(path: Path) -> tuple[np.dtype, tuple, int]:
    """(dtype, shape, data offset) from a .npy file's header."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                version, np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(f)
        except ValueError as e:
            raise ShardProblem(f"is not a readable .npy file ({e})") from None
        return dtype, shape, f.tell()


def _npy_info(path: Path, size: int) -> tuple[str, int]:
    dtype, shape, offset = _npy_layout(path)
    if len(shape) != 1 or dtype.kind not in "iu":
        raise ShardProblem(
            f"holds a {dtype.name} array of shape {shape}, not a 1-D array of integer token ids"
        )
    _size_problem(size, offset, shape[0], dtype)
    return dtype.name, shape[0]


def shard_info(path: Path) -> tuple[str, int]:
    """(dtype, token count) of the shard at `path` (.npy, else llm.c), checked against its size.

    Raises:
        ShardProblem: the file is missing, or its header or size is wrong.
    """
    if not path.is_file():
        raise ShardProblem("is missing")
    size = path.stat().st_size
    return _npy_info(path, size) if path.suffix == ".npy" else _llmc_info(path, size)


def _shard_problem(path: Path, dtype: str, tokens: int) -> str | None:
    """Why the shard at `path` is not `tokens` tokens of `dtype`, or None if it is."""
    try:
        found, count = shard_info(path)
    except ShardProblem as e:
        return str(e)
    if found != dtype:
        return f"holds {found} tokens but the manifest says {dtype}"
    if count != tokens:
        return f"holds {count} tokens but the manifest says {tokens}"
    return None


def shard_is_complete(path: Path, dtype: str, tokens: int) -> bool:
    """Whether `path` is a whole shard of `tokens` tokens of `dtype`."""
    return _shard_problem(path, dtype, tokens) is None


def open_shard(
    path: Path, dtype: str, tokens: int, advice: str = "prepare the data again"
) -> np.ndarray:
    """The tokens (N,) of a validated shard, memory-mapped read-only.

    Raises:
        DataNotFoundError / DataError: the shard is missing / not `tokens` tokens of `dtype`;
            the sentence ends with `advice`.
    """
    problem = _shard_problem(path, dtype, tokens)
    if problem is not None:
        error = DataNotFoundError if problem == "is missing" else DataError
        raise error(f"shard {path} {problem}; {advice}")
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r")
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
    """A data directory: its tokenizer, token dtype, where the text came from, shards.

    The data is the first `max_tokens` tokens of the shards' stream (all of them when 0): a
    run that reads part of a larger prepared cache gets a manifest with its own `max_tokens`.
    """

    directory: Path  # where manifest.json was read from (not stored in the file)
    tokenizer: dict  # Tokenizer.spec(): {"kind": "gpt2" | "char" | "hf", ...}
    vocab_size: int
    eot_id: int
    dtype: str  # "uint16" | "uint32" (or a .npy directory's integer dtype)
    source: dict  # what was prepared: {"dataset": ..., ...}
    shard_tokens: int  # tokens per shard (the last one may hold fewer)
    val_shards: int  # the first val_shards shards form the "val" split
    documents: int
    shards: tuple[Shard, ...]
    val_tokens: int = 0  # the stream's first val_tokens tokens form the "val" split
    max_tokens: int = 0  # the data is the stream's first max_tokens tokens; 0: all
    # Chat data: rows of row_tokens tokens (one conversation each, padded) with loss-mask
    # shards beside the token shards; 0: a plain token stream, no masks.
    row_tokens: int = 0

    @property
    def max_token_id(self) -> int:
        """The largest token id in the data."""
        return max(s.max_token_id for s in self.shards)

    def split(self, name: str) -> tuple[Shard, ...]:
        """The shards of split `name` ("val" or "train"), in stream order."""
        return tuple(s for s in self.shards if s.split == name)

    def tokens(self, split: str | None = None) -> int:
        """Tokens in `split`, or in all shards, within the first `max_tokens` of the stream."""
        total = start = 0
        for s in self.shards:
            end = start + s.tokens
            used = s.tokens if not self.max_tokens else max(0, min(end, self.max_tokens) - start)
            total += used if split in (None, s.split) else 0
            start = end
        return total

    def open(self, shard: Shard) -> np.ndarray:
        """The tokens (N,) of `shard`, memory-mapped, after checking its header and size."""
        return open_shard(self.directory / shard.file, self.dtype, shard.tokens, self.repair_advice)

    def open_mask(self, shard: Shard) -> np.ndarray:
        """The loss mask (N,) of `shard` of chat data (`row_tokens` > 0), memory-mapped."""
        path = self.directory / mask_file(shard.file)
        return open_shard(path, self.dtype, shard.tokens, self.repair_advice)

    @property
    def repair_advice(self) -> str:
        """What to do about a damaged shard of this directory."""
        if self.source.get("format") in FOREIGN_FORMATS:
            return "replace it with an intact copy"
        return (
            f"re-run the `python -m jaxpt.data.prepare` command that wrote {self.directory} "
            "(it rewrites damaged shards)"
        )

    def to_json(self) -> dict:
        """The manifest.json object (with per-split totals for people reading it)."""
        obj = {k: v for k, v in dataclasses.asdict(self).items() if k != "directory"}
        shards = obj.pop("shards")
        splits = sorted({s.split for s in self.shards}, reverse=True)  # val, train
        obj["tokens"] = {split: self.tokens(split) for split in splits}
        obj["max_token_id"] = self.max_token_id
        return {"format": FORMAT, **obj, "shards": shards}


_FIELD_TYPES = {  # manifest.json's fields and their JSON types
    "tokenizer": dict,
    "vocab_size": int,
    "eot_id": int,
    "dtype": str,
    "source": dict,
    "shard_tokens": int,
    "val_shards": int,
    "documents": int,
    "shards": list,
}
_SHARD_TYPES = {"file": str, "split": str, "tokens": int, "max_token_id": int}


def parse_json(path: Path, what: str) -> dict:
    """The JSON object in `path`; a file that is empty, truncated or not JSON raises DataError.

    `what` ends the error's sentence: what to do about it.
    """
    text = path.read_bytes()
    try:
        obj = json.loads(text)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        reason = "it is empty" if not text.strip() else f"it is not valid JSON: {e}"
        raise DataError(f"{path} cannot be read ({reason}); {what}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} cannot be read (it holds a JSON {type(obj).__name__}); {what}")
    return obj


def _field_problem(obj: dict, types: dict) -> str | None:
    for name, kind in types.items():
        value = obj.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"field {name!r} is missing or not a JSON {kind.__name__}"
    return None


def _manifest_problem(obj: dict) -> str | None:
    """What makes `obj` not a manifest, or None."""
    if obj.get("format") != FORMAT:
        return f"its format is {obj.get('format')!r}, not {FORMAT!r}"
    optional = {k: int for k in ("val_tokens", "max_tokens", "row_tokens") if k in obj}
    problem = _field_problem(obj, {**_FIELD_TYPES, **optional})
    if problem is not None:
        return problem
    if obj["dtype"] not in _HEADERS:
        return f"its dtype {obj['dtype']!r} is not one of {sorted(_HEADERS)}"
    if not obj["shards"]:
        return "it lists no shards"
    for s in obj["shards"]:
        if not isinstance(s, dict):
            return "a shard entry is not a JSON object"
        problem = _field_problem(s, _SHARD_TYPES)
        if problem is not None:
            return f"a shard entry's {problem}"
        if s["split"] not in ("val", "train") or Path(s["file"]).name != s["file"]:
            return f"shard entry {s['file']!r} ({s['split']!r}) is not a file name and a split"
    return None


def manifest_from_json(directory: Path, obj: dict, what: str) -> Manifest:
    """The Manifest of a manifest.json object read from `directory`.

    Raises:
        DataError: `obj` is not a complete manifest; the sentence ends with `what` to do.
    """
    problem = _manifest_problem(obj)
    if problem is not None:
        raise DataError(f"{directory / MANIFEST} is not a jaxpt manifest ({problem}); {what}")
    fields = {f.name for f in dataclasses.fields(Manifest)} - {"directory", "shards"}
    optional = {
        "val_tokens": obj["val_shards"] * obj["shard_tokens"],
        "max_tokens": 0,
        "row_tokens": 0,
    }
    shards = tuple(Shard(**{k: s[k] for k in _SHARD_TYPES}) for s in obj["shards"])
    values = {k: obj.get(k, optional.get(k)) for k in fields}
    return Manifest(directory=directory, shards=shards, **values)


def save_manifest(manifest: Manifest) -> None:
    """Writes manifest.json into the manifest's directory, atomically."""
    text = json.dumps(manifest.to_json(), indent=1)
    write_atomic(manifest.directory / MANIFEST, text.encode())


def read_manifest(directory: Path) -> Manifest:
    """The manifest in `directory` (shards not checked); a damaged one raises DataError."""
    if (directory / PROGRESS).is_file():
        what = f"re-run the `python -m jaxpt.data.prepare` command that wrote {directory}"
    else:
        what = "prepare the data again into a new directory"
    return manifest_from_json(directory, parse_json(directory / MANIFEST, what), what)


def load_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of a prepared data directory, after checking every shard's header and size.

    Raises:
        DataNotFoundError: `directory` or its manifest.json is missing, or a shard is.
        DataError: manifest.json is damaged, or a shard is truncated, has another dtype or count
            than the manifest says.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataNotFoundError(
            f"data directory {directory} does not exist; run `python -m jaxpt.data.prepare "
            f"--dataset=<source> --out={directory}` to make it"
        )
    if not (directory / MANIFEST).is_file() and (directory / PROGRESS).is_file():
        raise DataError(
            f"the preparation of {directory} did not finish; re-run the prepare command that "
            "started it to resume"
        )
    if not (directory / MANIFEST).is_file():
        raise DataNotFoundError(
            f"{directory} is not a prepared data directory (no {MANIFEST}); run "
            f"`python -m jaxpt.data.prepare --dataset=<source> --out={directory}` first"
        )
    manifest = read_manifest(directory)
    for s in manifest.shards:
        manifest.open(s)
        if manifest.row_tokens:
            manifest.open_mask(s)
    return manifest
