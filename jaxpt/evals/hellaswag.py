"""HellaSwag (Zellers et al., 2019), scored completion-style as llm.c's ``dev/data/hellaswag.py``
and build-nanogpt's ``hellaswag.py`` score it.

Each item is a context and four endings, one of them right. The model reads the context
followed by ``" " + ending`` (the two encoded separately); the loss of an ending is the
cross-entropy of its tokens only. ``acc`` counts the items whose right ending has the lowest
summed loss, ``acc_norm`` those whose right ending has the lowest mean loss per token. GPT-2
124M scores acc 0.2859, acc_norm 0.2955 on the 10,042 validation items this way (llm.c);
lm-evaluation-harness's ``hellaswag`` task words the items differently (see
``jaxpt.evals.harness``).

Items come from a local jsonl file in the original format (``ctx`` or ``ctx_a``/``ctx_b``,
``endings``, ``label``) or from the validation split on the Hugging Face hub, which
``datasets`` caches after the first download.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from jaxpt import data, models
from jaxpt.errors import DataError, DataNotFoundError, first_line
from jaxpt.evals import _scoring

HUB_DATASET = "Rowan/hellaswag"  # its "validation" split: the 10,042 items everyone reports
GZIP_MAGIC = b"\x1f\x8b"  # the first bytes of a gzip file


@dataclasses.dataclass(frozen=True)
class Item:
    """One question: ``endings[label]`` is the right continuation of ``context``."""

    context: str
    endings: tuple[str, ...]
    label: int


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """One item's ending losses (nats) and the ending each rule picks."""

    label: int
    sum_losses: tuple[float, ...]  # summed over each ending's tokens
    mean_losses: tuple[float, ...]  # per token of each ending
    choice: int  # lowest summed loss (acc)
    choice_norm: int  # lowest mean loss (acc_norm)


@dataclasses.dataclass(frozen=True)
class Result:
    """Per-item results and the totals."""

    items: tuple[ItemResult, ...]

    @property
    def acc(self) -> float:
        return float(np.mean([r.choice == r.label for r in self.items]))

    @property
    def acc_norm(self) -> float:
        return float(np.mean([r.choice_norm == r.label for r in self.items]))

    def summary(self) -> dict[str, float | int]:
        """``{"acc", "acc_norm", "items"}``."""
        return {"acc": self.acc, "acc_norm": self.acc_norm, "items": len(self.items)}


def requests(items: Sequence[Item], tokenizer: data.Tokenizer) -> list[tuple[list[int], list[int]]]:
    """The ``(context, ending)`` token pairs of every item's endings, in order. Raises
    DataError naming the first item ``tokenizer`` cannot encode, or one with a context of no
    token (no ending would have a token to follow), or with an ending of no token (its loss
    would be 0, the lowest, whatever the model)."""
    pairs = []
    for number, item in enumerate(items, 1):
        try:
            context = tokenizer.encode(item.context)
            endings = [tokenizer.encode(" " + ending) for ending in item.endings]
        except DataError as error:  # e.g. a character outside a char-level model's vocabulary
            raise DataError(
                f"HellaSwag item {number} of {len(items)} cannot be tokenized ({error}); give "
                "eval.hellaswag_path items the model's tokenizer reads, or leave hellaswag out."
            ) from None
        if not context:
            raise DataError(
                f"HellaSwag item {number} of {len(items)} has a context the tokenizer encodes "
                "to no token, which its endings cannot be scored after; give every context of "
                "eval.hellaswag_path some text, or leave hellaswag out."
            )
        if not all(endings):
            raise DataError(
                f"HellaSwag item {number} of {len(items)} has an ending the tokenizer encodes "
                "to no token, which would score a loss of 0 and always be picked; give every "
                "ending of eval.hellaswag_path some text, or leave hellaswag out."
            )
        pairs.extend((context, ending) for ending in endings)
    return pairs


def evaluate(
    params,
    model_config: models.ModelConfig | models.BigramConfig,
    items: Sequence[Item],
    tokenizer: data.Tokenizer,
    *,
    batch_size: int,
    mesh: Mesh | None = None,
    rules=None,
) -> Result:
    """Scores ``items`` with the model ``params``, ``batch_size`` endings per jitted call
    (sharded over ``mesh`` by ``rules`` where given, as ``_scoring.score`` says)."""
    pairs = requests(items, tokenizer)
    scores = _scoring.score(
        params, model_config, pairs, batch_size=batch_size, mesh=mesh, rules=rules
    )
    return _result(items, scores)


