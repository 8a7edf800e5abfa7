"""Evaluation: the HellaSwag scorer against a float64 numpy recomputation, padding, batch size
and the mesh; items from a file or the hub; ``--mode=eval``; the lm-evaluation-harness adapter."""

import dataclasses
import errno
import functools
import gzip
import json
import os
import re
import shutil
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from huggingface_hub import constants

from jaxpt import data, evals, generate, hf, launcher, models, sharding, train
from jaxpt.config import preset_config
from jaxpt.errors import ConfigError, DataError, DataNotFoundError
from jaxpt.evals import hellaswag

from .test_checkpoints import snapshot
from .test_data_tokenizers import build_hf_tokenizer
from .test_models import perturbed, tiny_config
from .test_train import char_config

# Contexts long and short: with a 32-token model some windows drop their oldest characters.
ITEMS = [
    hellaswag.Item(
        "In this city lived a merchant named Increase. He possessed a heap of",
        ("numerous virtues.", "soot and ash", "a very little", "money, earned"),
        0,
    ),
    hellaswag.Item(
        "Riches unearned", ("should be earned.", "is", "grows like an ant-hill", "be"), 0
    ),
    hellaswag.Item(
        "What is earned, should be",
        ("guarded.", "pecked at, and it sinks like a pile of soot", "abundant", "in a flash"),
        0,
    ),
    hellaswag.Item(
        "Even an abundant store of wealth, if pecked at, sinks together like a pile of",
        ("soot.", "merit", "walls that recalled the high-uplifted Himalayas", "night"),
        3,
    ),
    hellaswag.Item("A very little, if added to,", ("grows.", "sinks", "flashes", "hoards"), 1),
]
CHARS = data.CharTokenizer.from_texts(
    [item.context + " " + " ".join(item.endings) for item in ITEMS]
)
BLOCK = 32


def model(name: str):
    cfg = dataclasses.replace(tiny_config(name), vocab_size=64)
    if isinstance(cfg, models.ModelConfig):
        cfg = dataclasses.replace(cfg, block_size=BLOCK)
    return cfg, models.get(name).init(jax.random.key(1), cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def forward(params, tokens, *, cfg):
    """The model's logits for unpadded ``(1, T)`` tokens."""
    return models.get(cfg.name).apply(params, tokens, cfg)[0]


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    peak = logits.max(-1, keepdims=True)
    return logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))


def reference_losses(name, cfg, params, item):
    """Float64 summed and mean ending losses: each window alone, unpadded, its oldest tokens
    dropped past the model's length; bigram logits are its table's rows, in float64."""
    context = CHARS.encode(item.context)
    sums, means = [], []
    for ending in item.endings:
        ending_ids = CHARS.encode(" " + ending)
        tokens = np.array(context + ending_ids)
        if cfg.max_length is not None:
            tokens = tokens[-(cfg.max_length + 1) :]
        if name == "bigram":
            logits = np.asarray(params.table.weight, np.float64)[tokens[:-1]]
        else:
            logits = np.asarray(forward(params, tokens[None, :-1], cfg=cfg)[0])
        nll = -np.take_along_axis(log_softmax64(logits), tokens[1:, None], 1)[:, 0]
        scored = nll[-min(len(ending_ids), len(nll)) :]
        sums.append(scored.sum())
        means.append(scored.mean())
    return np.array(sums), np.array(means)


@pytest.mark.parametrize(
    "name, on_a_mesh", [("gpt", True), ("tiny_moe", False), ("tiny_moe_3", False), ("bigram", True)]
)
def test_hellaswag_matches_a_float64_recomputation_padded_batched_or_sharded(name, on_a_mesh):
    """Batches of 6 endings (padded: their windows differ in length) on one device and, where
    ``on_a_mesh``, of 4 split over a data x fsdp x tensor mesh of the 8 test devices, score as
    each ending alone (the MoE presets' mesh is left to save compile time: test_moe runs it)."""
    cfg, params = model(name)
    results = [hellaswag.evaluate(params, cfg, ITEMS, CHARS, batch_size=6)]
    if on_a_mesh:
        mesh = sharding.make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
        rules = sharding.default_rules()
        sharded = jax.device_put(params, sharding.param_shardings(params, mesh, rules))
        results.append(
            hellaswag.evaluate(sharded, cfg, ITEMS, CHARS, batch_size=4, mesh=mesh, rules=rules)
        )
    for result in results:
        assert len(result.items) == len(ITEMS)
        for item, got in zip(ITEMS, result.items, strict=True):
            sums, means = reference_losses(name, cfg, params, item)
            np.testing.assert_allclose(got.sum_losses, sums, rtol=2e-5)
            np.testing.assert_allclose(got.mean_losses, means, rtol=2e-5)
            assert (got.choice, got.choice_norm, got.label) == (
                np.argmin(sums),
                np.argmin(means),
                item.label,
            )
    choices = np.array([(r.choice, r.choice_norm, r.label) for r in result.items])
    assert result.summary() == {
        "acc": np.mean(choices[:, 0] == choices[:, 2]),
        "acc_norm": np.mean(choices[:, 1] == choices[:, 2]),
        "items": len(ITEMS),
    }


def test_hellaswag_scores_float32_logits_whatever_the_models_logits_dtype():
    """The presets read out bfloat16 logits (``logits_dtype``, for training's memory); GPT-2's
    reach about 100 in magnitude, where bfloat16 rounds by 0.5: the endings' losses moved by
    tenths of a nat each. Scoring reads out float32 logits, as the float64 reference does."""
    cfg, params = model("gpt")
    cfg = dataclasses.replace(cfg, logits_dtype="bfloat16")
    wte = jax.tree.map(lambda w: w * 70, params.wte)  # the tied read-out: logits up to ~100
    params = dataclasses.replace(params, wte=wte)
    exact = dataclasses.replace(cfg, logits_dtype="float32")
    context = jnp.array([CHARS.encode(ITEMS[0].context)[:BLOCK]])
    assert np.abs(forward(params, context, cfg=exact)).max() > 64  # bfloat16 steps of 0.5
    result = hellaswag.evaluate(params, cfg, ITEMS, CHARS, batch_size=6)
    for item, got in zip(ITEMS, result.items, strict=True):
        sums, _ = reference_losses("gpt", exact, params, item)
        np.testing.assert_allclose(got.sum_losses, sums, rtol=2e-5)


def mesh_config(**sizes):
    mesh = preset_config("gpt", None).mesh
    mesh.update(sizes)
    return mesh


def test_a_batch_that_does_not_divide_over_the_mesh_is_one_sentence():
    cfg, params = model("bigram")
    mesh = sharding.make_mesh(mesh_config(data=8))
    with pytest.raises(ConfigError, match="batch of 6 rows does not divide over the 8 devices"):
        hellaswag.evaluate(
            params, cfg, ITEMS, CHARS, batch_size=6, mesh=mesh, rules=sharding.default_rules()
        )


# ----------------------------------------------------------------------------- items


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def original_rows():
    """ITEMS as the original jsonl holds them: ctx_a, ctx_b, ctx, endings, integer label."""
    rows = []
    for item in ITEMS:
        first, _, rest = item.context.partition(" ")
        rows.append(
            {"ctx_a": first, "ctx_b": rest, "ctx": item.context, "endings": list(item.endings)}
            | {"label": item.label}
        )
    return rows


def test_items_from_a_file_in_either_context_form(tmp_path):
    rows = original_rows()
    assert hellaswag.load_items(write_jsonl(tmp_path / "a.jsonl", rows)) == ITEMS
    split = [{k: v for k, v in row.items() if k != "ctx"} for row in rows]
    assert hellaswag.load_items(write_jsonl(tmp_path / "b.jsonl", split)) == ITEMS
    marked = tmp_path / "bom.jsonl"  # Windows editors may start UTF-8 with a byte-order mark
    marked.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "a.jsonl").read_bytes())
    assert hellaswag.load_items(marked) == ITEMS


