"""Preparation: text -> token shards + manifest, resume, the embedded corpus, bad input."""

import dataclasses
import fcntl
import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from jaxpt import data, errors
from jaxpt.data import _prepare

from .conftest import shared_book

SHARD = 16_384  # the book is ~124K GPT-2 tokens -> 8 shards


@pytest.fixture(scope="module")
def book() -> Path:
    return shared_book()


def tokens_of(manifest: data.Manifest) -> np.ndarray:
    """Every token of a data directory, in stream order (N,)."""
    shards = [
        data.open_shard(manifest.directory / s.file, manifest.dtype, s.tokens)
        for s in manifest.shards
    ]
    return np.concatenate(shards)


def prepare(source, out, **kw) -> data.Manifest:
    kw = {"shard_tokens": SHARD, "workers": 1, "progress": False, **kw}
    return data.prepare_dataset(str(source), out, **kw)


def run_data(dataset, tokenizer="gpt2", max_tokens=0) -> types.SimpleNamespace:
    """A run config's data section."""
    return types.SimpleNamespace(dataset=str(dataset), tokenizer=tokenizer, max_tokens=max_tokens)


def files_in(directory: Path) -> dict[str, int]:
    """name -> mtime_ns of every file in `directory`."""
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def assert_same_files(a: Path, b: Path) -> None:
    """`a` and `b` hold the same file names, each with the same bytes."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for path in a.iterdir():
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name


def test_text_file_round_trips(book, tmp_path):
    manifest = prepare(book, tmp_path / "out")
    tokens = tokens_of(manifest)
    text = book.read_text(encoding="utf-8")
    tok = data.tokenizer_for(manifest)
    assert tokens[0] == tok.eot_id == manifest.eot_id  # each document starts with end-of-text
    assert tok.decode(tokens[1:].tolist()) == text
    assert manifest.documents == 1 and manifest.dtype == "uint16"
    assert len(manifest.shards) == math.ceil(len(tokens) / SHARD) > 3
    assert [s.tokens for s in manifest.shards[:-1]] == [SHARD] * (len(manifest.shards) - 1)
    assert manifest.tokens() == len(tokens) == sum(s.tokens for s in manifest.shards)
    assert [s.split for s in manifest.shards] == ["val"] + ["train"] * (len(manifest.shards) - 1)
    assert manifest.max_token_id == tokens.max()
    on_disk = json.loads((tmp_path / "out/manifest.json").read_text())
    assert on_disk["tokens"] == {"val": SHARD, "train": len(tokens) - SHARD}
    assert on_disk["dtype"] == "uint16" and on_disk["tokenizer"] == {"kind": "gpt2"}
    assert sorted(files_in(tmp_path / "out")) == sorted(
        ["manifest.json", "progress.json"] + [s.file for s in manifest.shards]
    )
    assert data.load_manifest(tmp_path / "out") == manifest


def test_rerun_skips_finished_work(book, tmp_path, monkeypatch):
    prepare(book, tmp_path / "out")
    before = files_in(tmp_path / "out")
    monkeypatch.setattr(_prepare, "write_shard", lambda *a: pytest.fail("rewrote a shard"))
    prepare(book, tmp_path / "out")
    assert files_in(tmp_path / "out") == before
    with pytest.raises(errors.DataError, match="other settings"):
        prepare(book, tmp_path / "out", shard_tokens=SHARD // 2)


def test_a_changed_local_source_is_named_and_nothing_is_written(tmp_path):
    """Only the source's path was recorded: after its files changed, a finished --out said
    "nothing to do" and an unfinished one resumed by document number over the new file list
    (documents read twice or never). Its files' names and sizes are recorded now, and a
    change is refused, naming the first file; a new modification time alone is no change."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    for name in ("a.txt", "b.txt"):
        (corpus / name).write_text(f"The {name} story, told again and again. " * 8)
    prepare(corpus, out, shard_tokens=64)
    before = contents(out)

    def refused(match: str) -> None:
        with pytest.raises(errors.DataError, match=match) as e:
            prepare(corpus, out, shard_tokens=64)
        assert one_sentence(e).endswith(
            "; prepare it into a new output directory, or restore its files as they were to "
            f"go on with {out}"
        )
        assert contents(out) == before

    (corpus / "c.txt").write_text("A jackal came along.")
    refused(f"^dataset {corpus} changed since {out} was prepared from it [(]c.txt was added[)]")
    (corpus / "c.txt").unlink()
    (corpus / "b.txt").write_text((corpus / "b.txt").read_text())  # rewritten as it was
    assert prepare(corpus, out, shard_tokens=64) and contents(out) == before  # nothing to do
    (corpus / "b.txt").write_text((corpus / "b.txt").read_text() + "The end.")
    refused(r"[(]b\.txt was changed[)]")
    (corpus / "a.txt").write_text("Another story.")
    refused(r"[(]a\.txt was changed, and 1 more file[)]")
    (out / "manifest.json").unlink()  # an interrupted preparation: progress.json only
    before = contents(out)
    (corpus / "b.txt").unlink()
    refused(r"[(]a\.txt was changed, and 1 more file[)]")


def test_a_changed_saved_dataset_is_named(tmp_path):
    import datasets

    rows = datasets.Dataset.from_dict({"text": ["The lion and the bull were friends."]})
    rows.save_to_disk(tmp_path / "saved")
    manifest = prepare(tmp_path / "saved", tmp_path / "out")
    assert prepare(tmp_path / "saved", tmp_path / "out") == manifest
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    more = datasets.Dataset.from_dict({"text": ["The lion and the bull were friends.", "Not."]})
    more.save_to_disk(tmp_path / "saved")  # saved again, over it, with another row
    with pytest.raises(errors.DataError, match=rf"[(]{arrow.name} was changed[)]"):
        prepare(tmp_path / "saved", tmp_path / "out")