def _result(items: Sequence[Item], scores: _scoring.Scores) -> Result:
    """The items' results from the scores of their ``requests``."""
    results, start = [], 0
    for item in items:
        end = start + len(item.endings)
        sums, counts = scores.nll[start:end], scores.n_tokens[start:end]
        means = sums / np.maximum(counts, 1)
        results.append(
            ItemResult(
                label=item.label,
                sum_losses=tuple(map(float, sums)),
                mean_losses=tuple(map(float, means)),
                choice=int(np.argmin(sums)),
                choice_norm=int(np.argmin(means)),
            )
        )
        start = end
    return Result(tuple(results))


def for_run(config, mesh: Mesh, tokenizer: data.Tokenizer) -> Callable[[Any], dict]:
    """``params -> Result.summary()`` for a run config: its model, the items of
    ``eval.hellaswag_path`` (read and tokenized by ``tokenizer`` now, before anything
    compiles), batches of a training micro-batch's rows split over ``mesh`` by ``mesh.rules``."""
    items = load_items(config.eval.hellaswag_path)
    pairs = requests(items, tokenizer)
    model_config = models.config_from(config.model)
    rows = config.train.batch_size // config.train.grad_accum_steps

    def run(params) -> dict:
        scores = _scoring.score(
            params, model_config, pairs, batch_size=rows, mesh=mesh, rules=config.mesh.rules
        )
        return _result(items, scores).summary()

    return run


# ----------------------------------------------------------------------------- items


def load_items(path: str | Path = "") -> list[Item]:
    """The items of the jsonl file ``path``, or without one, the hub's validation split.

    Raises DataError naming the file, line and field of a malformed item, and
    DataNotFoundError when the file is missing or, without a file, the hub is unreachable
    and the split is not cached.
    """
    if path:
        return _file_items(Path(path))
    return [_item(row, f"{HUB_DATASET} item {i}") for i, row in enumerate(_hub_rows())]


def _file_items(path: Path) -> list[Item]:
    if not path.is_file():
        raise DataNotFoundError(
            f"eval.hellaswag_path={str(path)!r} is not a file; name a HellaSwag jsonl file "
            "(fields ctx, endings, label), or set it to '' to read the hub's validation split."
        )
    items = []
    # "\n" only: str.splitlines() also breaks at U+2028, U+0085, ..., raw text inside a JSON string
    for number, line in enumerate(_text(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{where} is not a JSON object; repair or remove that line.") from None
        items.append(_item(row, where))
    if not items:
        raise DataError(f"{path} holds no HellaSwag item; one JSON object per line is expected.")
    return items


def _text(path: Path) -> str:
    """The text of the jsonl file ``path`` (a UTF-8 byte-order mark dropped); DataError naming
    the file, and what to do, unless it is UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        if raw.startswith(GZIP_MAGIC):
            why = "it is gzip-compressed"
            fix = f"decompress it (gunzip -k {path}) and name the .jsonl it gives"
        else:
            line = raw.count(b"\n", 0, error.start) + 1
            why = f"byte {raw[error.start]:#04x} on line {line}"
            fix = "convert it to UTF-8 (iconv -f latin1 -t utf-8, say) and name the new file"
        message = f"{path} is not UTF-8 jsonl ({why}); {fix} as eval.hellaswag_path."
        raise DataError(message) from None


def _hub_rows():
    import datasets

    try:
        with data.hub_or_cache():
            return datasets.load_dataset(HUB_DATASET, split="validation")
    except Exception as error:  # `datasets` and the hub raise many kinds
        raise DataNotFoundError(
            f"HellaSwag's validation split could not be loaded from the Hugging Face hub "
            f"({HUB_DATASET}: {first_line(error)}); connect to the network once (datasets "
            "caches it), or set --config.eval.hellaswag_path to a local jsonl file (fields ctx, "
            "endings, label)."
        ) from error


def _item(row: Mapping, where: str) -> Item:
    """An item from one record of the original format; DataError names a bad field."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where} is not a JSON object; repair or remove that line.")
    if "ctx" in row:
        context = row["ctx"]
    else:  # the original's ctx is ctx_a and ctx_b joined by a space
        parts = [row[key] for key in ("ctx_a", "ctx_b") if row.get(key) is not None]
        text = all(isinstance(part, str) for part in parts)
        context = " ".join(filter(None, parts)) if text else None
    if not isinstance(context, str) or not context:
        raise DataError(
            f"{where} has no context: give a non-empty string ctx, or strings ctx_a and ctx_b."
        )
    endings = row.get("endings")
    if not (
        isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) for e in endings)
    ):
        raise DataError(f"{where}: endings must be a list of at least two strings.")
    label = row.get("label")
    if isinstance(label, str) and label.isdigit():
        label = int(label)  # the hub's copy stores it as text
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise DataError(
            f"{where}: label={row.get('label')!r} must be the index of the right ending, "
            f"0 to {len(endings) - 1}."
        )
    return Item(context, tuple(endings), label)