@pytest.mark.parametrize(
    "row, message",
    [
        ({"ctx": "a", "endings": ["b", "c"], "label": 2}, "label=2 must be the index"),
        ({"ctx": "a", "endings": "bc", "label": 0}, "endings must be a list"),
        ({"endings": ["b", "c"], "label": 0}, "has no context"),
        # not text: " ".join stopped --mode=eval and training in a TypeError traceback
        ({"ctx_a": 5, "ctx_b": "a", "endings": ["b", "c"], "label": 0}, "has no context"),
        ({"ctx_a": ["a"], "endings": ["b", "c"], "label": 0}, "has no context"),
    ],
)
def test_a_bad_item_is_one_sentence_naming_its_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [original_rows()[0], row])
    with pytest.raises(DataError, match=f"line 2.*{message}"):
        hellaswag.load_items(path)


@pytest.mark.parametrize(
    "encode, name, message",
    [
        (lambda text: text.encode("latin-1"), "items.jsonl", r"byte 0xe9 on line 2\)"),
        (lambda text: gzip.compress(text.encode()), "items.jsonl.gz", r"is gzip-compressed"),
    ],
    ids=["latin-1", "gzip"],
)
def test_a_file_that_is_not_utf8_jsonl_is_one_sentence_naming_it(tmp_path, encode, name, message):
    """A Latin-1 file, or a gzipped one, stopped --mode=eval and training with a
    UnicodeDecodeError traceback; now one sentence naming the file and what to do."""
    cafe = {"ctx": "The café was", "endings": ["open.", "shut."], "label": 0}
    rows = [original_rows()[0], cafe]
    path = tmp_path / name
    path.write_bytes(encode("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} is not UTF-8 jsonl.*{message}"):
        hellaswag.load_items(path)


def test_items_keep_line_separators_that_json_allows_raw(tmp_path):
    """U+2028, U+2029 and U+0085 are raw text inside a JSON string (json.dumps(...,
    ensure_ascii=False) writes them so); the file was split at them too, so such an item was
    "not a JSON object" and the lines after it misnumbered. Lines end at "\n" (or "\r\n")."""
    odd = hellaswag.Item("A man\u0085 walks in", ("the rain.\u2028He smiles.", "the\u2029cat"), 0)
    text = "".join(
        json.dumps(row, ensure_ascii=False) + end
        for row, end in zip(
            [*original_rows()[:2], {"ctx": odd.context, "endings": list(odd.endings), "label": 0}],
            ["\n", "\r\n", "\n"],
            strict=True,
        )
    )
    path = tmp_path / "items.jsonl"
    path.write_bytes(text.encode())
    assert hellaswag.load_items(path) == [*ITEMS[:2], odd]
    path.write_bytes((text + '{"ctx": "a", "endings": ["b", "c"], "label": 2}\n').encode())
    with pytest.raises(DataError, match=r"line 4: label=2 must be the index"):
        hellaswag.load_items(path)


def test_an_ending_of_no_token_is_one_sentence_naming_its_item(tmp_path):
    """A word-level tokenizer encodes an empty ending (" ") to no token: its summed and mean
    losses were 0, the lowest any ending can have, so it was picked whatever the model. Now
    one sentence naming the item, before anything is scored."""
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    tokenizer = word_tokenizer(directory)
    assert tokenizer.encode(" ") == []
    items = [hellaswag.Item("w1 w2", ("w3", "w4"), 0), hellaswag.Item("w1 w2", ("w3", "", "w4"), 0)]
    cfg = dataclasses.replace(tiny_config("bigram"), vocab_size=99)
    params = models.get("bigram").init(jax.random.key(1), cfg)
    with pytest.raises(DataError, match=r"^HellaSwag item 2 of 2 has an ending the tokenizer enc"):
        hellaswag.evaluate(params, cfg, items, tokenizer, batch_size=4)


def test_a_context_of_no_token_is_one_sentence_naming_its_item(tmp_path):
    """A context of spaces, which a word-level tokenizer encodes to no token, was accepted
    when the items were read and tokenized, then stopped the scoring (in training, at the
    first HellaSwag evaluation, after its steps) in 'a scored continuation needs at least
    one context token', naming no item. Now one sentence naming it, when it is tokenized."""
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    tokenizer = word_tokenizer(directory)
    items = [hellaswag.Item("w1 w2", ("w3", "w4"), 0), hellaswag.Item("  ", ("w3", "w4"), 0)]
    with pytest.raises(DataError, match=r"^HellaSwag item 2 of 2 has a context the tokenizer e"):
        hellaswag.requests(items, tokenizer)


def test_items_from_the_hub_and_offline_one_sentence(tmp_path, monkeypatch):
    """The hub's copy (label as text) through `datasets.load_dataset`, here a local file."""
    hub_rows = [row | {"label": str(row["label"])} for row in original_rows()]
    local = write_jsonl(tmp_path / "hub.jsonl", hub_rows)
    load = datasets.load_dataset

    def fake_hub(path, *, split):
        assert (path, split) == (hellaswag.HUB_DATASET, "validation")
        return load("json", data_files=[str(local)], split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    assert hellaswag.load_items() == ITEMS

    def unreachable(path, *, split):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFound)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataNotFoundError, match=r"connect to the network once.*hellaswag_path"):
        hellaswag.load_items()


def test_an_unreachable_hub_is_one_sentence_at_once_and_the_cache_still_loads(
    tmp_path, monkeypatch, hub_session
):
    """Offline, `datasets` asked the hub 6 times over about 25 s (minutes behind a firewall that
    drops packets), a warning per attempt, before the sentence: now the hub is asked once and
    `datasets` reads its cache only, as with HF_HUB_OFFLINE=1, at once."""
    hub_session.error = ConnectionError("[Errno -2] Name or service not known")
    cache = tmp_path / "cached.jsonl"
    load = datasets.load_dataset

    def cache_only(path, *, split):
        if not (datasets.config.HF_HUB_OFFLINE and constants.HF_HUB_OFFLINE):
            raise AssertionError("the hub asked again, with retries")
        if not cache.exists():
            raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (OfflineMode...)")
        return load("json", data_files=[str(cache)], split="train")

    monkeypatch.setattr(datasets, "load_dataset", cache_only)
    with pytest.raises(DataNotFoundError) as error:
        hellaswag.load_items()
    assert str(error.value).startswith(
        "HellaSwag's validation split could not be loaded from the Hugging Face hub "
        "(Rowan/hellaswag: https://huggingface.co did not answer ([Errno -2] Name or service "
        "not known), and it is not cached); connect to the network once"
    )
    write_jsonl(cache, original_rows())
    assert hellaswag.load_items() == ITEMS
    assert not datasets.config.HF_HUB_OFFLINE and not constants.HF_HUB_OFFLINE  # as they were


# ----------------------------------------------------------------------------- harness


def harness_or_skip():
    """jaxpt.evals.harness, or a skip saying why (lm-eval is the optional `harness` extra)."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (uv sync --extra harness)")
    from jaxpt.evals import harness

    return harness


TASK_YAML = """\
task: local_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {jsonl}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def test_harness_multiple_choice_task_asks_for_the_native_scores(tmp_path):
    """A harness task over HellaSwag items: its requests' log-likelihoods are the native
    scorer's summed ending losses, negated, and its acc is the native acc."""
    harness = harness_or_skip()
    import lm_eval

    jsonl = write_jsonl(tmp_path / "items.jsonl", original_rows())
    task = tmp_path / "local_hellaswag.yaml"
    task.write_text(TASK_YAML.format(jsonl=jsonl))
    cfg, params = model("bigram")
    native = hellaswag.evaluate(params, cfg, ITEMS, CHARS, batch_size=6)
    lm = harness.JaxptLM(params, cfg, CHARS, batch_size=6)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[str(task)],
        task_manager=lm_eval.tasks.TaskManager(include_defaults=False),
        log_samples=True,
    )
    samples = sorted(out["samples"]["local_hellaswag"], key=lambda s: s["doc_id"])
    for sample, item in zip(samples, native.items, strict=True):
        logliks = [loglik for loglik, _ in sample["filtered_resps"]]
        np.testing.assert_allclose(logliks, -np.array(item.sum_losses), rtol=1e-6)
    assert out["results"]["local_hellaswag"]["acc,none"] == pytest.approx(native.acc)
    metrics = harness.evaluate(params, cfg, CHARS, harness.load_tasks([str(task)]), batch_size=6)
    assert metrics["local_hellaswag"]["acc,none"] == pytest.approx(native.acc)
    count = metrics["local_hellaswag"]["sample_len"]  # printed 4.0000 in the results table
    assert type(count) is int and count == len(native.items)


