"""lm-evaluation-harness (the ``lm-eval`` package, jaxpt's ``harness`` extra) over jaxpt params.

``JaxptLM`` answers the harness's three requests as lm-eval's Hugging Face backend answers
them on the model exported to transformers: ``loglikelihood`` and ``loglikelihood_rolling``
through the batched scorer under ``evals.hellaswag``, ``generate_until`` through
``jaxpt.generate``. So any harness task runs on a jaxpt model::

    lm = JaxptLM(params, model_config, tokenizer, batch_size=32)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag", "arc_easy"])

or ``load_tasks`` and ``evaluate`` below, which ``launch.py --mode=eval
--config.eval.tasks=harness:arc_easy`` calls. A request is encoded by lm-eval's own
``TemplateLM``: the context's trailing whitespace moved onto the continuation, the two encoded
whole and the continuation's tokens those after the context's, so the numbers compare with
published lm-eval results. The native HellaSwag scorer encodes them separately, as llm.c does;
over the same items the two agree wherever the whole encoding splits at the context's end (a
context ending in a word, an ending starting with a space). The harness's own ``hellaswag``
task words the items differently (activity label, cleaned text; GPT-2 124M: acc 0.2892,
acc_norm 0.3114, its ``acc_norm`` per byte, not per token).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import reprlib
import traceback
from collections.abc import Sequence
from pathlib import Path

import jax
import lm_eval
import numpy as np
import yaml
from jax import Array
from jax.sharding import Mesh
from lm_eval.api.group import Group
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.task import Task
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jaxpt import data, models
from jaxpt.errors import ConfigError, DataError, DataNotFoundError, check_range, first_line
from jaxpt.evals import _scoring
from jaxpt.generation import generate

DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for generate_until tasks
FEWSHOT_SEED = 1234  # simple_evaluate's default fewshot_random_seed: which examples a prompt shows
# what each string of a request's arguments is, by request type
REQUEST_TEXTS = {
    "loglikelihood": ("context", "continuation"),
    "loglikelihood_rolling": ("text",),
    "generate_until": ("context",),
}
# generate_until options JaxptLM reads: the stop strings, the sampling filters and
# normalize_gen_kwargs's aliases of max_gen_toks
READ_OPTIONS = (
    "until",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "max_gen_toks",
    "max_new_tokens",
    "max_tokens",
    "max_completion_tokens",
)
# options jaxpt.generate lacks, taken at the value that turns them off (transformers' default)
OFF_OPTIONS = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


def check_generation_options(options: dict, task: str | None) -> None:
    """ConfigError naming the first of a ``generate_until`` request's ``options`` (its task's
    ``generation_kwargs``) that JaxptLM would ignore, so that the task's answers would not be
    the ones it asks for: one outside ``READ_OPTIONS``, other than an ``OFF_OPTIONS`` at its
    off value (or None)."""
    for name, value in options.items():
        turned_off = name in OFF_OPTIONS and value in (OFF_OPTIONS[name], None)
        if name in READ_OPTIONS or turned_off:
            continue
        off = f", but for {name}={OFF_OPTIONS[name]!r}" if name in OFF_OPTIONS else ""
        raise ConfigError(
            f"lm-evaluation-harness task {task} asks generate_until for {name}={value!r}, "
            f"which jaxpt's generation does not implement{off} (it reads "
            f"{', '.join(READ_OPTIONS)}), so its answers would not be the task's; leave the "
            "task out of eval.tasks or drop the option from its generation_kwargs."
        )


def check_generation_length(options: dict, task: str | None, room: int | None) -> None:
    """ConfigError unless a ``generate_until`` request's ``options`` (its task's
    ``generation_kwargs``) ask for at least 0 tokens (``max_gen_toks`` or an alias, as
    ``normalize_gen_kwargs`` reads them) and, with a block of ``room`` tokens (the model's
    ``max_length``), fewer than ``room``: lm-eval's HF backend asserts that a context token
    fits beside them."""
    new_tokens = normalize_gen_kwargs(options, DEFAULT_MAX_GEN_TOKS)["max_gen_toks"]
    check_range("max_gen_toks", new_tokens, at_least=0, integer=True)
    if room is not None and new_tokens >= room:
        raise ConfigError(
            f"lm-evaluation-harness task {task} asks generate_until for max_gen_toks="
            f"{new_tokens}, which leaves its context no room in the model's block of {room} "
            "(lm-eval's HF backend refuses it too); evaluate a model of a larger block_size, or "
            f"give the task a max_gen_toks below {room} (its generation_kwargs)."
        )


def check_encodable(requests: Sequence[Instance], tokenizer: data.Tokenizer) -> None:
    """DataError naming the first of ``requests`` whose text (``REQUEST_TEXTS``) ``tokenizer``
    cannot encode (a character-level model reads only its corpus's characters): its task,
    document and text, shortened. Each distinct text is encoded once."""
    seen = set()
    for request in requests:
        for role, text in zip(REQUEST_TEXTS[request.request_type], request.args, strict=False):
            if text in seen:
                continue
            try:
                tokenizer.encode(text)
            except DataError as error:
                raise DataError(
                    f"lm-evaluation-harness task {request.task_name}: the {role} "
                    f"{reprlib.repr(text)} of document {request.doc_id} cannot be tokenized "
                    f"({error}); evaluate the task with a model whose tokenizer reads all of its "
                    "text, or leave it out of eval.tasks."
                ) from None
            seen.add(text)


def check_continuation(context: str, continuation: str, n_tokens: int, room: int | None) -> None:
    """ConfigError for a ``loglikelihood`` request lm-eval's HF backend refuses (it asserts):
    a ``continuation`` of no tokens, or of more than ``room`` (the model's ``max_length``;
    the scorer would score only its last ``room``)."""
    if n_tokens and (room is None or n_tokens <= room):
        return
    request = f"({reprlib.repr(context)}, {reprlib.repr(continuation)})"
    if not n_tokens:
        raise ConfigError(
            f"lm-evaluation-harness asks the log-likelihood of request {request}, whose "
            "continuation encodes to no token, which lm-eval's HF backend refuses too; leave "
            "its task out of eval.tasks."
        )
    raise ConfigError(
        f"lm-evaluation-harness asks the log-likelihood of request {request}, whose "
        f"continuation of {n_tokens} tokens does not fit the model's block of {room} "
        "(lm-eval's HF backend refuses it too); evaluate a model of a larger block_size, or "
        "leave its task out of eval.tasks."
    )


class JaxptLM(TemplateLM):
    """A jaxpt model as an lm-evaluation-harness ``LM``.

    Args:
        params, model_config: the model (params sharded over ``mesh`` where given).
        tokenizer: the model's tokenizer; its begin-of-sequence token (``data.bos_id``: its
            end-of-text token where it names none) precedes an empty context and a text's
            first rolling window, as lm-eval's HF backend puts it; its end-of-text token ends
            a generation.
        batch_size: sequences per jitted call, an integer >= 1 (over a mesh: a multiple of
            the batch devices).
        mesh, rules: the run's mesh and ``config.mesh.rules``, or None (default device).
        stop_ids: the checkpoint's end-of-sequence ids (``hf.eos_ids``), each of which ends a
            generation too, as transformers' ``generate`` stops at every one of them.
    """

    def __init__(
        self,
        params,
        model_config: models.ModelConfig | models.BigramConfig,
        tokenizer: data.Tokenizer,
        *,
        batch_size: int,
        mesh: Mesh | None = None,
        rules=None,
        stop_ids: Sequence[int] = (),
    ):
        super().__init__()
        check_range("batch_size", batch_size, at_least=1, integer=True)
        self.params, self.model_config, self.tokenizer = params, model_config, tokenizer
        self.batch_size, self.mesh, self.rules = batch_size, mesh, rules
        self.stop_ids = tuple(stop_ids)

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> _scoring.Scores:
        return _scoring.score(
            self.params,
            self.model_config,
            pairs,
            batch_size=self.batch_size,
            mesh=self.mesh,
            rules=self.rules,
        )

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def prefix_token_id(self) -> int:
        return data.bos_id(self.tokenizer)

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """The ids transformers' tokenizer gives ``string``, as lm-eval's HF backend encodes:
        by default (``add_special_tokens`` None or True) with a BOS where tokenizer.json's
        template adds one; with ``add_special_tokens=False`` (``TemplateLM`` encodes an empty
        context's continuation so), or when None and ``string`` starts with the prefix
        token's text (a prompt that holds its BOS), without: what ``TemplateLM.loglikelihood``,
        the rolling windows and the prompts of generations encode with."""
        holds_bos = string.startswith(self.tokenizer.decode([self.prefix_token_id]))
        template = not (add_special_tokens is False or (add_special_tokens is None and holds_bos))
        return data.transformers_ids(self.tokenizer, string, template=template)

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list:
        """``TemplateLM.loglikelihood``, which encodes every request before it scores one; a
        text the tokenizer cannot encode is named (``_naming_unencodable``)."""
        with self._naming_unencodable(requests):
            return super().loglikelihood(requests, disable_tqdm)

    @contextlib.contextmanager
    def _naming_unencodable(self, requests: list[Instance]):
        """Where the block's encoding of ``requests`` fails, ``check_encodable``'s sentence
        naming the request's task, document and text instead: the texts are encoded again
        only then."""
        try:
            yield
        except DataError:
            check_encodable(requests, self.tokenizer)
            raise

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kwargs
    ) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy)`` of each ``((context, continuation),
        context_ids, continuation_ids)``, the pairs ``TemplateLM.loglikelihood`` encoded."""
        for strings, _, continuation_ids in requests:
            check_continuation(*strings, len(continuation_ids), self.model_config.max_length)
        scores = self._score([(context, continuation) for _, context, continuation in requests])
        answers = [(-float(n), bool(g)) for n, g in zip(scores.nll, scores.greedy, strict=True)]
        for (args, _, _), answer in zip(requests, answers, strict=True):
            self.cache_hook.add_partial("loglikelihood", args, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        """Each text's log-likelihood after the prefix token, in windows of the model's
        length that predict every token once (the harness's rolling windows), every text
        encoded before any is scored."""
        owners, pairs = [], []
        for index, (text,) in enumerate(r.args for r in requests):
            with self._naming_unencodable(requests):
                tokens = self.tok_encode(text)
            length = self.model_config.max_length or max(len(tokens), 1)
            windows = get_rolling_token_windows(tokens, self.prefix_token_id, length, 1)
            for window in map(make_disjoint_window, windows):
                owners.append(index)
                pairs.append(window)
        totals = np.zeros(len(requests))
        np.add.at(totals, np.asarray(owners, int), -self._score(pairs).nll)
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, float(total))
        return [float(total) for total in totals]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy continuations (sampled where ``do_sample``, or a ``temperature`` above 0
        without it, asks, after the ``top_k`` and ``top_p`` filters), cut before the first
        ``until`` string, of at most ``max_gen_toks`` tokens (or its aliases
        ``max_new_tokens``, ``max_tokens``), options read as lm-eval's ``normalize_gen_kwargs``
        reads them. Each batch samples with its own key, folded from a fixed one: repeats of
        a request differ, and the same requests give the same answers. An option it would
        ignore (``check_generation_options``), or a ``max_gen_toks`` that leaves the context no
        room (``check_generation_length``), or a text the tokenizer cannot encode
        (``check_encodable``), is refused before any request runs."""
        check_encodable(requests, self.tokenizer)
        for request in requests:
            check_generation_options(request.args[1], request.task_name)
            check_generation_length(
                request.args[1], request.task_name, self.model_config.max_length
            )
        answers, key = [], jax.random.key(0)
        for start in range(0, len(requests), self.batch_size):
            batch = [r.args for r in requests[start : start + self.batch_size]]
            answers += self._generate(batch, jax.random.fold_in(key, start))
        for request, answer in zip(requests, answers, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, answer)
        return answers

    def _generate(self, batch: list[tuple[str, dict]], key: Array) -> list[str]:
        """One ``generate`` call per distinct set of generation options in ``batch``, each
        with its own key folded from ``key``."""
        answers: dict[int, str] = {}
        groups: dict[str, list[int]] = {}
        for index, (_, options) in enumerate(batch):
            groups.setdefault(repr(sorted(options.items())), []).append(index)
        for group, indices in enumerate(groups.values()):
            options, group_key = batch[indices[0]][1], jax.random.fold_in(key, group)
            texts = self._continue([batch[i][0] for i in indices], options, group_key)
            answers.update(zip(indices, texts, strict=True))
        return [answers[i] for i in range(len(batch))]

    def _continue(self, contexts: list[str], options: dict, key: Array) -> list[str]:
        # as lm-eval's backends read them: max_new_tokens and other aliases of max_gen_toks;
        # a temperature above 0 without do_sample samples
        until = options.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        options = normalize_gen_kwargs(options, DEFAULT_MAX_GEN_TOKS)
        new_tokens = options["max_gen_toks"]  # below the block (check_generation_length)
        if new_tokens == 0:  # at most none: lm-eval's answer is the empty string
            return [""] * len(contexts)
        room = self.model_config.max_length
        prompts = []
        for context in contexts:
            tokens = self.tok_encode(context) or [self.tokenizer.eot_id]
            prompts.append(tokens if room is None else tokens[-(room - new_tokens) :])
        generated = generate(
            self.params,
            prompts,
            self.model_config,
            max_new_tokens=new_tokens,
            **self._sampling(options),
            key=key,
            stop_token=self.tokenizer.eot_id,
            stop_sequences=[[stop] for stop in self.stop_ids],
            n_tokens=self.tokenizer.vocab_size,
        )
        return [self._cut(completion, until) for completion in generated.completions()]

    def _sampling(self, options: dict) -> dict:
        """``generate``'s sampling arguments for normalised options: greedy unless
        ``do_sample``; else ``temperature`` (unset: 1), ``top_k`` (0: off; beyond the
        vocabulary: all of it) and ``top_p``, as transformers reads a set value. An unset
        ``top_k`` cuts nothing, as lm-eval's vLLM backend samples (its HF backend's
        ``generate`` would cut at transformers' default 50, and crashes on the temperature 0
        it passes for an unset one)."""
        if not options["do_sample"]:
            return {"temperature": 0.0}
        top_k = options.get("top_k") or None
        return {
            "temperature": float(options.get("temperature", 1.0)),
            "top_k": None if top_k is None else min(top_k, self.tokenizer.vocab_size),
            "top_p": options.get("top_p"),
        }

    def _cut(self, completion: list[int], until: Sequence[str]) -> str:
        """``completion``'s text without special tokens, as lm-eval's HF backend decodes
        it, cut before the first of the ``until`` strings."""
        text = data.transformers_text(self.tokenizer, completion)
        for stop in until:
            text = text.split(stop)[0] if stop else text
        return text


def _task_manager(tasks: Sequence[str]) -> TaskManager:
    """The harness's task index: the built-ins (~10 s to index, once) unless every task is a
    YAML file."""
    return _manager(include_defaults=not all(Path(task).is_file() for task in tasks))


@functools.cache
def _manager(include_defaults: bool) -> TaskManager:
    """One index of each kind a process (indexing the built-ins takes seconds)."""
    return TaskManager(include_defaults=include_defaults)


def check_tasks(tasks: Sequence[str]) -> None:
    """ConfigError naming the first task that is neither a task YAML file nor a name the
    harness registers (a task, group or tag)."""
    manager = _task_manager(tasks)
    for task in tasks:
        if not Path(task).is_file() and task not in manager.all_tasks:
            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            raise ConfigError(
                f"eval.tasks: harness:{task} is neither a task YAML file nor a task, group or "
                "tag lm-evaluation-harness registers"
                + (f" (close: {', '.join(close)})" if close else "")
                + "; `lm-eval ls tasks` lists them."
            )


def load_tasks(tasks: Sequence[str], max_length: int | None = None) -> list:
    """The harness's tasks and groups named by ``tasks`` (registered names or task YAML files)
    with their data loaded, for ``evaluate`` on a model of ``max_length`` (None: unbounded).
    Raises ConfigError naming an unknown task (``check_tasks``), a group YAML file, or a task
    lm-eval cannot build from its definition (``_loading_error``), and DataNotFoundError when
    a task's data cannot be loaded (the hub unreachable and nothing cached, a local file
    missing); ConfigError for a generation option ``JaxptLM`` would ignore
    (``check_generation_options``) or a ``max_gen_toks`` the model's block cannot hold
    beside a context (``check_generation_length``)."""
    check_tasks(tasks)
    manager, loaded, task = _task_manager(tasks), [], None
    try:
        with data.hub_or_cache():  # `datasets` is imported (lm_eval.tasks imports it)
            for task in tasks:
                check_not_a_group(task)
                loaded.append(manager.load([task]))
    except ConfigError:
        raise
    except Exception as error:  # YAML, lm-eval, Jinja, `datasets`, the hub, a task's own code
        raise _loading_error(task, error) from error
    groups = [group for one in loaded for group in one["groups"].values()]
    leaves = [leaf for one in loaded for leaf in one["tasks"].values()]
    for leaf in leaves:
        if leaf.OUTPUT_TYPE == "generate_until":
            options = leaf.config.generation_kwargs or {}
            check_generation_options(options, leaf.config.task)
            check_generation_length(options, leaf.config.task, max_length)
    inner = {id(t) for group in groups for t in (*group.get_all_tasks(), *group.get_all_groups())}
    outer = [task for task in (*groups, *leaves) if id(task) not in inner]
    try:
        manager.load(outer)  # lm-eval's check that no task is in two of them
    except ValueError as error:
        raise ConfigError(f"eval.tasks: {first_line(error)}; name each task once.") from None
    return outer


def check_requests(tasks: list, tokenizer: data.Tokenizer) -> None:
    """DataError naming the first request of ``tasks`` (what ``load_tasks`` returns) whose
    text ``tokenizer`` cannot encode (``check_encodable``), before any task runs: each task's
    requests built as ``evaluate`` builds them (its few-shot examples drawn with
    ``FEWSHOT_SEED``), which it builds again."""
    for task in tasks:
        for leaf in task.get_all_tasks() if isinstance(task, Group) else [task]:
            leaf.set_fewshot_seed(FEWSHOT_SEED)
            leaf.build_all_requests()
            check_encodable(leaf.instances, tokenizer)


def check_not_a_group(task: str) -> None:
    """ConfigError when ``task`` is a YAML file that defines a group (a ``group`` key, as
    lm-eval's index reads it): lm-eval finds a group's tasks by name only among the YAML
    files of its include paths, which jaxpt does not index (a directory may hold thousands)."""
    if not Path(task).is_file():
        return
    definition = yaml.load(Path(task).read_text(encoding="utf-8"), _TolerantLoader)
    if isinstance(definition, dict) and "group" in definition:
        raise ConfigError(
            f"task YAML {task} defines a group ({definition['group']}), which jaxpt does not "
            "load from a file (lm-eval finds its tasks only by name); name the YAML files of "
            "its tasks in eval.tasks instead (harness:a.yaml,harness:b.yaml)."
        )


class _TolerantLoader(yaml.SafeLoader):
    """YAML as lm-eval writes it: ``!function module.name`` read as its text."""


_TolerantLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _loading_error(task: str, error: Exception) -> ConfigError | DataNotFoundError:
    """The sentence for ``error``, raised while lm-eval loaded ``task``: DataNotFoundError
    where it came from reading the task's dataset (``_raised_reading_data``), else a
    ConfigError saying the task's definition is not one lm-eval reads (YAML syntax, an
    unknown field or output_type, a Jinja template over its first document)."""
    if _raised_reading_data(error):
        return DataNotFoundError(
            f"lm-evaluation-harness could not load the data of {task} ({first_line(error)}); "
            "connect to the network once (datasets caches it), or name a task YAML file whose "
            "dataset is local."
        )
    mark = error.problem_mark if isinstance(error, yaml.MarkedYAMLError) else None
    where = f" at line {mark.line + 1}" if mark else ""  # a YAML syntax error's place
    what = f"task YAML {task}" if Path(task).is_file() else f"lm-evaluation-harness's {task}"
    remedy = "fix it" if Path(task).is_file() else f"leave harness:{task} out of eval.tasks"
    return ConfigError(
        f"{what} is not a valid lm-eval task ({type(error).__name__}: {first_line(error)}"
        f"{where}); {remedy}."
    )


def _raised_reading_data(error: BaseException | None) -> bool:
    """Whether ``error``, or one it was raised from, came from inside a task's ``download``,
    where lm-eval reads the dataset (``datasets.load_dataset``, or the task's
    ``custom_dataset``), not from reading the task's definition before or after it."""
    while error is not None:
        for frame, _ in traceback.walk_tb(error.__traceback__):
            if frame.f_code.co_name == "download" and isinstance(frame.f_locals.get("self"), Task):
                return True
        error = error.__cause__
    return False


