"""Bare shard directories, read without a manifest: llm.c / modded-nanogpt `.bin` shards and
the original JaxPT's `.npy` shards give the batches of a prepared directory of the same tokens.
"""

import numpy as np
import pytest

from jaxpt import data
from jaxpt.data import _formats

from . import test_data_prepare
from .test_data_prepare import files_in, one_sentence, prepare, run_data

book = test_data_prepare.book  # the shared test text (a fixture)

B, T = 16, 64


def write_llmc(path, tokens, magic=20240520, version=1, count=None) -> None:
    """llm.c's dev/data/data_common.py `write_datafile` for "gpt-2": a header of 256 int32
    (magic, version, token count), then the tokens as uint16."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.array(tokens, dtype=np.uint16).tobytes())


def stream(manifest: data.Manifest) -> list[np.ndarray]:
    """Each shard's tokens, read with numpy alone (llm.c layout: 1024-byte header, uint16)."""
    return [np.fromfile(manifest.directory / s.file, "<u2", offset=1024) for s in manifest.shards]


@pytest.fixture(scope="module")
def prepared(book, tmp_path_factory) -> data.Manifest:
    """A prepared directory of 12 shards: val, then 11 train (so names sort 0, 1, ..., 10)."""
    text = tmp_path_factory.mktemp("text") / "book.txt"
    text.write_text(book.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    return prepare(text, tmp_path_factory.mktemp("prepared") / "out", shard_tokens=2048)


def llmc_directory(prepared, directory):
    directory.mkdir()
    for i, (s, tokens) in enumerate(zip(prepared.shards, stream(prepared), strict=True)):
        write_llmc(directory / f"fineweb_{s.split}_{i:06d}.bin", tokens)
    return directory


def npy_directory(prepared, directory, dtype="uint16"):
    directory.mkdir()
    for i, (s, tokens) in enumerate(zip(prepared.shards, stream(prepared), strict=True)):
        split = "valid" if s.split == "val" else "train"
        np.save(directory / f"panchatantra_{split}_{i}.npy", tokens.astype(dtype))  # unpadded
    (directory / "README.md").write_text("not a shard")
    return directory


def batches(manifest) -> tuple[np.ndarray, np.ndarray]:
    """Training batches across the first epoch's end, and every validation batch."""
    loader = data.Loader(manifest, "train", B, T)
    state, out = loader.init_state(seed=5), []
    for _ in range(loader.steps_per_epoch + 3):
        batch, state = loader.next_batch(state)
        out.append(batch)
    return np.stack(out), np.stack(list(data.Loader(manifest, "val", B, T).eval_batches()))


@pytest.mark.parametrize(
    "make", [llmc_directory, npy_directory, lambda p, d: npy_directory(p, d, "int32")]
)
def test_bare_shards_give_the_batches_of_the_prepared_directory(prepared, tmp_path, make):
    directory = make(prepared, tmp_path / "shards")
    before = files_in(directory)
    manifest = data.ensure_prepared(run_data(directory), tmp_path / "cache")
    assert len(prepared.shards) == 12 and len(manifest.shards) == 12
    assert [s.tokens for s in manifest.shards] == [s.tokens for s in prepared.shards]
    assert manifest.tokens("val") == prepared.tokens("val")
    assert manifest.max_token_id == prepared.max_token_id and manifest.documents == 1
    assert data.tokenizer_for(manifest).eot_id == prepared.eot_id
    assert data.Loader(manifest, "train", B, T).steps_per_epoch > 10
    for got, want in zip(batches(manifest), batches(prepared), strict=True):
        np.testing.assert_array_equal(got, want)
    assert files_in(directory) == before  # nothing written into the user's directory


def test_token_counts_are_remembered_until_a_file_changes(prepared, tmp_path, monkeypatch):
    directory = llmc_directory(prepared, tmp_path / "shards")
    data.ensure_prepared(run_data(directory), tmp_path / "cache")
    counted = []
    count = _formats._count
    monkeypatch.setattr(
        _formats, "_count", lambda path, *a: counted.append(path.name) or count(path, *a)
    )
    data.ensure_prepared(run_data(directory), tmp_path / "cache")
    assert counted == []
    last = sorted(directory.iterdir())[-1]
    tokens = np.fromfile(last, "<u2", offset=1024)
    write_llmc(last, np.append(tokens[:-1], prepared.eot_id))
    assert data.ensure_prepared(run_data(directory), tmp_path / "cache").documents == 2
    assert counted == [last.name]


@pytest.mark.parametrize(
    "name, write, match",
    [
        ("a_train_1.bin", lambda p: write_llmc(p, [1, 2], magic=20240521), "is not a token shard"),
        (  # nanoGPT's headerless uint16 tokens: the advice names what to do with them
            "a_train_1.bin",
            lambda p: np.arange(600, dtype=np.uint16).tofile(p),
            r"is not a token shard .*save them as a 1-D \.npy array",
        ),
        ("a_train_1.bin", lambda p: write_llmc(p, [1, 2], version=2), "has header version 2"),
        ("a_train_1.bin", lambda p: write_llmc(p, [1, 2, 3], count=5), "it is truncated"),
        ("a_train_1.bin", lambda p: write_llmc(p, [1, 2, 3], count=2), "it is too long"),
        ("a_train_1.bin", lambda p: p.write_bytes(b"\0" * 100), "shorter than llm.c's"),
        (
            "a_train_1.npy",
            lambda p: np.save(p, np.zeros((2, 3), np.uint16)),
            r"of shape \(2, 3\), not a 1-D",
        ),
        ("a_train_1.npy", lambda p: np.save(p, np.zeros(5, np.float32)), "float32 array"),
        ("a_train_1.npy", lambda p: np.save(p, np.array([3, -1], np.int32)), "negative token id"),
        ("a_train_1.npy", lambda p: np.save(p, np.array([60000], np.int32)), "up to 60000"),
        ("a_train_1.npy", lambda p: p.write_bytes(b"garbage"), "not a readable .npy file"),
        ("a_1.bin", lambda p: write_llmc(p, [1]), "cannot tell the split"),
        (
            "a_train_1.npy",
            lambda p: write_llmc(p.with_suffix(".bin"), [1]) or np.save(p, [1]),
            "mixes .bin and .npy",
        ),
    ],
)
def test_bad_shards_are_one_sentence_naming_the_file(tmp_path, name, write, match):
    directory = tmp_path / "shards"
    directory.mkdir()
    if name.endswith(".bin"):
        write_llmc(directory / "a_val_0.bin", [5, 6, 7])
    else:
        np.save(directory / "a_val_0.npy", np.array([5, 6, 7], np.int32))
    write(directory / name)
    with pytest.raises(data.DataError, match=match) as e:
        data.ensure_prepared(run_data(directory), tmp_path / "cache")
    message = one_sentence(e)
    assert str(directory) in message


def test_missing_split_and_char_tokenizer(tmp_path):
    write_llmc(tmp_path / "fineweb_train_000001.bin", [1, 2, 3])
    with pytest.raises(data.DataError, match="has no val shard") as e:
        data.ensure_prepared(run_data(tmp_path), tmp_path / "cache")
    one_sentence(e)
    write_llmc(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    with pytest.raises(data.DataError, match="needs a directory prepared by") as e:
        data.ensure_prepared(run_data(tmp_path, "char"), tmp_path / "cache")
    one_sentence(e)