def test_harness_unknown_task_and_unloadable_data_are_one_sentence(tmp_path, monkeypatch):
    """A task that is neither registered nor a YAML file is a ConfigError; a task whose data
    cannot be loaded (a local file missing: it was a FileNotFoundError traceback; the hub
    unreachable: datasets' ConnectionError) a DataNotFoundError, when the tasks load."""
    harness = harness_or_skip()

    for task in ["no_such_task", str(tmp_path / "missing.yaml")]:
        with pytest.raises(ConfigError, match=f"harness:{re.escape(task)} is neither a task YAML"):
            harness.check_tasks([task])
    with pytest.raises(ConfigError, match=r"registers \(close: arc_easy"):
        harness.check_tasks(["arc_eassy"])
    task = tmp_path / "local_hellaswag.yaml"
    task.write_text(TASK_YAML.format(jsonl=tmp_path / "missing.jsonl"))
    with pytest.raises(DataNotFoundError, match=r"load the data of .*missing\.jsonl.*; connect"):
        harness.load_tasks([str(task)])

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    task.write_text(TASK_YAML.format(jsonl=write_jsonl(tmp_path / "items.jsonl", original_rows())))
    with pytest.raises(DataNotFoundError, match=r"load the data of .*Couldn't reach.*; connect"):
        harness.load_tasks([str(task)])


@pytest.mark.parametrize(
    "old, new, cause",
    [
        ("task: local_hellaswag", "task: bad\n  x: [", "ScannerError: mapping values are not"),
        ("output_type: multiple_choice", "output_type: multiple_choise", "ValueError: Got "),
        ("{{{{endings}}}}", "{{{{choices}}}}", "UndefinedError: 'choices' is undefined"),
        ("metric_list:", "no_such_field: 1\nmetric_list:", "TypeError: TaskConfig.__init__"),
    ],
)
def test_harness_a_task_yaml_lm_eval_cannot_read_is_one_sentence_naming_it(
    tmp_path, old, new, cause
):
    """A YAML syntax error, an unknown output_type or field, a Jinja field the data lacks: each
    was 'could not load the data of ...; connect to the network once', advice about the
    network for a task definition lm-eval refuses. Its data's file is there."""
    harness = harness_or_skip()
    jsonl = write_jsonl(tmp_path / "items.jsonl", original_rows())
    task = tmp_path / "local.yaml"
    task.write_text(TASK_YAML.replace(old, new).format(jsonl=jsonl))
    message = rf"^task YAML {re.escape(str(task))} is not a valid lm-eval task \({cause}.*; fix it"
    with pytest.raises(ConfigError, match=message) as error:
        harness.load_tasks([str(task)])
    assert "\n" not in str(error.value) and "network" not in str(error.value)


def test_harness_a_group_yaml_is_one_sentence(tmp_path):
    """A group YAML file over task YAMLs beside it stopped in lm-eval's own TypeError (its
    members resolve only on an include path), reported as data that could not load."""
    harness = harness_or_skip()
    jsonl = write_jsonl(tmp_path / "items.jsonl", original_rows())
    (tmp_path / "local.yaml").write_text(TASK_YAML.format(jsonl=jsonl))
    group = tmp_path / "group.yaml"
    group.write_text("group: mine\ntask:\n  - local_hellaswag\n")
    message = rf"^task YAML {re.escape(str(group))} defines a group \(mine\), .*; name the YAML"
    with pytest.raises(ConfigError, match=message):
        harness.load_tasks([str(tmp_path / "local.yaml"), str(group)])


def test_harness_data_from_an_unreachable_hub_is_one_sentence_at_once(
    tmp_path, monkeypatch, hub_session
):
    """Offline, loading `harness:arc_easy` printed 53 lines over 35 s (`datasets`' retries)
    before its sentence: now the hub is asked once, then `datasets` reads its cache only."""
    harness = harness_or_skip()
    hub_session.error = ConnectionError("[Errno -2] Name or service not known")

    def cache_only(*args, **kwargs):
        if not (datasets.config.HF_HUB_OFFLINE and constants.HF_HUB_OFFLINE):
            raise AssertionError("the hub asked again, with retries")
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineMode...)")

    monkeypatch.setattr(datasets, "load_dataset", cache_only)
    task = tmp_path / "local_hellaswag.yaml"
    task.write_text(TASK_YAML.format(jsonl=write_jsonl(tmp_path / "items.jsonl", original_rows())))
    reason = "https://huggingface.co did not answer ([Errno -2] Name or service not known)"
    with pytest.raises(DataNotFoundError, match=re.escape(f"({reason}, and it is not cached)")):
        harness.load_tasks([str(task)])


def test_harness_rolling_loglikelihood_and_generation():
    """Rolling: every token of a text once, in windows of the model's length (here 32),
    against the model's float64 losses of each window alone. Generation: greedy, cut at
    `until`."""
    harness = harness_or_skip()
    from lm_eval.api.instance import Instance

    cfg, params = model("gpt")
    lm = harness.JaxptLM(params, cfg, CHARS, batch_size=6)
    texts = [ITEMS[1].context, ITEMS[0].context]  # one window; three
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    got = lm.loglikelihood_rolling(requests)
    for text, value in zip(texts, got, strict=True):
        tokens = [CHARS.eot_id, *CHARS.encode(text)]
        expected, predicted = 0.0, 0  # tokens[1 : predicted + 1] are scored
        while predicted < len(tokens) - 1:
            end = min(predicted + BLOCK, len(tokens) - 1)  # predict tokens up to index end
            window = np.array(tokens[max(end - BLOCK, 0) : end + 1])
            logits = np.asarray(forward(params, window[None, :-1], cfg=cfg)[0])
            nll = -np.take_along_axis(log_softmax64(logits), window[1:, None], 1)[:, 0]
            expected -= nll[-(end - predicted) :].sum()
            predicted = end
        assert value == pytest.approx(expected, rel=1e-5)

    bigram_cfg, bigram_params = model("bigram")
    bigram = harness.JaxptLM(bigram_params, bigram_cfg, CHARS, batch_size=6)

    def until(stops):
        options = {"until": stops, "max_gen_toks": 8}
        request = Instance("generate_until", {}, ("Riches ", options), 0)
        return bigram.generate_until([request])[0]

    whole = until([])
    assert len(CHARS.encode(whole)) <= 8
    stop = whole[3:5]
    assert until([stop]) == whole[: whole.index(stop)]


def bigram_greedy_text(params, context: str, n: int) -> str:
    """Reference: the bigram's greedy continuation of ``context``, a python loop over its
    table's rows (the tokenizer's ids only), stopping at end-of-text."""
    table = np.asarray(params.table.weight, np.float64)[:, : CHARS.vocab_size]
    ids = CHARS.encode(context)
    for _ in range(n):
        ids.append(int(np.argmax(table[ids[-1]])))
        if ids[-1] == CHARS.eot_id:
            return CHARS.decode(ids[len(CHARS.encode(context)) : -1])
    return CHARS.decode(ids[len(CHARS.encode(context)) :])


def harness_generations(options: dict, copies: int = 1, batch_size: int = 6) -> list[str]:
    """The bigram harness model's ``generate_until`` answers to ``copies`` identical requests
    continuing "Riches " with ``options``."""
    harness = harness_or_skip()
    from lm_eval.api.instance import Instance

    cfg, params = model("bigram")
    lm = harness.JaxptLM(params, cfg, CHARS, batch_size=batch_size)
    requests = [Instance("generate_until", {}, ("Riches ", options), i) for i in range(copies)]
    return lm.generate_until(requests)


def test_harness_generation_reads_its_options_as_lm_eval_normalises_them():
    """lm-eval's aliases of max_gen_toks (max_new_tokens, max_tokens) were ignored (256 tokens
    were drawn), and a temperature without do_sample was greedy where lm-eval samples."""
    _, params = model("bigram")
    for alias in ("max_new_tokens", "max_tokens"):
        (answer,) = harness_generations({"until": [], alias: 3})
        assert answer == bigram_greedy_text(params, "Riches ", 3)
    greedy = bigram_greedy_text(params, "Riches ", 8)
    assert harness_generations({"until": [], "max_gen_toks": 8}) == [greedy]
    assert harness_generations({"until": [], "max_gen_toks": 8, "temperature": 0.0}) == [greedy]
    (sampled,) = harness_generations({"until": [], "max_gen_toks": 8, "temperature": 50.0})
    assert sampled != greedy