def evaluate(
    params,
    model_config: models.ModelConfig | models.BigramConfig,
    tokenizer: data.Tokenizer,
    tasks: list,
    *,
    batch_size: int,
    mesh: Mesh | None = None,
    rules=None,
    stop_ids: Sequence[int] = (),
) -> dict[str, dict[str, float | int]]:
    """The harness's metrics of each of ``tasks`` (what ``load_tasks`` returns), e.g.
    ``{"arc_easy": {"acc,none": 0.43, "acc_stderr,none": 0.01, "sample_len": 2376, ...}}``,
    of ``JaxptLM``: metrics as floats, counts as ints."""
    lm = JaxptLM(
        params,
        model_config,
        tokenizer,
        batch_size=batch_size,
        mesh=mesh,
        rules=rules,
        stop_ids=stop_ids,
    )
    out = lm_eval.simple_evaluate(  # loaded tasks: an index without the built-ins will do
        model=lm,
        tasks=tasks,
        task_manager=_manager(include_defaults=False),
        log_samples=False,
        fewshot_random_seed=FEWSHOT_SEED,
    )
    return {
        task: {k: v if isinstance(v, int) else float(v) for k, v in metrics.items() if _number(v)}
        for task, metrics in out["results"].items()
    }


def _number(value) -> bool:
    """Whether a result's ``value`` is a metric or a count (``sample_len``), not a name."""
    return isinstance(value, int | float) and not isinstance(value, bool)
