"""A hub dataset named in a run config is prepared into the cache on first use, as far as the
run reads, resumably, extended by longer runs, under a lock; offline it is one sentence.

The hub is replaced by a local streaming dataset behind the same `datasets.load_dataset` call.
"""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import datasets
import numpy as np
import pytest
from huggingface_hub import constants

from jaxpt import data, train
from jaxpt.config import preset_config
from jaxpt.data import _prepare, _resolve
from jaxpt.data._hub import hub_unreachable

from . import test_data_prepare
from .conftest import ROOT, use_devices
from .test_data_prepare import (
    assert_same_files,
    files_in,
    one_sentence,
    paragraph_jsonl,
    run_data,
    tokens_of,
)

book = test_data_prepare.book  # the shared test text (a fixture)

HUB = "owner/corpus"
SHARD = 1024  # the cache's shard size in these tests
B, T = 4, 32


class FakeHub:
    """`datasets.load_dataset` for HUB: the book's paragraphs, streamed; counts calls and rows."""

    def __init__(self, jsonl: Path) -> None:
        self.jsonl, self.calls, self.rows = jsonl, [], 0
        self.offline = False
        self._load = datasets.load_dataset

    def __call__(self, path, name=None, *, split=None, streaming=False, **kw):
        if path != HUB:
            return self._load(path, name, split=split, streaming=streaming, **kw)
        self.calls.append({"name": name, "split": split, "streaming": streaming})
        if self.offline or datasets.config.HF_HUB_OFFLINE:  # a stream is never cached
            raise ConnectionError(
                "Couldn't reach 'owner/corpus' on the Hub (LocalEntryNotFoundError)"
            )
        ds = self._load("json", data_files=[str(self.jsonl)], split="train", streaming=True)
        return ds.map(self._count)

    def _count(self, row):
        self.rows += 1
        return row


@pytest.fixture()
def hub(book, tmp_path, monkeypatch) -> FakeHub:
    docs = paragraph_jsonl(book.read_text(encoding="utf-8"), tmp_path / "hub.jsonl")
    fake = FakeHub(tmp_path / "hub.jsonl")
    fake.docs = docs
    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(_resolve, "CACHE_SHARD_TOKENS", SHARD)
    return fake


def stream_of(docs: list[str]) -> np.ndarray:
    """The token stream a preparation of `docs` holds: end-of-text, then each document."""
    tok = data.get_tokenizer("gpt2")
    return np.concatenate([[tok.eot_id, *tok.encode(d)] for d in docs])


def ensure(cache, steps, max_tokens=0, eval_batches=2) -> data.Manifest:
    need = data.tokens_needed(steps, B, T, eval_batches)
    return data.ensure_prepared(run_data(HUB, max_tokens=max_tokens), cache, need=need)