def test_harness_sampling_keeps_to_top_k_and_top_p():
    """A sampling task's top_k and top_p were ignored: top_k=1 or a tiny top_p at a high
    temperature drew other tokens than the greedy ones; a top_k beyond the vocabulary keeps
    all of it (as transformers does) rather than being refused."""
    _, params = model("bigram")
    greedy = bigram_greedy_text(params, "Riches ", 8)
    hot = {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 50.0}
    assert harness_generations(hot | {"top_k": 1}) == [greedy]
    assert harness_generations(hot | {"top_p": 1e-6}) == [greedy]
    assert harness_generations(hot | {"top_k": 1000}) == harness_generations(hot)
    assert harness_generations(hot) != [greedy]


def test_harness_asked_for_no_tokens_answers_the_empty_string():
    """max_gen_toks=0 was a ConfigError about max_new_tokens, which the task never set; lm-eval
    answers "" (at most no tokens). A negative one is one sentence naming max_gen_toks."""
    assert harness_generations({"until": ["."], "max_gen_toks": 0}, copies=2) == ["", ""]
    with pytest.raises(ConfigError, match=r"^max_gen_toks=-1 must be an integer >= 0\.$"):
        harness_generations({"until": ["."], "max_gen_toks": -1})


@pytest.mark.parametrize("batch_size", [0, "auto"])
def test_harness_a_batch_size_that_is_not_a_count_is_one_sentence_when_made(batch_size):
    """JaxptLM took any batch_size: 0 or lm-eval's "auto" stopped generate_until in range()'s
    ValueError or TypeError, and loglikelihood only when it scored, after lm-eval had built
    every request. Now one sentence when the model is made."""
    harness = harness_or_skip()
    cfg, params = model("bigram")
    with pytest.raises(ConfigError, match=rf"^batch_size={batch_size!r} must be an integer >= 1"):
        harness.JaxptLM(params, cfg, CHARS, batch_size=batch_size)


@pytest.mark.parametrize(
    "option",
    [
        {"num_beams": 4},
        {"min_p": 0.1},
        {"repetition_penalty": 1.3},
        {"presence_penalty": 0.5},
        {"no_repeat_ngram_size": 3},
    ],
)
def test_harness_refuses_a_generation_option_it_would_ignore(monkeypatch, option):
    """lm-eval passes a task's generation_kwargs through to the model; options jaxpt does not
    implement were dropped silently, so the answers were not the ones the task asks for. The
    first is named in one sentence before any request of the batch is generated."""
    harness = harness_or_skip()
    from lm_eval.api.instance import Instance

    def never(*args, **kwargs):
        raise AssertionError("generated before the options were checked")

    monkeypatch.setattr(harness, "generate", never)
    cfg, params = model("bigram")
    lm = harness.JaxptLM(params, cfg, CHARS, batch_size=6)
    plain = {"until": [], "max_gen_toks": 8}
    batch = [
        Instance("generate_until", {}, ("Riches ", options), i, ("t", i, 1))
        for i, options in enumerate([plain, plain | option])
    ]
    ((name, value),) = option.items()
    with pytest.raises(
        ConfigError, match=rf"^lm-evaluation-harness task t asks .* {name}={value}, which"
    ) as e:
        lm.generate_until(batch)
    assert "\n" not in str(e.value)


def test_harness_takes_options_at_the_values_that_turn_them_off():
    """num_beams=1, repetition_penalty=1.0, min_p=0.0 (transformers' defaults) change nothing:
    the answer is the greedy python-loop reference's."""
    _, params = model("bigram")
    off = {"num_beams": 1, "repetition_penalty": 1.0, "min_p": 0.0, "presence_penalty": None}
    (answer,) = harness_generations({"until": [], "max_gen_toks": 8} | off)
    assert answer == bigram_greedy_text(params, "Riches ", 8)


def test_harness_refuses_a_generation_task_with_such_an_option_when_it_loads(tmp_path):
    """--mode=eval loads the tasks before the params: a generate_until task whose
    generation_kwargs jaxpt would ignore is refused then."""
    harness = harness_or_skip()
    task = tmp_path / "beams.yaml"
    task.write_text(
        GENERATION_YAML.format(jsonl=write_jsonl(tmp_path / "items.jsonl", original_rows()))
    )
    with pytest.raises(ConfigError, match=r"task beams asks generate_until for num_beams=4,"):
        harness.load_tasks([str(task)])
    task.write_text(task.read_text().replace("num_beams: 4", "num_beams: 1"))
    assert [t.config.task for t in harness.load_tasks([str(task)])] == ["beams"]


GENERATION_YAML = """\
task: beams
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {jsonl}
output_type: generate_until
validation_split: validation
doc_to_text: "{{{{ctx}}}}"
doc_to_target: "{{{{endings[0]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  num_beams: 4
metric_list:
  - metric: exact_match
"""


def test_harness_repeats_of_a_sampled_request_differ_across_batches():
    """Every batch sampled with one fixed key, so a task's repeats (self-consistency draws
    several answers per question) were one answer repeated whenever they fell in different
    batches. Each batch's key now differs; the same requests still give the same answers."""
    hot = {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 50.0}
    one_by_one = harness_generations(hot, copies=3, batch_size=1)
    assert len(set(one_by_one)) == 3, one_by_one
    assert harness_generations(hot, copies=3, batch_size=1) == one_by_one