def test_data_prepared_before_files_were_recorded_is_used_as_before(tmp_path):
    """A directory an earlier jaxpt prepared records no files: it is neither refused nor
    checked, and resuming it records them."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The lion and the bull were friends, until a jackal came along. " * 20)
    manifest = prepare(corpus, tmp_path / "out", shard_tokens=64)
    assert manifest.source["files"] == {"corpus.txt": corpus.stat().st_size}
    for name in ("manifest.json", "progress.json"):
        state = json.loads((tmp_path / "out" / name).read_text())
        del (state["settings"] if name == "progress.json" else state)["source"]["files"]
        (tmp_path / "out" / name).write_text(json.dumps(state))
    corpus.touch()
    before = contents(tmp_path / "out")
    assert prepare(corpus, tmp_path / "out", shard_tokens=64).tokens() == manifest.tokens()
    assert contents(tmp_path / "out") == before  # nothing to do
    (tmp_path / "out/manifest.json").unlink()
    assert prepare(corpus, tmp_path / "out", shard_tokens=64).source["files"] == {
        "corpus.txt": corpus.stat().st_size
    }


def test_interrupted_run_resumes_and_ignores_stale_files(book, tmp_path, monkeypatch):
    reference = tokens_of(prepare(book, tmp_path / "ref"))
    out = tmp_path / "out"
    write_shard = _prepare.write_shard

    def interrupted(path, tokens):  # dies on the 4th shard after a full-size temp file
        if len(list(out.glob("*.bin"))) == 3:
            write_shard(path.with_name(path.name + ".partial"), np.zeros_like(tokens))
            path.with_name(path.name + ".partial").rename(path.with_name(path.name + ".tmp"))
            raise KeyboardInterrupt
        write_shard(path, tokens)

    monkeypatch.setattr(_prepare, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(book, out)
    assert not (out / "manifest.json").exists() and (out / "train_000003.bin.tmp").exists()
    with pytest.raises(errors.DataError, match="did not finish; re-run"):
        data.load_manifest(out)
    # A complete-looking shard that progress.json does not record must be rewritten too.
    (out / "train_000004.bin").write_bytes((tmp_path / "ref/train_000003.bin").read_bytes())
    finished = ("val_000000.bin", "train_000001.bin", "train_000002.bin")
    kept = {name: files_in(out)[name] for name in finished}
    written = []

    def recorded(path, tokens):
        written.append(path.name)
        write_shard(path, tokens)

    monkeypatch.setattr(_prepare, "write_shard", recorded)
    manifest = prepare(book, out)
    assert written[0] == "train_000003.bin" and len(written) == len(manifest.shards) - 3
    assert {name: files_in(out)[name] for name in kept} == kept  # shards 0-2 were not rewritten
    np.testing.assert_array_equal(tokens_of(manifest), reference)
    assert not list(out.glob("*.tmp"))


def paragraph_jsonl(text: str, path: Path, chars: int = 600) -> list[str]:
    """`text` cut at sentence ends into documents of about `chars` characters, as jsonl."""
    docs, start = [], 0
    while start < len(text):
        end = text.find(". ", start + chars)
        end = len(text) if end < 0 else end + 2
        docs.append(text[start:end])
        start = end
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return docs


def test_parallel_workers_give_the_serial_result(book, tmp_path):
    docs = paragraph_jsonl(book.read_text(encoding="utf-8")[:200_000], tmp_path / "d.jsonl")
    serial = prepare(tmp_path / "d.jsonl", tmp_path / "serial", shard_tokens=4096)
    parallel = prepare(tmp_path / "d.jsonl", tmp_path / "parallel", shard_tokens=4096, workers=2)
    np.testing.assert_array_equal(tokens_of(parallel), tokens_of(serial))
    assert parallel.documents == serial.documents == len(docs) > 2 * _prepare._BATCH_DOCS
    tok = data.tokenizer_for(parallel)
    assert tok.decode(tokens_of(parallel).tolist()) == "".join(data.EOT + d for d in docs)


def test_char_tokenizer_and_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = data.embedded_documents()[:5]
    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet")
    manifest = prepare(tmp_path, tmp_path / "out", tokenizer="char", text_field="body")
    tok = data.tokenizer_for(manifest)
    assert isinstance(tok, data.CharTokenizer) and (tmp_path / "out/vocab.json").is_file()
    assert tok.decode(tokens_of(manifest).tolist()) == "".join(data.EOT + d for d in docs)
    assert manifest.vocab_size == len(set("".join(docs))) + 1


def test_embedded_corpus_is_prepared_once(tmp_path):
    docs = data.embedded_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    manifest = data.prepare_embedded(tmp_path)
    tok = data.tokenizer_for(manifest)
    assert tok.decode(tokens_of(manifest).tolist()) == "".join(data.EOT + d for d in docs)
    assert manifest.tokens("train") > 5 * manifest.tokens("val") > 0
    before = files_in(manifest.directory)
    config = run_data("embedded")
    assert data.ensure_prepared(config, tmp_path) == manifest
    assert files_in(manifest.directory) == before
    assert [p.name for p in tmp_path.iterdir()] == [manifest.directory.name]  # no temp dirs
    config = run_data(manifest.directory)
    assert data.ensure_prepared(config) == manifest
    chars = data.ensure_prepared(run_data("embedded", "char"), tmp_path)
    assert chars.tokenizer["kind"] == "char" and chars.directory != manifest.directory


def test_embedded_corpus_that_cannot_be_prepared_is_one_sentence(tmp_path):
    """A traceback: JAXPT_CACHE_DIR a file (NotADirectoryError)."""
    (tmp_path / "a_file").write_text("a user's file")
    with pytest.raises(errors.DataError, match="cannot prepare the embedded corpus in ") as e:
        data.ensure_prepared(run_data("embedded"), tmp_path / "a_file")
    one_sentence(e)
    assert (tmp_path / "a_file").read_text() == "a user's file"


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "manifest.json").unlink(),  # was: "cannot prepare ... (Directory not empty)"
        lambda d: (d / "train_000003.bin").unlink(),  # was: advice to re-run a prepare command
        lambda d: (d / "train_000005.bin").write_bytes(b"\0" * 2000),  # that no one ran
    ],
)
def test_a_damaged_embedded_cache_is_repaired(tmp_path, damage):
    """A cache cleaner that deletes old files leaves the embedded corpus's cache damaged; the
    next run rewrites what is missing rather than failing on every run."""
    fresh = data.prepare_embedded(tmp_path / "fresh").directory
    cached = tmp_path / "cache" / fresh.name
    shutil.copytree(fresh, cached)
    damage(cached)
    manifest = data.ensure_prepared(run_data("embedded"), tmp_path / "cache")
    assert manifest.directory == cached
    assert_same_files(cached, fresh)


def test_cli(tmp_path):
    source = tmp_path / "story.txt"
    source.write_text("Once upon a time, a lion met a bull. They became friends.\n")
    cmd = [
        sys.executable,
        "-m",
        "jaxpt.data.prepare",
        f"--dataset={source}",
        f"--out={tmp_path / 'out'}",
        "--shard_tokens=5",
        "--workers=1",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert ": 17 uint16 tokens (val 5, train 12) from 1 document in 4 shards" in run.stdout
    bar = re.compile(r"out: [\d.]+tok \[[^]]*\]")  # the progress bar's states, \r-separated
    assert bar.sub("", run.stderr).strip() == ""
    # a corpus within one shard is all val: prepared as asked, with what training would say
    one_shard = subprocess.run([*cmd[:4], f"--out={tmp_path / 'all_val'}"], capture_output=True)
    assert one_shard.returncode == 0
    assert b": 17 uint16 tokens (val 17, train 0) from 1 document in 1 shard\n" in one_shard.stdout
    assert [line for line in one_shard.stderr.decode().splitlines() if "warning" in line] == [
        f"warning: {tmp_path / 'all_val'} has no 'train' shards (its 17 tokens all went to the "
        "'val' split); prepare the source again into a new directory with --shard_tokens=1 so "
        "that the val split is its first tenth."
    ]
    cmd[3] = f"--dataset={tmp_path / 'missing.txt'}"
    cmd[4] = f"--out={tmp_path / 'out2'}"
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"error: dataset {str(tmp_path / 'missing.txt')!r} does not exist (no such file or "
        "directory)."
    ]
    assert not (tmp_path / "out2").exists()
    run = subprocess.run([*cmd[:4], "--shard_tokens=many"], capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [
        "error: flag --shard_tokens=many: invalid literal for int() with base 10: 'many'; "
        "see --help."
    ]
    run = subprocess.run([*cmd, "--block_size=64"], capture_output=True, text=True)  # ignored
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [
        "error: --block_size applies to --format=chat; leave it out."
    ]


def test_cli_says_already_prepared_and_resuming_in_plain_lines(tmp_path):
    """Both lines came through absl logging, each behind an "I1130 12:00:00.123 ... ]"
    prefix, among the command's plain lines."""
    source = tmp_path / "story.txt"
    source.write_text("Once upon a time, a lion met a bull. They became friends.\n")
    out = tmp_path / "out"
    prepare(source, out, shard_tokens=5, workers=1)  # 4 shards
    cmd = [sys.executable, "-m", "jaxpt.data.prepare", f"--dataset={source}", f"--out={out}"]
    cmd += ["--shard_tokens=5", "--workers=1"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert (run.returncode, run.stderr) == (0, f"{out} is already prepared; nothing to do\n")
    (out / "manifest.json").unlink()  # what a kill before the last shard leaves
    (out / "train_000003.bin").unlink()
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines()[0] == f"resuming {out}: 3 finished shards are kept"


def test_resumed_progress_bar_counts_the_corpus_once(tmp_path, capsys):
    """A resume inside a document counted that whole document again on top of the tokens
    already written: "32.0tok" for the story's 17 tokens."""
    source = tmp_path / "story.txt"
    source.write_text("Once upon a time, a lion met a bull. They became friends.\n")
    out = tmp_path / "out"
    prepare(source, out, shard_tokens=5)  # one document, 4 shards
    (out / "manifest.json").unlink()  # what a kill before the last shard leaves
    (out / "train_000003.bin").unlink()
    capsys.readouterr()
    manifest = prepare(source, out, shard_tokens=5, progress=True)
    counts = [float(n) for n in re.findall(r"out: ([\d.]+)tok", capsys.readouterr().err)]
    kept = manifest.tokens() - manifest.shards[-1].tokens  # the 3 shards already there
    assert (counts[0], counts[-1]) == (kept, manifest.tokens()) == (15, 17)


def test_ctrl_c_with_workers_is_one_line(book, tmp_path):
    """Ctrl-C at a terminal signals the whole process group: the tokenizer workers say
    nothing (they printed a KeyboardInterrupt traceback each) and the parent one line."""
    paragraph_jsonl(book.read_text(encoding="utf-8") * 40, tmp_path / "d.jsonl")  # ~5M tokens
    log = tmp_path / "stderr"
    cmd = [sys.executable, "-m", "jaxpt.data.prepare", f"--dataset={tmp_path / 'd.jsonl'}"]
    with open(log, "w") as err:
        run = subprocess.Popen(
            [*cmd, f"--out={tmp_path / 'out'}", "--workers=2", "--shard_tokens=100000"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
        deadline = time.monotonic() + 120
        while not re.search(r"\b[1-9][\d.]*[kM]tok\b", log.read_text()):  # workers at work
            assert run.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)
        assert run.wait(timeout=60) == 130
    assert on_a_terminal(log.read_bytes().decode()) == [INTERRUPTED]


# what Ctrl-C leaves: the finished shards (progress.json records them; a shard is written
# whole or not at all), not the tokens of the shard being filled
INTERRUPTED = (
    "jaxpt.data.prepare: interrupted (SIGINT); --out keeps the shards it finished: run the "
    "command again to go on from them."
)


def on_a_terminal(stderr: str) -> list[str]:
    """The lines a terminal shows of `stderr` (read as bytes: text mode turns each carriage
    return into a newline): each as its last carriage return left it (a progress bar's states
    overwrite one another; a wiped bar is blank), blank ones left out."""
    return [shown for line in stderr.split("\n") if (shown := line.split("\r")[-1].strip())]


def test_cli_malformed_jsonl_is_one_line(tmp_path):
    """A malformed jsonl line is the command's one sentence: `datasets`' json reader logged
    the error it then raised, twice (its own handler and absl's), before that sentence, and
    the progress bar stayed above it, stopped at 0 tokens."""
    source = tmp_path / "docs.jsonl"
    source.write_text('{"text": "a lion met a bull"}\n{not json\n')
    cmd = [sys.executable, "-m", "jaxpt.data.prepare", f"--dataset={source}", "--workers=1"]
    run = subprocess.run([*cmd, f"--out={tmp_path / 'out'}"], capture_output=True)
    assert run.returncode == 1
    lines = on_a_terminal(run.stderr.decode())
    assert len(lines) == 1, run.stderr
    # the file and the line (it said pyarrow's "JSON parse error", and no line)
    assert lines[0].startswith(
        f"error: could not read dataset {str(source)!r}: {source}, line 2 is not a JSON object"
    )
    assert lines[0].endswith("); fix that line or remove it."), lines[0]


# ----------------------------------------------------------------------------- bad input


def one_sentence(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message.count(". ") == 0, message
    return message


@pytest.mark.parametrize(
    "name, content, kw, error, match",
    [
        ("missing.txt", None, {}, errors.DataNotFoundError, "does not exist"),
        ("", None, {}, errors.DataError, "the dataset name is empty"),  # read the current dir
        ("./nowhere/corpus", None, {}, errors.DataNotFoundError, "does not exist"),
        # a directory's name as the README writes it (--dataset=corpus/), mistyped: streamed
        # from the hub as a dataset named "corpsu/", then "check its name ... and the network"
        ("corpsu/", None, {}, errors.DataNotFoundError, "does not exist"),
        ("empty.txt", "", {}, errors.DataError, "is empty"),
        ("empty.jsonl", "", {}, errors.DataError, "is empty"),
        ("blank.jsonl", '{"text": ""}\n{"text": null}\n', {}, errors.DataError, "is empty"),
        ("blank.jsonl", '{"text": ""}\n', {"tokenizer": "char"}, errors.DataError, "is empty"),
        ("rows.jsonl", '{"body": "hi"}\n', {}, errors.DataError, "no field 'text'"),
        # char built its vocabulary first and called such a dataset empty
        ("rows.jsonl", '{"body": "hi"}\n', {"tokenizer": "char"}, errors.DataError, "no field"),
        ("book.pdf", "%PDF", {}, errors.DataError, "its type is not one of"),
        ("ok.txt", "text", {"tokenizer": "bpe.json"}, errors.DataNotFoundError, "neither 'gpt2'"),
        # read ./tokenizer.json, or said "tokenizer tokenizer.json does not exist"
        ("ok.txt", "text", {"tokenizer": ""}, errors.DataNotFoundError, "'' is neither 'gpt2'"),
        ("ok.txt", "text", {"shard_tokens": 0}, errors.DataError, "shard_tokens must be at least"),
        # rounded down to whole rows, 10 tokens became 0, "the whole source"
        (
            "chat.jsonl",
            '{"messages": [{"role": "user", "content": "hi"}, '
            '{"role": "assistant", "content": "hello"}]}\n',
            {"format": "chat", "block_size": 63, "max_tokens": 10},
            errors.DataError,
            "max_tokens must be 0 [(]the whole source[)] or at least one row of 64 tokens",
        ),
    ],
)
def test_bad_input_is_one_sentence_and_writes_nothing(
    tmp_path, monkeypatch, name, content, kw, error, match
):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        Path(name).write_text(content)
    with pytest.raises(error, match=match) as e:
        prepare(name, tmp_path / "out", **kw)
    one_sentence(e)
    assert not (tmp_path / "out").exists()


@pytest.fixture()
def small(tmp_path) -> data.Manifest:
    source = tmp_path / "story.txt"
    source.write_text("The lion and the bull were friends, until a jackal came along. " * 20)
    return prepare(source, tmp_path / "out", shard_tokens=64)


def test_wrong_dtype_shard(small):
    path = small.directory / small.shards[1].file
    tokens = data.open_shard(path, small.dtype, small.shards[1].tokens)
    data.write_shard(path, np.array(tokens, np.uint32))
    with pytest.raises(errors.DataError, match="holds uint32 tokens but the manifest says uint16"):
        data.load_manifest(small.directory)
    with pytest.raises(errors.DataError, match="uint32") as e:
        data.Loader(small, "train", 2, 8)
    one_sentence(e)


def test_truncated_missing_and_foreign_shards(small):
    path = small.directory / small.shards[-1].file
    original = path.read_bytes()
    path.write_bytes(bytes(8) + original[8:])
    with pytest.raises(errors.DataError, match="is not a token shard"):
        data.load_manifest(small.directory)
    path.write_bytes(original)
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(errors.DataError, match="it is truncated") as e:
        data.load_manifest(small.directory)
    one_sentence(e)
    path.unlink()
    with pytest.raises(errors.DataNotFoundError, match="is missing") as e:
        data.load_manifest(small.directory)
    one_sentence(e)


def test_vocab_check(small):
    data.check_vocab(small, 50257)
    data.check_vocab(small, small.max_token_id + 1)
    with pytest.raises(errors.DataError, match=r"model\.vocab_size is 1000; set model") as e:
        data.check_vocab(small, 1000)
    one_sentence(e)


def test_ensure_prepared_errors(small, tmp_path):
    def ensure(dataset, tokenizer="gpt2"):
        config = run_data(dataset, tokenizer)
        with pytest.raises(errors.DataError) as e:
            data.ensure_prepared(config, tmp_path / "cache")
        return one_sentence(e)

    assert ensure("").startswith("data.dataset is empty; name a data directory")  # was "."
    run = "; run `python -m jaxpt.data.prepare"
    assert f"does not exist{run} --dataset=<source> --out=" in ensure(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert f"no shards{run} --dataset=<source> --out=" in ensure(tmp_path / "empty")
    # a directory or file of the user's: that advice named it as --out, which prepare refuses
    (tmp_path / "book.txt").write_text("a user's book")
    for mine in (tmp_path, tmp_path / "book.txt"):
        assert f"{run} --dataset={mine} --out=<new dir>` and set data.dataset=" in ensure(mine)
    assert "prepared with the gpt2 tokenizer but data.tokenizer is 'char'" in ensure(
        small.directory, "char"
    )
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("dataset", ["embedded", "owner/corpus", "shards"])
@pytest.mark.parametrize(
    "tokenizer, match",
    [
        ("bogus", r"'bogus': tokenizer 'bogus' is neither 'gpt2', 'char' nor"),
        ("missing.json", r"'missing\.json': tokenizer 'missing\.json' is neither 'gpt2', 'char'"),
        ("folder", r"'\S+folder': tokenizer '\S+folder' is neither 'gpt2', 'char'"),  # empty
        ("notes.txt", r"'\S+notes\.txt': tokenizer \S+ cannot be read \(.*\); name an intact"),
    ],
)
def test_a_bad_data_tokenizer_is_one_sentence_naming_the_field(
    small, tmp_path, dataset, tokenizer, match
):
    """Whatever the dataset, a bad data.tokenizer is named as that field (it was 'tokenizer
    ...', or 'data.dataset=...: tokenizer ...' for bare shards), before anything is read."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    if tokenizer in ("folder", "notes.txt"):
        tokenizer = str(tmp_path / tokenizer)
    if dataset == "shards":
        dataset = tmp_path / "shards"
        dataset.mkdir()
        shutil.copy(small.directory / small.shards[0].file, dataset / "val_000000.bin")
    config = run_data(dataset, tokenizer)
    for resolve in (data.run_tokenizer, functools.partial(data.ensure_prepared, need=None)):
        with pytest.raises(errors.DataError, match=rf"^data\.tokenizer={match}") as e:
            resolve(config)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- safety (issue 11)


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_prepare_writes_only_where_it_may(small, tmp_path):
    source = tmp_path / "story.txt"
    user = tmp_path / "user"
    user.mkdir()
    (user / "vocab.json").write_text('{"chars": "my own"}')
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "another tool"}')
    kept = {d: contents(d) for d in (user, other)}
    with pytest.raises(data.DataError, match=r"was not made by `jaxpt\.data\.prepare`") as e:
        prepare(source, user, tokenizer="char", shard_tokens=64)
    one_sentence(e)
    with pytest.raises(data.DataError, match="is not a jaxpt manifest") as e:
        prepare(source, other, shard_tokens=64)
    one_sentence(e)
    assert {d: contents(d) for d in (user, other)} == kept
    (tmp_path / "empty").mkdir()
    assert prepare(source, tmp_path / "empty", shard_tokens=64).tokens() == small.tokens()
    assert prepare(source, small.directory, shard_tokens=64) == small  # its own: nothing to do


def test_an_out_that_is_a_dangling_link_is_refused_before_tokenizing(small, tmp_path, monkeypatch):
    out = tmp_path / "linked"
    out.symlink_to(tmp_path / "elsewhere")
    monkeypatch.setattr(_prepare, "_tokenize_into", None)  # said "File exists" after it
    with pytest.raises(data.DataError, match="does not exist; create that directory") as e:
        prepare(tmp_path / "story.txt", out, shard_tokens=64)
    assert str(tmp_path / "elsewhere") in one_sentence(e)
    assert out.is_symlink() and not out.exists() and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_an_out_inside_the_dataset_directory_is_not_read_as_documents(tmp_path, suffix):
    """Run again to extend it, a preparation whose --out lay under its --dataset directory read
    its own manifest.json and progress.json as documents: among .txt files it refused them
    ("mixes file types"), among .jsonl files `datasets` could not read them ("Couldn't cast")."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, animal in enumerate(["lion", "bull", "jackal"]):
        text = f"The {animal} walked to the river and back, thinking. " * 8
        row = json.dumps({"text": text}) if suffix == ".jsonl" else text
        (corpus / f"{i}{suffix}").write_text(row)
    prepare(corpus, corpus / "tokens", shard_tokens=64, max_tokens=128)
    inside = prepare(corpus, corpus / "tokens", shard_tokens=64)  # extended to all of it
    outside = prepare(corpus, tmp_path / "outside", shard_tokens=64)
    np.testing.assert_array_equal(tokens_of(inside), tokens_of(outside))
    assert inside.documents == outside.documents == 3


def test_prepared_data_as_a_dataset_says_to_train_on_it(small, tmp_path):
    """Its manifest.json was read as a document: "has no field 'text' ...; pass the text
    column's name as text_field"."""
    with pytest.raises(data.DataError, match=r"holds manifest\.json or progress\.json\), not") as e:
        prepare(small.directory, tmp_path / "again", shard_tokens=64)
    assert one_sentence(e).endswith(f"train on it with data.dataset={small.directory}")
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_a_damaged_manifest_is_one_sentence_and_prepare_rewrites_it(small, tmp_path, damage):
    path = small.directory / "manifest.json"
    original = path.read_bytes()
    path.write_bytes(
        {"empty": b"", "garbage": b"\x89PNG\0\xff", "truncated": original[:50]}[damage]
    )
    with pytest.raises(data.DataError, match=r"manifest\.json cannot be read") as e:
        data.ensure_prepared(run_data(small.directory), tmp_path / "cache")
    assert "re-run the `python -m jaxpt.data.prepare` command that wrote" in one_sentence(e)
    assert prepare(tmp_path / "story.txt", small.directory, shard_tokens=64) == small
    assert path.read_bytes() == original
    (small.directory / "progress.json").unlink()  # no longer recognisably prepare's own
    path.write_bytes(original[:50])
    with pytest.raises(data.DataError, match="prepare the data again into a new directory") as e:
        prepare(tmp_path / "story.txt", small.directory, shard_tokens=64)
    one_sentence(e)
    assert path.read_bytes() == original[:50]


@pytest.mark.parametrize(
    "content, match",
    [("Caf\xe9 au lait".encode("latin-1"), "is not UTF-8 text"), (b"ab\0\0cd", "is binary")],
)
def test_a_file_that_is_not_text_is_named(tmp_path, content, match):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus/good.txt").write_text("The lion and the bull.")
    (tmp_path / "corpus/bad.txt").write_bytes(content)
    with pytest.raises(data.DataError, match=match) as e:
        prepare(tmp_path / "corpus", tmp_path / "out")
    assert str(tmp_path / "corpus/bad.txt") in one_sentence(e)
    assert not (tmp_path / "out").exists()


def test_the_advice_for_a_damaged_shard_works(small, tmp_path):
    shard = small.directory / small.shards[2].file
    original = shard.read_bytes()
    shard.write_bytes(original[:-10])
    with pytest.raises(data.DataError, match="it is truncated") as e:
        data.ensure_prepared(run_data(small.directory), tmp_path / "cache")
    assert "re-run the `python -m jaxpt.data.prepare` command that wrote" in one_sentence(e)
    assert prepare(tmp_path / "story.txt", small.directory, shard_tokens=64) == small
    assert shard.read_bytes() == original and data.load_manifest(small.directory) == small


def test_the_advice_for_validation_only_data_works(tmp_path):
    source = tmp_path / "story.txt"
    source.write_text("The lion and the bull were friends, until a jackal came along. " * 20)
    val_only = prepare(source, tmp_path / "out", shard_tokens=10_000)
    with pytest.raises(data.DataError, match="no 'train' shards") as e:
        data.Loader(val_only, "train", 2, 8)
    advice = re.search(r"into a new directory with --shard_tokens=(\d+)", one_sentence(e))
    fixed = prepare(source, tmp_path / "new", shard_tokens=int(advice.group(1)))
    assert data.Loader(fixed, "train", 2, 8).steps_per_epoch > 5


def test_a_run_on_validation_only_data_gets_the_same_advice(tmp_path):
    """A run checks its batches (data.check_batches) before a loader opens the split: it said
    to lower train.batch_size or model.block_size, which cannot fill an empty split."""
    source = tmp_path / "story.txt"
    source.write_text("The lion and the bull were friends, until a jackal came along. " * 20)
    val_only = prepare(source, tmp_path / "out", shard_tokens=10_000)
    with pytest.raises(data.DataError) as e:
        data.check_batches(val_only, "train", 2, 8)
    assert str(e.value) == data.missing_split(val_only, "train")
    assert "--shard_tokens=" in str(e.value) and "train.batch_size" not in str(e.value)


def test_the_prepare_command_and_its_workers_start_without_jax():
    """Preparing data needs no jax: importing it cost each tokenizer worker seconds, and a
    Ctrl-C during that import could be swallowed by jax's gc callback."""
    check = "import sys, jaxpt.data.prepare; print(sorted({'jax', 'torch'} & set(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr


def gpt2_stream(documents: list[str]) -> np.ndarray:
    """The documented token stream, by tiktoken alone: each non-empty document as
    `<|endoftext|>` then its GPT-2 ids, special-token names in it read as plain text (N,)."""
    import tiktoken

    data.seed_tiktoken_cache()  # tiktoken's own cache, no download
    enc = tiktoken.get_encoding("gpt2")
    eot = enc.eot_token
    return np.array([t for d in documents if d for t in [eot, *enc.encode_ordinary(d)]], np.int64)


def llmc_file(tokens: np.ndarray, dtype: str) -> bytes:
    """The bytes llm.c's dev/data/data_common.py write_datafile writes for `tokens`: 256
    little-endian int32 (magic, version, count, zeros), then the tokens, little-endian."""
    magic, version = {"uint16": (20240520, 1), "uint32": (20240801, 7)}[dtype]
    header = np.zeros(256, "<i4")
    header[0], header[1], header[2] = magic, version, len(tokens)
    return header.tobytes() + tokens.astype(np.dtype(dtype).newbyteorder("<")).tobytes()


def assert_llmc_shards(manifest: data.Manifest, stream: np.ndarray, val_shards: int) -> None:
    """`manifest`'s shards, byte for byte, are `stream` cut into llm.c files of
    `manifest.shard_tokens` tokens, the first `val_shards` of them the val split."""
    size = manifest.shard_tokens
    pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
    assert [s.split for s in manifest.shards] == ["val"] * val_shards + ["train"] * (
        len(pieces) - val_shards
    )
    for shard, piece in zip(manifest.shards, pieces, strict=True):
        assert (manifest.directory / shard.file).read_bytes() == llmc_file(piece, manifest.dtype)


def test_text_files_are_documents_read_as_python_reads_text_in_path_order(tmp_path):
    files = {
        "b.txt": "The bull.\n",
        "A/z.txt": "windows\r\nline ends\r\n",
        "a10.txt": "old mac\rline end",
        "a2.txt": "  spaced  \n\n",
        "e.txt": "",  # adds nothing
    }
    for name, text in files.items():
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(text.encode())
    paths = sorted((tmp_path / "src").rglob("*.txt"))
    manifest = prepare(tmp_path / "src", tmp_path / "out", shard_tokens=8)
    stream = gpt2_stream([p.read_text(encoding="utf-8") for p in paths])  # universal newlines
    assert_llmc_shards(manifest, stream, val_shards=1)
    assert manifest.documents == len(paths) == 5


def test_repair_rewrites_the_damaged_shard_and_those_after_it(small, tmp_path, monkeypatch):
    fresh = prepare(tmp_path / "story.txt", tmp_path / "fresh", shard_tokens=64)
    assert len(small.shards) > 3
    before = files_in(small.directory)
    shard = small.directory / small.shards[2].file
    shard.write_bytes(shard.read_bytes()[:-10])
    written = []
    write_shard = _prepare.write_shard

    def recorded(path, tokens):
        written.append(path.name)
        write_shard(path, tokens)

    monkeypatch.setattr(_prepare, "write_shard", recorded)
    assert prepare(tmp_path / "story.txt", small.directory, shard_tokens=64) == small
    assert written == [s.file for s in small.shards[2:]]
    after = files_in(small.directory)
    assert all(after[s.file] == before[s.file] for s in small.shards[:2])  # not touched
    for s in fresh.shards:
        assert (small.directory / s.file).read_bytes() == (fresh.directory / s.file).read_bytes()


def test_shards_are_llmc_files_of_the_documents_tokens(book, tmp_path):
    text = book.read_text(encoding="utf-8")[:12_000]
    docs = [text[i : i + 700] for i in range(0, len(text), 700)]
    docs[3] = ""  # adds nothing
    docs[5] = "a literal <|endoftext|> inside a document is text"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    manifest = prepare(tmp_path / "d.jsonl", tmp_path / "out", shard_tokens=500, val_shards=2)
    stream = gpt2_stream(docs)
    assert manifest.dtype == "uint16" and len(stream) > 5 * 500
    assert_llmc_shards(manifest, stream, val_shards=2)
    assert manifest.tokens("val") == 1000 and manifest.documents == len(docs)


def test_uint32_shards_are_llmc_version_7(tmp_path):
    chars = "".join(chr(0x10000 + i) for i in range(70_000))  # > 2**16 ids: uint32 tokens
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": chars}) + "\n")
    manifest = prepare(
        tmp_path / "d.jsonl", tmp_path / "out", tokenizer="char", shard_tokens=30_000
    )
    assert manifest.dtype == "uint32" and manifest.eot_id == 70_000  # the characters sorted
    assert_llmc_shards(manifest, np.arange(-1, 70_000) % 70_001, val_shards=1)


def test_preparations_of_the_same_out_at_once_take_turns(small, tmp_path, monkeypatch):
    """Hosts on a shared filesystem that ran the same prepare command at once wrote the same
    temporary files: one of them stopped with "No such file or directory
    (.../progress.json.tmp)". The second now waits for the first, then finds the data there;
    it arrives as the first writes its first shard, its vocab.json saved, no progress.json yet
    (where a directory of files prepare did not make would be refused)."""
    source, out, written, second = tmp_path / "story.txt", tmp_path / "again", [], []
    reference = prepare(source, tmp_path / "ref", tokenizer="char", shard_tokens=64)
    write_shard = _prepare.write_shard

    def first_shard_starts_another(path, tokens):
        if not written:  # the first preparation, about to write its first shard
            run = lambda: second.append(prepare(source, out, tokenizer="char", shard_tokens=64))
            other = threading.Thread(target=run)
            other.start()
            other.join(timeout=1)  # without turns, it prepares everything meanwhile
            second.append(other)
        written.append(path.name)
        write_shard(path, tokens)

    monkeypatch.setattr(_prepare, "write_shard", first_shard_starts_another)
    first = prepare(source, out, tokenizer="char", shard_tokens=64)
    second[0].join()
    assert second[1:] == [first] == [dataclasses.replace(reference, directory=out)]
    assert written == [s.file for s in reference.shards]  # each written once
    assert_same_files(out, reference.directory)
    assert not (tmp_path / "again.lock").exists()  # each removed the lock file it created


def test_the_lock_file_goes_with_its_creator_and_a_killed_ones_blocks_no_one(small, tmp_path):
    """The lock file `<out>.lock` stayed beside every prepared `--out`. Now the process that
    created it removes it; one a killed process left (no process holds its lock) neither blocks
    a re-run nor is removed by it, and a live holder's lock is waited for, not taken."""
    source = tmp_path / "story.txt"
    assert not (tmp_path / "out.lock").exists()  # `small` prepared tmp_path / "out"
    stale = tmp_path / "killed.lock"
    stale.write_text("a killed preparation's lock file\n")
    assert prepare(source, tmp_path / "killed", shard_tokens=64).tokens() == small.tokens()
    assert stale.read_text() == "a killed preparation's lock file\n"

    held = tmp_path / "held.lock"
    with open(held, "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another live process's preparation
        run = functools.partial(prepare, source, tmp_path / "held", shard_tokens=64)
        waiter = threading.Thread(target=run)
        waiter.start()
        waiter.join(timeout=1)
        assert waiter.is_alive() and not (tmp_path / "held").exists()
    waiter.join()
    assert data.load_manifest(tmp_path / "held").tokens() == small.tokens()
    assert held.exists()  # the holder's, not the waiter's


def test_out_named_by_a_dot_is_prepared_with_its_lock_beside_it(small, tmp_path, monkeypatch):
    """`--out=.` (an empty current directory, which the checks accept) ended in a traceback,
    "PosixPath('.') has an empty name", naming its lock file."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert prepare(tmp_path / "story.txt", ".", shard_tokens=64).tokens() == small.tokens()
    assert_same_files(here, small.directory)
    assert not (tmp_path / "here.lock").exists()


def test_out_under_the_home_directory_by_a_tilde_is_prepared_there(small, tmp_path, monkeypatch):
    """`--dataset=~/book.txt` read the home directory's file, but `--out=~/data/book` (the
    shell leaves a tilde after `--out=` as it is) made a directory named `~` in the current
    one, where `data.dataset=~/data/book`, which is the home directory's, found nothing."""
    home, here = tmp_path / "home", tmp_path / "here"
    home.mkdir(), here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    manifest = prepare(tmp_path / "story.txt", "~/data/book", shard_tokens=64)
    assert manifest.directory == home / "data/book" and not list(here.iterdir())
    assert_same_files(home / "data/book", small.directory)
    assert data.ensure_prepared(run_data("~/data/book")) == data.load_manifest(home / "data/book")


def test_a_split_a_local_source_lacks_is_named_before_anything_is_read(tmp_path):
    """`--split=validation` of local files (which `datasets` reads as one split, "train") or
    of a saved DatasetDict without it ended, after "preparing ...", in "could not read dataset
    ... (Bad split: validation)" or "('validation')", with the advice to check that its files
    are whole and in their format."""
    import datasets

    (tmp_path / "story.txt").write_text("The lion and the bull were friends.")
    with pytest.raises(errors.DataError) as e:
        prepare(tmp_path / "story.txt", tmp_path / "out", split="validation")
    assert one_sentence(e) == (
        f"dataset {tmp_path / 'story.txt'} has one split, 'train' (local .txt/.md/.json/.jsonl/"
        ".parquet/.csv files are read as one), not 'validation'; leave --split out"
    )
    rows = datasets.Dataset.from_dict({"text": ["The lion and the bull were friends."]})
    datasets.DatasetDict({"train": rows, "test": rows}).save_to_disk(tmp_path / "saved")
    with pytest.raises(errors.DataError) as e:
        prepare(tmp_path / "saved", tmp_path / "out", split="validation")
    assert one_sentence(e) == (
        f"dataset {tmp_path / 'saved'} has no split 'validation' (its splits: test, train); "
        "pass one of them as --split"
    )
    assert not (tmp_path / "out").exists()
    assert prepare(tmp_path / "saved", tmp_path / "out", split="test").tokens() == 9


def test_a_run_killed_before_its_first_progress_file_is_renamed_resumes(small, tmp_path):
    """A kill (or Ctrl-C) between creating --out and renaming its first progress.json into
    place left only the temporary progress.json.tmp, and every re-run was refused: "already
    holds files (progress.json.tmp) and was not made by `jaxpt.data.prepare`"."""
    out = tmp_path / "killed"
    out.mkdir()
    (out / "progress.json.tmp").write_text('{"settings": {"sou')  # cut short by the kill
    manifest = prepare(tmp_path / "story.txt", out, shard_tokens=64)
    assert_same_files(out, small.directory)
    assert manifest.tokens() == small.tokens()


def test_a_csv_text_column_is_read_as_written(tmp_path):
    """CSV cells have no types, but pandas (under `datasets`' csv reader) guessed them: a text
    column of numbers was refused as "field 'text' ... is not text" (a float column, 1.50,
    would have read 1.5), and a cell "NA", "null" or "None" was read as missing, an empty
    document, so its text was dropped without a word. The text column is now the cells' text."""
    numbers = tmp_path / "numbers.csv"
    numbers.write_text("id,text\n1,3.14159\n2,1.50\n")
    words = tmp_path / "words.csv"
    words.write_text('id,text\n1,The lion\n2,\n3,NA\n4,None\n5,"a, b"\n')
    for source, texts in [
        (numbers, ["3.14159", "1.50"]),
        (words, ["The lion", "NA", "None", "a, b"]),
    ]:
        manifest = prepare(source, tmp_path / source.stem, shard_tokens=4)
        tok = data.tokenizer_for(manifest)
        assert tok.decode(tokens_of(manifest)) == "".join(data.EOT + t for t in texts)
        assert manifest.documents == len(source.read_text().splitlines()) - 1


def test_file_types_are_told_by_their_suffix_in_any_case(tmp_path):
    """BOOK.TXT alone was refused ("its type is not one of .txt/..."), and in a directory of
    .txt files a Notes.MD or CHAPTER2.TXT was passed over without a word."""
    files = {"a.txt": "The lion.", "CHAPTER2.TXT": "The bull.", "Notes.Md": "The jackal."}
    for name, text in files.items():
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_text(text)
    paths = sorted((tmp_path / "src").iterdir())
    manifest = prepare(tmp_path / "src", tmp_path / "out", shard_tokens=8)
    assert_llmc_shards(manifest, gpt2_stream([p.read_text() for p in paths]), val_shards=1)
    assert manifest.documents == 3
    alone = prepare(tmp_path / "src/CHAPTER2.TXT", tmp_path / "alone", shard_tokens=8)
    assert alone.tokens() == len(gpt2_stream(["The bull."]))
    rows = tmp_path / "ROWS.JSONL"
    rows.write_text('{"text": "The lion."}\n')
    assert prepare(rows, tmp_path / "rows", shard_tokens=8).documents == 1