def test_prepares_what_the_run_reads_once_by_streaming(hub, hub_session, tmp_path):
    need = data.tokens_needed(20, B, T, 2)
    total = need.val + need.train
    manifest = ensure(tmp_path / "cache", 20)
    assert hub.calls == [{"name": None, "split": "train", "streaming": True}]
    assert manifest.directory == tmp_path / "cache" / f"owner--corpus-gpt2-val{need.val}"
    assert manifest.tokens("val") == need.val and manifest.tokens("train") == need.train
    np.testing.assert_array_equal(tokens_of(manifest), stream_of(hub.docs)[:total])
    assert [s.tokens for s in manifest.shards] == [need.val, SHARD, SHARD, need.train - 2 * SHARD]
    holding = np.searchsorted(np.cumsum([len(stream_of([d])) for d in hub.docs]), total) + 1
    assert hub.rows <= _prepare._BATCH_DOCS * -(-holding // _prepare._BATCH_DOCS) < len(hub.docs)
    loader = data.Loader(manifest, "train", B, T)  # one epoch is exactly the run's steps
    assert loader.steps_per_epoch == 20 and data.Loader(manifest, "val", B, T).check_eval(2) == 2
    before = files_in(manifest.directory)
    hub.offline = True  # the cache holds it: no hub needed, nor asked whether it answers
    assert ensure(tmp_path / "cache", 20) == manifest
    assert len(hub.calls) == len(hub_session.requests) == 1
    assert files_in(manifest.directory) == before


def test_a_killed_preparation_resumes_to_the_same_bytes(hub, tmp_path, monkeypatch):
    whole = ensure(tmp_path / "whole", 60).directory
    write_shard = _prepare.write_shard

    def killed_at_the_fourth(path, tokens):
        if len(list(path.parent.glob("*.bin"))) == 3:
            raise KeyboardInterrupt  # what a kill leaves: 3 shards and their progress.json
        write_shard(path, tokens)

    monkeypatch.setattr(_prepare, "write_shard", killed_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        ensure(tmp_path / "cache", 60)
    monkeypatch.setattr(_prepare, "write_shard", write_shard)
    resumed = ensure(tmp_path / "cache", 60)
    assert resumed.directory.name == whole.name
    assert_same_files(resumed.directory, whole)


def test_a_longer_run_extends_the_cache_and_a_shorter_one_reads_its_part(hub, tmp_path):
    short = ensure(tmp_path / "cache", 10)
    loader = data.Loader(short, "train", B, T)
    first, state = loader.next_batch(loader.init_state(seed=3))
    for _ in range(5):
        _, state = loader.next_batch(state)
    long = ensure(tmp_path / "cache", 60)  # e.g. --config.train.steps raised on resume
    assert long.directory == short.directory and long.tokens("train") > 5 * short.tokens("train")
    assert_same_files(long.directory, ensure(tmp_path / "direct", 60).directory)
    again = ensure(tmp_path / "cache", 10)  # a short run reads the same part of the longer cache
    assert again.tokens() == short.tokens() and again.max_tokens == short.max_tokens
    again_loader = data.Loader(again, "train", B, T)
    np.testing.assert_array_equal(
        again_loader.next_batch(again_loader.init_state(seed=3))[0], first
    )
    # Resumed on the grown cache, the short run finishes its epoch as it began, then reads all.
    grown, reference = data.Loader(long, "train", B, T), state
    for _ in range(loader.steps_per_epoch - 6):
        batch, state = grown.next_batch(state)
        expected, reference = loader.next_batch(reference)
        np.testing.assert_array_equal(batch, expected)
    assert state["epoch"] == 1 and state["tokens"] == long.tokens("train")
    assert grown.next_batch(state)[1]["step"] == 1


def test_a_finished_run_given_more_steps_reads_the_extended_cache_at_once(hub, tmp_path):
    """A run's last checkpoint holds the state of an epoch not begun (one epoch is exactly its
    steps): resumed with train.steps raised, that epoch read the finished run's tokens again
    (the same windows in another order) and left the tokens the cache was extended by for
    the epoch after; an epoch not begun now covers all the tokens of the loader that begins
    it."""
    short = ensure(tmp_path / "cache", 10)
    loader = data.Loader(short, "train", B, T)
    state = loader.init_state(seed=3)
    for _ in range(loader.steps_per_epoch):  # the whole run; its last checkpoint's state
        _, state = loader.next_batch(state)
    assert (state["epoch"], state["step"], state["tokens"]) == (1, 0, short.tokens("train"))
    long = ensure(tmp_path / "cache", 60)  # --config.train.steps=60 on resume
    grown = data.Loader(long, "train", B, T)
    assert grown.holds(state)
    began_there = {**state, "tokens": grown.tokens, "data": grown.digest(grown.tokens)}
    batch, after = grown.next_batch(state)
    expected, expected_after = grown.next_batch(began_there)
    np.testing.assert_array_equal(batch, expected)
    assert after == expected_after and after["tokens"] == long.tokens("train")
    assert grown.steps_per_epoch == 60  # the 50 steps still to run read no window twice


def test_offline_is_one_sentence_naming_what_to_do(hub, tmp_path):
    hub.offline = True
    with pytest.raises(data.DataError, match="could not be streamed from the hub") as e:
        ensure(tmp_path / "cache", 20)
    message = one_sentence(e)
    assert "Couldn't reach 'owner/corpus'" in message
    assert (
        f"--dataset={HUB} --out=<dir>` where the hub is reachable and set data.dataset" in message
    )
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]


def test_a_missing_relative_path_taken_for_a_hub_name_is_said_not_to_exist(
    hub_session, tmp_path, monkeypatch
):
    """--dataset=data/book or data.dataset=data/book missing here (mistyped, or run from
    another directory) is read as the hub dataset "data/book", and its error spoke of the hub
    alone; it now also says there is no such local file or directory."""
    monkeypatch.chdir(tmp_path)
    hub_session.error = ConnectionError("[Errno -2] Name or service not known")
    need = data.tokens_needed(20, B, T, 2)
    for read in (
        lambda: data.prepare_dataset("data/book", "out", workers=1, progress=False),
        lambda: data.ensure_prepared(run_data("data/book"), "cache", need=need),
        lambda: data.ensure_prepared(run_data("data/book", "char"), "cache", need=need),
    ):
        with pytest.raises(data.DataError) as e:
            read()
        assert f"and no local file or directory data/book exists in {tmp_path};" in one_sentence(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # its lock files, gone


def test_an_unreachable_hub_is_asked_once_briefly_then_the_cache_only(hub, hub_session, tmp_path):
    """Offline, `datasets` asked the hub 6 times over about 25 s (minutes behind a firewall that
    drops packets), with a warning per attempt, before its error: now one request, waiting at
    most HF_HUB_ETAG_TIMEOUT, then the cache only (offline mode), and the request's error."""
    hub_session.error = ConnectionError("[Errno -2] Name or service not known")
    with pytest.raises(data.DataError, match="could not be streamed from the hub") as e:
        ensure(tmp_path / "cache", 20)
    reason = "https://huggingface.co did not answer ([Errno -2] Name or service not known)"
    local = f"no local file or directory {HUB} exists in {Path.cwd()}"  # "owner/name" could be
    expected = f"({reason}, and it is not cached), and {local}; connect to the network"
    assert expected in one_sentence(e)
    timeout = {"timeout": constants.HF_HUB_ETAG_TIMEOUT}
    assert hub_session.requests == [(constants.ENDPOINT, timeout)]
    assert not constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE  # as they were


def test_hf_hub_offline_set_by_the_user_asks_the_hub_nothing(hub_session, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_unreachable() == "HF_HUB_OFFLINE is set"
    assert not hub_session.requests
    match = "HF_HUB_OFFLINE is set, and it is not cached"
    with pytest.raises(data.HubUnreachableError, match=match), data.hub_or_cache():
        raise ConnectionError("Couldn't reach 'owner/corpus' on the Hub (OfflineModeIsEnabled)")
    assert constants.HF_HUB_OFFLINE  # the user's setting stays


def test_an_error_not_of_the_hub_passes_through_an_unreachable_hub(hub_session, tmp_path):
    """Offline, every error of the block became "the hub did not answer, and it is not cached":
    a local file missing (a harness task YAML's data, say) read as the hub's fault. Only the
    libraries' offline errors (nothing cached) are the hub's; the others are raised as
    `datasets` raises them with the hub answering."""
    missing = str(tmp_path / "missing.jsonl")
    load = lambda: datasets.load_dataset("json", data_files=[missing], split="train")
    with pytest.raises(Exception) as online:
        load()
    hub_session.error = ConnectionError("[Errno -2] Name or service not known")
    with pytest.raises(type(online.value)) as offline, data.hub_or_cache():
        load()
    assert str(offline.value) == str(online.value)


# A fresh interpreter whose hub does not answer imports `datasets` inside the block, then prints
# its offline switch after the block.
IMPORTED_IN_THE_BLOCK = """
import huggingface_hub
from jaxpt import data

class Unreachable:
    def head(self, url, **settings):
        raise ConnectionError("[Errno -2] Name or service not known")

huggingface_hub.get_session = lambda: Unreachable()
with data.hub_or_cache():
    import datasets
print(datasets.config.HF_HUB_OFFLINE)
"""


def test_datasets_imported_in_the_block_is_not_left_offline():
    """`datasets` copies the hub's offline switch when imported: imported inside the block of
    an unreachable hub, it stayed offline for the rest of the process (every later load read
    its cache only, the hub answering or not); it now reads as `datasets` imported in a plain
    interpreter (HF_HUB_OFFLINE and HF_DATASETS_OFFLINE unset: online)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}

    def offline_switch(code: str) -> str:
        command = [sys.executable, "-c", code]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    plain = offline_switch("import datasets; print(datasets.config.HF_HUB_OFFLINE)")
    assert plain == "False"
    assert offline_switch(IMPORTED_IN_THE_BLOCK) == plain


def test_processes_sharing_the_cache_take_turns(hub, tmp_path):
    results = []

    def run():
        results.append(ensure(tmp_path / "cache", 20))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and results[0] == results[1] == results[2]
    assert len(hub.calls) == 1  # one prepared; the others waited, then found it there


@pytest.mark.parametrize(
    "tokenizer, max_tokens, match",
    [
        ("char", 0, "builds its vocabulary from a whole corpus"),
        ("gpt2", 100, "than the 257 validation tokens .* raise it to at least 418, or set it to 0"),
        ("gpt2", -2, "must be 0 or -1"),
    ],
)
def test_config_errors(hub, tmp_path, tokenizer, max_tokens, match):
    need = data.tokens_needed(20, B, T, 2)
    with pytest.raises(data.DataError, match=match) as e:
        data.ensure_prepared(run_data(HUB, tokenizer, max_tokens), tmp_path, need=need)
    one_sentence(e)
    assert not hub.calls


def test_max_tokens_below_a_first_batch_names_the_least_that_trains(hub, tmp_path):
    with pytest.raises(data.DataError, match=r"data.max_tokens=417 .* at least 418,") as e:
        ensure(tmp_path / "cache", 20, max_tokens=417)  # validation full, 160 training tokens
    one_sentence(e)
    assert not hub.calls
    manifest = ensure(tmp_path / "cache", 20, max_tokens=418)  # the value named: one batch
    assert data.Loader(manifest, "train", B, T).steps_per_epoch == 1
    assert data.Loader(manifest, "val", B, T).check_eval(2) == 2


def test_max_tokens_sets_how_much_is_prepared_and_read(hub, tmp_path):
    manifest = ensure(tmp_path / "cache", 20, max_tokens=5000)
    assert manifest.tokens() == 5000 and manifest.tokens("val") == 257
    assert data.Loader(manifest, "train", B, T).steps_per_epoch == ((5000 - 257 - 1) // T - 1) // B
    with pytest.raises(
        data.DataError, match="a token count for a hub dataset prepared on first use"
    ):
        data.ensure_prepared(run_data("embedded", max_tokens=5000), tmp_path)


def test_the_design_command_trains_on_a_hub_dataset(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXPT_CACHE_DIR", str(tmp_path / "cache"))
    use_devices(monkeypatch, 2)  # data parallel over two devices, not eight: faster
    config = preset_config("gqa_glu_rope_gpt", "smoke")
    config.data.dataset = HUB
    config.train.update(steps=3, batch_size=8)
    config.eval.update(batches=1, every_steps=3)
    config.checkpoint.every_steps = 3
    train.train(config, tmp_path / "run")
    records = train.read_metrics(tmp_path / "run/metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    (cache,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    need = data.tokens_needed(3, 8, config.model.block_size, 1)
    assert json.loads((cache / "manifest.json").read_text())["tokens"] == {
        "val": need.val,
        "train": need.train,
    }