def hf_backend_reference(tmp_path, cfg, params, tokenizer):
    """The model exported with ``tokenizer`` to transformers and, over it, lm-eval's HF
    backend in miniature: ``HFLM`` itself needs accelerate, which is not in jaxpt's lock, so
    this is its arithmetic on lm-eval's own request encoding (``TemplateLM``: the context's
    trailing whitespace moved onto the continuation, the pair encoded whole, an empty context
    the prefix token: the tokenizer's BOS, else its EOS; a text that starts with the prefix
    token's text without the template's special tokens) and rolling windows after the prefix
    token, scored by torch (``HFLM._loglikelihood_tokens``: the last ``max_length + 1``
    tokens, the continuation's logits last, a continuation of no token or of more than
    ``max_length`` an AssertionError); ``generate`` is greedy ``model.generate`` on the
    context's last ``max_length - max_gen_toks`` tokens (none: an AssertionError), cut at
    each ``until`` (``HFLM.generate_until``)."""
    torch = pytest.importorskip("torch", reason="HF parity needs torch (see tests/test_hf.py)")
    transformers = pytest.importorskip("transformers", reason="HF parity needs transformers")
    harness_or_skip()
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    hf.save_pretrained(params, cfg, tmp_path, tokenizer=tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    max_length = model.config.max_position_embeddings

    def log_probs(tokens, n_scored):  # log p and greedy hit of the last n_scored tokens
        tokens = tokens[-(max_length + 1) :]
        with torch.no_grad():
            logits = model(torch.tensor([tokens[:-1]])).logits[0, -n_scored:].double()
        targets = torch.tensor(tokens[-n_scored:])
        picked = logits.log_softmax(-1).gather(1, targets[:, None])
        return float(picked.sum()), bool((logits.argmax(-1) == targets).all())

    class Reference(TemplateLM):
        eot_token_id = tokenizer.eos_token_id
        prefix_token_id = (
            tokenizer.eos_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id
        )

        def tok_encode(self, string, add_special_tokens=None, **kwargs):  # HFLM.tok_encode's
            flag = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            if add_special_tokens is None and string.startswith(
                tokenizer.decode(self.prefix_token_id)
            ):
                flag = {"add_special_tokens": False}  # the text holds its BOS already
            return tokenizer.encode(string, **flag)

        def _loglikelihood_tokens(self, requests, **kwargs):
            for _, context, cont in requests:  # HFLM._loglikelihood_tokens's sanity checks
                assert len(context) > 0 and 0 < len(cont) <= max_length
            return [log_probs(context + cont, len(cont)) for _, context, cont in requests]

        def loglikelihood_rolling(self, requests, **kwargs):
            windows = [
                map(
                    make_disjoint_window,
                    get_rolling_token_windows(ids, self.prefix_token_id, max_length, 1),
                )
                for ids in (self.tok_encode(r.args[0]) for r in requests)
            ]
            return [sum(log_probs(a + b, len(b))[0] for a, b in w) for w in windows]

        def generate_until(self, requests, **kwargs):
            answers = []
            for context, options in (r.args for r in requests):
                new_tokens = options.get("max_gen_toks", 256)  # HFLM.max_gen_toks
                assert max_length - new_tokens > 0  # HFLM.generate_until's
                bos = (
                    {"add_special_tokens": False}
                    if tokenizer.bos_token and context.startswith(tokenizer.bos_token)
                    else {}
                )  # HFLM.tok_batch_encode's
                ids = tokenizer.encode(context, **bos)[-(max_length - new_tokens) :]
                out = model.generate(
                    torch.tensor([ids]), do_sample=False, max_new_tokens=new_tokens
                )
                text = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
                answers.append(functools.reduce(lambda t, s: t.split(s)[0], options["until"], text))
            return answers

    return Reference()


def harness_and_hf_backend(tmp_path, cfg, params, tokenizer):
    """``both(kind, args)``: JaxptLM's and the HF backend's (``hf_backend_reference``) answers
    to the requests of ``kind`` with ``args``."""
    harness = harness_or_skip()
    from lm_eval.api.instance import Instance

    reference = hf_backend_reference(tmp_path, cfg, params, tokenizer)
    lm = harness.JaxptLM(params, cfg, tokenizer, batch_size=4)

    def both(kind, args):
        requests = [Instance(kind, {}, a, i) for i, a in enumerate(args)]
        return getattr(lm, kind)(requests), getattr(reference, kind)(requests)

    return both


def test_harness_gives_the_numbers_of_lm_evals_hf_backend_on_the_exported_model(tmp_path):
    """GPT-2's BPE on a perturbed 16-token model: each request as lm-eval's HF backend answers
    it on the model exported to transformers. The context and continuation were encoded
    separately, so a context ending in a space, a continuation that merges with the context's
    last characters and ``"\\n\\n"`` before a word scored other tokens than lm-eval's; a
    ``<|endoftext|>`` in a text was plain text to JaxptLM, the end-of-text token to HFLM."""
    cfg = dataclasses.replace(tiny_config("vgpt"), vocab_size=50257, block_size=16)
    params = perturbed(models.get("vgpt").init(jax.random.key(0), cfg), std=0.3)
    both = harness_and_hf_backend(tmp_path, cfg, params, data.get_tokenizer("gpt2"))

    pairs = [
        ("The cat sat on the", " mat"),  # the encodings agree
        ("The cat sat on the ", "mat"),  # the space goes with the continuation
        ("He said hello", "world"),  # "helloworld" merges
        ("3.1", "4159"),
        ("The end.\n\n", "Then"),
        ("", "Hello world"),  # after the prefix token
        ("One context long enough to lose its oldest tokens to the block of the model", " end"),
        ("One document.<|endoftext|>The", " next"),
        ("<|endoftext|>The", " start"),  # begins with the prefix token's text
    ]
    ours, theirs = both("loglikelihood", pairs)
    np.testing.assert_allclose([x for x, _ in ours], [x for x, _ in theirs], rtol=1e-4)
    assert [g for _, g in ours] == [g for _, g in theirs]
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "  spaced  ", "\n\nx\n"]
    texts.append("a<|endoftext|>b")
    ours, theirs = both("loglikelihood_rolling", [(t,) for t in texts])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    options = [{"until": ["\n", "."], "max_gen_toks": 6}, {"until": ["o"], "max_gen_toks": 5}]
    contexts = ["The cat", "Hello world, ", "A context longer than the sixteen tokens of the block"]
    ours, theirs = both("generate_until", [(c, o) for o in options for c in contexts])
    assert ours == theirs


def test_harness_prefixes_the_tokenizers_bos_as_lm_evals_hf_backend(tmp_path):
    """A tokenizer whose BOS differs from its end-of-text (Llama 3's): lm-eval's HF backend
    puts the BOS before an empty context and a text's first rolling window; JaxptLM put
    end-of-text there."""
    cfg = dataclasses.replace(tiny_config("vgpt"), vocab_size=99, block_size=8)
    params = perturbed(models.get("vgpt").init(jax.random.key(0), cfg), std=0.3)
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    both = harness_and_hf_backend(tmp_path / "hf", cfg, params, word_tokenizer(directory))
    ours, theirs = both("loglikelihood", [("", "w3 w4"), ("w7", "w3 w4")])
    np.testing.assert_allclose([x for x, _ in ours], [x for x, _ in theirs], rtol=1e-4)
    text = " ".join(f"w{i % 90}" for i in range(0, 200, 7))  # 29 words: 4 windows
    ours, theirs = both("loglikelihood_rolling", [(text,), ("w5",)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_harness_encodes_with_the_tokenizers_template_as_lm_evals_hf_backend(tmp_path):
    """A tokenizer.json whose template puts its BOS before every text (Llama 3's):
    transformers' tokenizer, so lm-eval's HF backend, encodes each context, text and prompt
    with it; JaxptLM encoded without."""
    cfg = dataclasses.replace(tiny_config("vgpt"), vocab_size=99, block_size=8)
    params = perturbed(models.get("vgpt").init(jax.random.key(0), cfg), std=0.3)
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    tokenizer = word_tokenizer(directory, bos_template=True)
    assert tokenizer.encode("w3") == [3]
    both = harness_and_hf_backend(tmp_path / "hf", cfg, params, tokenizer)
    ours, theirs = both("loglikelihood", [("w7", " w3 w4"), ("w7 w8 w9", " w1")])
    np.testing.assert_allclose([x for x, _ in ours], [x for x, _ in theirs], rtol=1e-4)
    text = " ".join(f"w{i % 90}" for i in range(0, 100, 7))
    ours, theirs = both("loglikelihood_rolling", [(text,), ("w5",)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    ours, theirs = both("generate_until", [("w7 w3", {"until": ["w2"], "max_gen_toks": 3})])
    assert ours == theirs


def test_harness_answers_without_special_tokens_as_lm_evals_hf_backend(tmp_path):
    """lm-eval's HF backend decodes a generation with ``skip_special_tokens=True``; JaxptLM
    kept special tokens other than a final end-of-text in its answers (here most words are
    special, so greedy answers hold some)."""
    cfg = dataclasses.replace(tiny_config("vgpt"), vocab_size=99, block_size=16)
    params = perturbed(models.get("vgpt").init(jax.random.key(0), cfg), std=0.3)
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    specials = [f"w{i}" for i in range(10, 97)]
    tokenizer = word_tokenizer(directory, specials=specials)
    both = harness_and_hf_backend(tmp_path / "hf", cfg, params, tokenizer)
    options = {"until": ["w2"], "max_gen_toks": 8}
    requests = [(context, options) for context in ("w7 w3", "w1", "w5 w5 w9")]
    ours, theirs = both("generate_until", requests)
    assert ours == theirs
    prompts = [tokenizer.encode(context) for context, _ in requests]
    greedy = generate(params, prompts, cfg, max_new_tokens=8, temperature=0)
    special_ids = {tokenizer.encode(word)[0] for word in specials}
    assert any(set(ids) & special_ids for ids in greedy.completions())  # answers held some


def test_harness_encodes_an_empty_contexts_continuation_without_the_template(tmp_path):
    """lm-eval encodes the continuation of an empty context with ``add_special_tokens=False``
    (``TemplateLM.loglikelihood``): a template's BOS that is not the prefix token (here
    tokenizer_config.json names no bos_token, so the prefix is end-of-text) is not scored.
    JaxptLM ignored the flag and scored the template's w97 as the continuation's first token."""
    transformers = pytest.importorskip("transformers", reason="HF parity needs transformers")
    cfg = dataclasses.replace(tiny_config("vgpt"), vocab_size=99, block_size=8)
    params = perturbed(models.get("vgpt").init(jax.random.key(0), cfg), std=0.3)
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    tokenizer = word_tokenizer(directory, bos_template=True, bos_token=False)
    both = harness_and_hf_backend(tmp_path / "hf", cfg, params, tokenizer)
    ours, theirs = both("loglikelihood", [("", "w3 w4"), ("w7", " w3 w4")])
    np.testing.assert_allclose([x for x, _ in ours], [x for x, _ in theirs], rtol=1e-4)
    lm = harness_or_skip().JaxptLM(params, cfg, tokenizer, batch_size=4)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    for flag in (None, False, True):
        kwargs = {} if flag is None else {"add_special_tokens": flag}
        assert lm.tok_encode("w3 w4", **kwargs) == reference.encode("w3 w4", **kwargs)


def block_8_lm_and_hf_backend(tmp_path):
    """JaxptLM of a tiny vgpt of block 8 over the word tokenizer, and the HF backend's
    reference on it (``hf_backend_reference``)."""
    harness = harness_or_skip()
    cfg = dataclasses.replace(tiny_config("vgpt"), vocab_size=99, block_size=8)
    params = perturbed(models.get("vgpt").init(jax.random.key(0), cfg), std=0.3)
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    tokenizer = word_tokenizer(directory)
    reference = hf_backend_reference(tmp_path / "hf", cfg, params, tokenizer)
    return harness.JaxptLM(params, cfg, tokenizer, batch_size=4), reference


def test_harness_refuses_the_continuations_lm_evals_hf_backend_refuses(tmp_path):
    """A continuation longer than the block was scored by its last block's tokens, and one of
    no token as log p = 0, where lm-eval's HF backend asserts: each is now one sentence
    naming the request. A continuation that fills the block exactly has HFLM's number."""
    lm, reference = block_8_lm_and_hf_backend(tmp_path)
    from lm_eval.api.instance import Instance

    def requests(*pairs):
        return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]

    words = " ".join(f"w{i}" for i in range(20, 29))  # 9 words
    fits = requests(("w7", " " + words[:-4]), ("w1 w2 w3 w4", " " + words[:-4]), ("w5", " w6"))
    ours, theirs = lm.loglikelihood(fits), reference.loglikelihood(fits)
    np.testing.assert_allclose([x for x, _ in ours], [x for x, _ in theirs], rtol=1e-4)
    refused = {
        ("w7", " " + words): r"continuation of 9 tokens does not fit the model's block of 8 ",
        ("w7", ""): r"continuation encodes to no token, which",
    }
    for pair, message in refused.items():
        with pytest.raises(AssertionError):
            reference.loglikelihood(requests(("w5", " w6"), pair))
        with pytest.raises(ConfigError, match=rf"^lm-evaluation-harness asks .*{message}") as e:
            lm.loglikelihood(requests(("w5", " w6"), pair))
        assert "\n" not in str(e.value)


def test_harness_refuses_a_generation_that_leaves_the_context_no_room(tmp_path):
    """max_gen_toks at or beyond the block (or unset: 256) was answered from the context's
    last token with fewer new tokens, where lm-eval's HF backend asserts: it is now one
    sentence naming the task, before any request runs, and when a task asking for it loads.
    One below the block has HFLM's answer (one context token)."""
    lm, reference = block_8_lm_and_hf_backend(tmp_path)
    harness = harness_or_skip()
    from lm_eval.api.instance import Instance

    def requests(*options):
        context = " ".join(f"w{i}" for i in range(1, 11))
        return [
            Instance("generate_until", {}, (context, o), i, ("t", i, 1))
            for i, o in enumerate(options)
        ]

    fits = requests({"until": [], "max_gen_toks": 7})
    assert lm.generate_until(fits) == reference.generate_until(fits)
    for options in ({"until": [], "max_gen_toks": 8}, {"until": []}):
        with pytest.raises(AssertionError):
            reference.generate_until(requests(options))
        no_room = (
            r"max_gen_toks=(8|256), which leaves its context no room in the model's block of 8 "
        )
        with pytest.raises(
            ConfigError, match=rf"^lm-evaluation-harness task t asks .*{no_room}"
        ) as e:
            lm.generate_until(requests({"until": [], "max_gen_toks": 1}, options))
        assert "\n" not in str(e.value)
    task = tmp_path / "beams.yaml"
    jsonl = write_jsonl(tmp_path / "items.jsonl", original_rows())
    task.write_text(GENERATION_YAML.format(jsonl=jsonl).replace("num_beams: 4", "num_beams: 1"))
    assert len(harness.load_tasks([str(task)], max_length=9)) == 1
    with pytest.raises(ConfigError, match=r"task beams asks generate_until for max_gen_toks=8,"):
        harness.load_tasks([str(task)], max_length=8)


def test_harness_generation_stops_at_every_eos_id_of_the_checkpoint_as_transformers(tmp_path):
    """A checkpoint whose config.json and generation_config.json list a second end-of-sequence
    id (Llama 3 Instruct lists two): transformers' greedy ``generate`` (lm-eval's HF backend)
    stops at it, JaxptLM went on past it (stopping at end-of-text only). With the checkpoint's
    ``hf.eos_ids`` it stops there too and answers as transformers does."""
    torch = pytest.importorskip("torch", reason="HF parity needs torch (see tests/test_hf.py)")
    transformers = pytest.importorskip("transformers", reason="HF parity needs transformers")
    harness = harness_or_skip()
    from lm_eval.api.instance import Instance

    cfg = dataclasses.replace(tiny_config("smollm"), vocab_size=99, block_size=16)
    params = perturbed(models.get("smollm").init(jax.random.key(0), cfg), std=0.3)
    (tmp_path / "tok").mkdir()
    lm = harness.JaxptLM(params, cfg, word_tokenizer(tmp_path / "tok"), batch_size=4)
    request = Instance("generate_until", {}, ("w1 w2 w3", {"until": [], "max_gen_toks": 8}), 0)
    second = int(lm.generate_until([request])[0].split()[1][1:])  # made an eos id below
    (tmp_path / "tok2").mkdir()
    tokenizer = word_tokenizer(tmp_path / "tok2", specials=(f"w{second}",))
    out = hf.save_pretrained(params, cfg, tmp_path / "hf", tokenizer=tokenizer)
    config = json.loads((out / "config.json").read_text()) | {"eos_token_id": [98, second]}
    (out / "config.json").write_text(json.dumps(config))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [98, second]}))
    assert hf.eos_ids(out) == (98, second)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tokenizer.encode("w1 w2 w3")
    generated = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8)
    theirs = generated[0, len(ids) :]
    assert theirs[-1] == second and len(theirs) < 8  # transformers stopped at it
    back, stops = hf.from_pretrained(out), hf.eos_ids(out)
    lm = harness.JaxptLM(back.params, back.config, back.tokenizer, batch_size=4, stop_ids=stops)
    expected = hf_tokenizer.decode(theirs, skip_special_tokens=True)  # as HFLM decodes
    assert lm.generate_until([request]) == [expected]


def test_harness_encodes_a_text_starting_with_its_bos_as_lm_evals_hf_backend(tmp_path):
    """A text that starts with the BOS's text (a prompt rendered with a chat template):
    lm-eval's HF backend encodes it without the template's special tokens, so with one BOS;
    JaxptLM put the template's BOS before it, two."""
    cfg = dataclasses.replace(tiny_config("vgpt"), vocab_size=99, block_size=8)
    params = perturbed(models.get("vgpt").init(jax.random.key(0), cfg), std=0.3)
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    tokenizer = word_tokenizer(directory, bos_template=True)
    both = harness_and_hf_backend(tmp_path / "hf", cfg, params, tokenizer)
    ours, theirs = both("loglikelihood", [("w97 w7", " w3 w4"), ("w7", " w3 w4")])
    np.testing.assert_allclose([x for x, _ in ours], [x for x, _ in theirs], rtol=1e-4)
    ours, theirs = both("loglikelihood_rolling", [("w97 w5 w6 w7",), ("w5 w6 w7",)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    options = {"until": [], "max_gen_toks": 3}
    ours, theirs = both("generate_until", [("w97 w7 w3", options)])
    assert ours == theirs
    lm = harness_or_skip().JaxptLM(params, cfg, tokenizer, batch_size=4)
    assert lm.tok_encode("w97 w3") == [97, 3]


def word_tokenizer(directory, bos_template=False, bos_token=True, specials=()):
    """tests/test_hf.py's word-level tokenizer (w0 .. w97, <|endoftext|> 98) with BOS w97
    (tokenizer_config.json's bos_token, unless not ``bos_token``); with ``bos_template``,
    tokenizer.json's template puts it before every text; the words of ``specials`` are
    special tokens (as ChatML's <|im_end|>)."""
    import tokenizers

    from .test_hf import word_tokenizer as words

    words(directory, 99)
    tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    if bos_template:
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single="w97 $A", special_tokens=[("w97", 97)]
        )
    tok.add_special_tokens(list(specials))
    tok.save(str(directory / "tokenizer.json"))
    special = dict(tokenizer_class="PreTrainedTokenizerFast", eos_token=data.EOT)
    special.update(bos_token="w97" if bos_token else None)
    (directory / "tokenizer_config.json").write_text(json.dumps(special))
    return data.HFTokenizer(directory)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step char-level bigram run that evaluated HellaSwag (5 items) at every step, and
    its config (copy the workdir before changing it)."""
    directory = tmp_path_factory.mktemp("hellaswag_run")
    config = char_config("bigram", steps=2)
    config.eval.batches = 1
    config.eval.hellaswag_path = str(write_jsonl(directory / "items.jsonl", original_rows()))
    config.eval.hellaswag_every_steps = 1
    train.train(config, directory / "run")
    return directory / "run", config


def test_training_logs_hellaswag_and_eval_mode_writes_a_new_json_each_time(trained_run, capsys):
    """HellaSwag every step of the run into metrics.jsonl; then --mode=eval on its workdir
    prints and writes the same numbers, and again into a new file."""
    workdir, config = trained_run
    records = train.read_metrics(workdir / "metrics.jsonl")
    logged = [r for r in records if "hellaswag_acc_norm" in r]
    assert [(r["step"], r["hellaswag_items"]) for r in logged] == [(1, 5), (2, 5)]

    trained = snapshot(workdir)
    launcher.run(config, workdir=str(workdir), mode="eval")
    after = {name: b for name, b in snapshot(workdir).items() if name.split("/")[0] != "eval"}
    assert after == trained  # checkpoints and logs were only read
    printed = capsys.readouterr().out
    assert "evaluating checkpoint 2 of" in printed and "hellaswag" in printed
    first = workdir / "eval" / "2.json"
    record = json.loads(first.read_text())
    assert record["step"] == 2
    results = record["results"]
    assert results["hellaswag"] == {
        key.removeprefix("hellaswag_"): value for key, value in logged[-1].items() if key != "step"
    }
    val = next(r for r in records if r["step"] == 2 and "val_loss" in r)
    assert results["val_loss"]["loss"] == pytest.approx(val["val_loss"], rel=1e-5)

    before = first.read_bytes()
    config = config.copy_and_resolve_references()
    config.eval.tasks = "hellaswag"
    launcher.run(config, workdir=str(workdir), mode="eval")
    assert first.read_bytes() == before
    assert set(json.loads((workdir / "eval" / "2.1.json").read_text())["results"]) == {"hellaswag"}


def test_eval_mode_runs_a_harness_task(trained_run, tmp_path):
    """--config.eval.tasks=harness:<task YAML>: the harness's acc is the native acc."""
    harness_or_skip()
    workdir, config = trained_run
    workdir = Path(shutil.copytree(workdir, tmp_path / "run"))
    task = tmp_path / "local_hellaswag.yaml"
    task.write_text(TASK_YAML.format(jsonl=config.eval.hellaswag_path))
    config = config.copy_and_resolve_references()
    config.eval.tasks = f"hellaswag,harness:{task}"
    results = json.loads(launcher.evaluate(config, workdir).read_text())["results"]
    assert results["harness:local_hellaswag"]["acc,none"] == results["hellaswag"]["acc"]


def test_eval_mode_loads_harness_task_data_before_the_params(trained_run, tmp_path, monkeypatch):
    """Data a harness task cannot load is one sentence before the checkpoint is read (it was a
    traceback, or a sentence after val_loss and hellaswag had compiled and run)."""
    harness_or_skip()
    workdir, config = trained_run
    task = tmp_path / "local_hellaswag.yaml"
    task.write_text(TASK_YAML.format(jsonl=tmp_path / "missing.jsonl"))
    config = config.copy_and_resolve_references()
    config.eval.tasks = f"val_loss,hellaswag,harness:{task}"

    def load_params(*args):
        raise AssertionError("the checkpoint was read before the harness task data")

    monkeypatch.setattr(launcher, "load_params", load_params)
    with pytest.raises(DataNotFoundError, match=r"could not load the data of .*missing\.jsonl"):
        launcher.evaluate(config, workdir)


def test_a_harness_task_the_tokenizer_cannot_encode_is_one_sentence_before_any_task_runs(
    trained_run, tmp_path, monkeypatch
):
    """A harness task whose text holds a character the char vocabulary lacks: --mode=eval
    stopped only after the checkpoint was read and val_loss had run, writing nothing, with
    'character '€' is not in the char vocabulary', naming neither task nor text. It is now
    one sentence naming both, before the checkpoint is read; JaxptLM says the same."""
    harness = harness_or_skip()
    workdir, config = trained_run
    row = {"ctx": "It cost", "endings": ["ten €.", "a heap of soot"], "label": 0}
    task = tmp_path / "local_hellaswag.yaml"
    task.write_text(TASK_YAML.format(jsonl=write_jsonl(tmp_path / "items.jsonl", [row])))
    config = config.copy_and_resolve_references()
    config.eval.tasks = f"val_loss,harness:{task}"
    message = (
        r"^lm-evaluation-harness task local_hellaswag: the continuation ' ten €\.' of document "
        r"0 cannot be tokenized \(character '€' is not in the char vocabulary .*\); evaluate"
    )

    def load_params(*args):
        raise AssertionError("the checkpoint was read before the harness task's text")

    with monkeypatch.context() as patch:
        patch.setattr(launcher, "load_params", load_params)
        with pytest.raises(DataError, match=message):
            launcher.evaluate(config, workdir)
    assert not (workdir / "eval" / "2.2.json").exists()
    cfg, params = model("bigram")
    lm = harness.JaxptLM(params, cfg, CHARS, batch_size=4)
    with pytest.raises(DataError, match=message):
        harness.evaluate(params, cfg, CHARS, harness.load_tasks([str(task)]), batch_size=4)
    from lm_eval.api.instance import Instance

    rolling = Instance("loglikelihood_rolling", {}, ("A €",), 3, ("roll", 7, 1))
    with pytest.raises(DataError, match=r"task roll: the text 'A €' of document 7 cannot be"):
        lm.loglikelihood_rolling([rolling])


def test_items_the_tokenizer_cannot_read_are_one_sentence_before_training_or_eval(
    trained_run, tmp_path, monkeypatch
):
    """A character the char vocabulary lacks: training stopped with a sentence that named no
    item at the first HellaSwag evaluation, its steps unsaved; --mode=eval after val_loss."""
    workdir, config = trained_run
    config = config.copy_and_resolve_references()
    row = {"ctx": "The café was", "endings": ["open.", "shut."], "label": 0}
    config.eval.hellaswag_path = str(write_jsonl(tmp_path / "items.jsonl", [*original_rows(), row]))
    message = r"^HellaSwag item 6 of 6 cannot be tokenized \(character 'é' is not in the char"
    with pytest.raises(DataError, match=message):
        train.train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    def load_params(*args):
        raise AssertionError("the checkpoint was read before the HellaSwag items were checked")

    monkeypatch.setattr(launcher, "load_params", load_params)
    with pytest.raises(DataError, match=message):
        launcher.evaluate(config, workdir)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("tasks", "val_loss,mmlu", "entry 'mmlu' is not one of val_loss, hellaswag nor harness"),
        ("tasks", " , ", "names no task"),
        # the empty entry was dropped: the run went on without the task meant there
        ("tasks", "val_loss,,hellaswag", r"has an empty entry \(entry 2\); name a task between"),
        ("tasks", "val_loss, ", r"has an empty entry \(entry 2\)"),
        # the repeat was run once, the config asking for what the results did not show
        ("tasks", "hellaswag,val_loss,hellaswag", r"names 'hellaswag' twice \(entries 1 and 3\)"),
        ("tasks", "harness:arc_easy, harness:arc_easy", r"names 'harness:arc_easy' twice"),
        ("hellaswag_every_steps", -1, "must be an integer >= 0"),
    ],
)
def test_bad_eval_fields_are_one_sentence(field, value, message):
    config = char_config()
    config.eval[field] = value
    with pytest.raises(ConfigError, match=message):
        train.validate_config(config)


def test_eval_mode_on_init_from_without_a_checkpoint(tmp_path, capsys):
    """An imported checkpoint (here one jaxpt wrote) is evaluated as step 0."""
    config = char_config()
    config.eval.tasks = "hellaswag"
    config.eval.hellaswag_path = str(write_jsonl(tmp_path / "items.jsonl", original_rows()))
    cfg = models.config_from(config.model)
    params = models.get("gpt").init(jax.random.key(2), cfg)
    config.checkpoint.init_from = str(hf.save_pretrained(params, cfg, tmp_path / "hf"))
    path = launcher.evaluate(config, tmp_path / "run")
    assert "evaluating checkpoint.init_from=" in capsys.readouterr().out
    assert path == tmp_path / "run" / "eval" / "0.json"
    record = json.loads(path.read_text())
    assert record["source"] == f"checkpoint.init_from={tmp_path / 'hf'}"
    mesh = sharding.make_mesh(config.mesh)
    sharded = jax.device_put(params, sharding.param_shardings(params, mesh, config.mesh.rules))
    tokenizer = data.run_tokenizer(config.data)
    expected = hellaswag.evaluate(
        sharded, cfg, ITEMS, tokenizer, batch_size=8, mesh=mesh, rules=config.mesh.rules
    )
    assert record["results"] == {"hellaswag": expected.summary()}


def refuse_hard_links(monkeypatch, code: int) -> None:
    """``os.link`` fails with ``code``, as link(2) does where a filesystem has no hard links."""

    def link(source, target, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(source), None, str(target))

    monkeypatch.setattr(os, "link", link)


@pytest.mark.parametrize(
    "code", [errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV], ids=errno.errorcode.get
)
def test_eval_results_are_written_where_the_filesystem_has_no_hard_links(
    tmp_path, monkeypatch, code
):
    """The results file was hard-linked into place: on gcsfuse, exFAT or FAT the evaluation
    ran, then stopped in a PermissionError traceback, its results only printed. There the file
    is now created exclusively and written, still never over a file that exists."""
    refuse_hard_links(monkeypatch, code)
    directory = tmp_path / "eval"
    directory.mkdir()
    (directory / "2.json").write_text("the user's own")
    record = {"step": 2, "results": {"hellaswag": {"acc": 0.25}}}
    assert launcher.write_new_json(directory, "2", record) == directory / "2.1.json"
    assert launcher.write_new_json(directory, "2", {"step": 2}) == directory / "2.2.json"
    assert (directory / "2.json").read_text() == "the user's own"
    assert json.loads((directory / "2.1.json").read_text()) == record
    assert sorted(p.name for p in directory.iterdir()) == ["2.1.json", "2.2.json", "2.json"]


def test_eval_results_that_cannot_be_written_leave_no_file(tmp_path, monkeypatch):
    """A link refused for another reason than missing hard links is the error it is; a write
    interrupted after the exclusive create (Ctrl-C, a full disk) removes the file it made."""
    directory = tmp_path / "eval"
    refuse_hard_links(monkeypatch, errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        launcher.write_new_json(directory, "2", {"step": 2})
    assert list(directory.iterdir()) == []

    refuse_hard_links(monkeypatch, errno.EPERM)

    def fsync(descriptor):
        raise KeyboardInterrupt  # the file is written, but not known to be whole

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        launcher.write_new_json(directory, "2", {"step": 2})
    assert list(directory.iterdir()) == []


@pytest.mark.parametrize("empty_checkpoints", [False, True])
def test_eval_mode_without_params_says_so_before_reading_task_data(
    tmp_path, monkeypatch, empty_checkpoints
):
    """No checkpoint in the workdir and no checkpoint.init_from: one sentence before any task
    data is read (HellaSwag's hub copy first asks the hub), nothing written."""

    def read_task_data(*args, **kwargs):
        raise AssertionError("task data read before the checkpoint was looked for")

    monkeypatch.setattr(datasets, "load_dataset", read_task_data)
    monkeypatch.setattr(data, "ensure_prepared", read_task_data)
    if empty_checkpoints:
        (tmp_path / "checkpoints").mkdir()
    before = sorted(tmp_path.rglob("*"))
    config = char_config()
    config.eval.tasks = "val_loss,hellaswag"
    with pytest.raises(ConfigError, match=r"checkpoints (does not exist|holds no checkpoint): tr"):
        launcher.evaluate(config, tmp_path)
    assert sorted(tmp_path.rglob("*")) == before


def test_eval_mode_refuses_val_loss_on_data_of_another_tokenizer(tmp_path):
    """checkpoint.init_from ships its tokenizer.json, the run's validation data was tokenized by
    characters: val_loss scored the model on ids that mean other text to it, silently."""
    config = char_config()
    config.model.vocab_size = 512
    config.eval.tasks = "val_loss,hellaswag"
    config.eval.hellaswag_path = str(write_jsonl(tmp_path / "items.jsonl", original_rows()))
    cfg = models.config_from(config.model)
    params = models.get("gpt").init(jax.random.key(2), cfg)
    tokenizer = data.HFTokenizer(build_hf_tokenizer(tmp_path / "tokenizer"))
    config.checkpoint.init_from = str(
        hf.save_pretrained(params, cfg, tmp_path / "hf", tokenizer=tokenizer)
    )
    with pytest.raises(
        ConfigError,
        match=r"another tokenizer \(\S+hf/tokenizer.json\) than the one that tokenized data\."
        r"dataset=.* \(char\): val_loss would score .* or leave val_loss out of eval.tasks\.$",
    ):
        launcher.evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


class FixedBatches:
    """The eval-batch side of a ``data.Loader``: these batches, in order."""

    def __init__(self, batches: list):
        self.batches, self.batch_size = batches, len(batches[0].tokens)

    def eval_batches(self, n: int) -> list:
        return self.batches[:n]


@pytest.mark.parametrize("grad_accum_steps", [1, 2, 4])  # micro-batches of 4, 2 and 1 rows
def test_validation_ce_on_chat_data_averages_every_masked_target(grad_accum_steps):
    """Also over micro-batches, as training evaluates a batch it accumulates (one with no
    target in it among them), against the float64 mean over every masked target."""
    config = char_config(grad_accum_steps=grad_accum_steps)
    config.model.update(vocab_size=32, block_size=16)
    cfg = models.config_from(config.model)
    params = models.get(cfg.name).init(jax.random.key(0), cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32, (2, 4, 17), dtype=np.int32)
    masks = np.zeros((2, 4, 17), np.int32)
    masks[0, 0, 1:3] = 1  # 2 targets in the first batch, 40 in the second
    masks[1, :, 7:] = 1
    batches = [data.MaskedBatch(t, m) for t, m in zip(tokens, masks, strict=True)]
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    batch_sh = sharding.batch_sharding(mesh, config.mesh.rules)
    step = jax.jit(train.make_eval_step(config))
    got = evals.validation_loss(step, params, FixedBatches(batches), 2, batch_sh)

    nll, per_batch = [], []  # the reference: float64 log-softmax of every masked target
    for batch in batches:
        logits = np.asarray(models.get(cfg.name).apply(params, batch.tokens[:, :-1], cfg)[0])
        logits = logits.astype(np.float64)
        peak = logits.max(-1, keepdims=True)
        log_probs = logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))
        target_lp = np.take_along_axis(log_probs, batch.tokens[:, 1:, None], -1)[..., 0]
        kept = -target_lp[batch.loss_mask[:, 1:] == 1]
        nll.extend(kept)
        per_batch.append(kept.mean())
    assert got["ce"] == pytest.approx(np.mean(nll), rel=1e-5)
    assert got["loss"] == pytest.approx(np.mean(nll), rel=1e-5)  # dense: no auxiliary losses
    assert abs(np.mean(per_batch) - np.mean(nll)) > 1e-3  # what a mean of batch means gives


def test_a_validation_batch_runs_one_micro_batch_at_a_time():
    """A run that fits its batch in memory only as ``train.grad_accum_steps`` micro-batches
    evaluated the whole batch in one forward pass: its validation ran out of memory where its
    training did not. Compiled, the step's scratch memory shrinks with the micro-batch."""
    cfg = models.config_from(char_config().model)
    params = jax.eval_shape(lambda k: models.get(cfg.name).init(k, cfg), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((64, cfg.block_size), jnp.int32)
    scratch = {}
    for n_micro in (1, 8):
        step = train.make_eval_step(char_config(grad_accum_steps=n_micro))
        compiled = jax.jit(step).lower(params, tokens, tokens).compile()
        scratch[n_micro] = compiled.memory_analysis().temp_size_in_bytes
    assert scratch[8] < scratch[1] / 4, scratch
