"""Orbax checkpoints in ``<workdir>/checkpoints/<step>/``: train state, loader state, config.

Saves are asynchronous; orbax writes each one under a temporary name and renames it when
complete, so a half-written checkpoint is never listed. Restoring first checks that a
checkpoint holds the run's model and optimizer (its stored model config, train.optimizer and
train.batch_size, then its array shapes): a difference is a ConfigError naming it, and
nothing on disk is touched. A checkpoint that cannot be read as written (truncated, missing
files) is skipped for the previous one with a warning; only training moves it aside, to
``<step>.unreadable-<n>`` (nothing is deleted), since it saves that step again.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxpt import sharding
from jaxpt.errors import ConfigError
from jaxpt.train._step import abstract_state

log = logging.getLogger(__name__)

# Model fields that choose how the model is computed, not what it computes: a run may change
# them on resume, e.g. to remat or compute in bf16, or to fine-tune with other dropout.
FREE_MODEL_FIELDS = frozenset(
    {
        "dtype",
        "sdpa_implementation",
        "kernels",
        "logits_dtype",
        "remat_policy",
        "scan_layers",
        "moe_matmul",
        "dropout",
        "router_noise",
    }
)


# What a checkpoint of ours holds at its top: our items and orbax's markers, which are these
# or, in any orbax version, begin with "_" (an interrupted rotation leaves any part of it,
# nothing included).
_CHECKPOINT_NAMES = frozenset({"config", "loader", "state", "commit_success.txt", "descriptor"})

# Orbax writes a checkpoint (and each item in it) under its name plus this suffix, then renames
# it; a save of a step whose temporary directory is there deletes that directory first.
_UNFINISHED = ocp.path.atomicity_types.TMP_DIR_SUFFIX


# What a run makes in its checkpoints/: steps, those set aside (<step>.unreadable-<n>, before
# <step>.unreadable) and orbax's unfinished ones; orbax's own names begin with "_" or are its
# root "metadata", and those beginning with "." are the file system's (NFS's .nfs* of a file
# deleted while open).
_RUN_ENTRY = re.compile(rf"\d+(\.unreadable(-\d+)?|{re.escape(_UNFINISHED)}.*)?|metadata|[_.].*")


def check_run_checkpoints(directory: Path) -> None:
    """ConfigError naming the first name in ``directory`` (a workdir's ``checkpoints/``)
    that no jaxpt run makes there: another program's directory, beside which training would
    rewrite that program's ``metrics.jsonl`` and ``loss.png``."""
    foreign = sorted(p.name for p in directory.iterdir() if not _RUN_ENTRY.fullmatch(p.name))
    if foreign:
        raise ConfigError(
            f"{directory} holds {foreign[0]}, which no jaxpt run makes there, so "
            f"{directory.parent} is not a jaxpt run's: choose a new or empty --workdir "
            "(nothing was changed)."
        )


def _foreign_names(step_dir: Path) -> list[str]:
    """The names in ``step_dir`` that no checkpoint of ours holds (finished or not), sorted."""
    names = {p.name.split(_UNFINISHED)[0] for p in step_dir.iterdir()}
    return sorted(n for n in names - _CHECKPOINT_NAMES if not n.startswith("_"))


class Checkpoints:
    """Save and restore ``(state, loader_state, config)`` under ``directory``.

    ``keep`` is how many of the newest checkpoints saving keeps; ``None`` opens the directory
    read only (sampling, export): nothing is written, moved or deleted.
    """

    def __init__(self, directory: str | Path, *, keep: int | None):
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.manager = self._open()

    @property
    def read_only(self) -> bool:
        return self.keep is None

    def _open(self) -> ocp.CheckpointManager:
        handlers = {
            "state": ocp.PyTreeCheckpointHandler(),  # restores the params alone, too
            "loader": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        }
        if not self.read_only:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep, create=True, enable_async_checkpointing=True
            )
            return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        with _absl_level(logging.ERROR):  # orbax warns that read_only is read only
            return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(self, step: int, state, loader_state: dict, config) -> None:
        """Starts an asynchronous save of ``step`` (waits for the previous one first)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                loader=ocp.args.JsonSave(loader_state),
                config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
            ),
            force=True,
        )

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state, shardings, config) -> tuple[int, object, dict] | None:
        """The newest readable checkpoint as ``(step, state, loader_state)``, or None.

        ``abstract_state`` gives the tree, shapes and dtypes, ``shardings`` (the same tree)
        where each array goes, so a checkpoint restores onto a different mesh. Raises
        ConfigError when the checkpoint holds another model than the run config ``config``'s,
        or another optimizer's state (``train.optimizer``, or arrays ``abstract_state`` lacks
        or shapes differ), or a loader state of another ``train.batch_size``, or (unless read
        only) when a step directory is not a jaxpt checkpoint. Unreadable newer checkpoints
        are skipped with a warning (and, unless read only, moved aside).
        """
        if not self.read_only:
            self._check_ours()
        target = _placed(abstract_state, shardings)
        fields = _fields_to_compare(config.model, config.train)
        restored = self._newest_readable(lambda step: self._restore(step, target, fields))
        if restored is None:
            return None
        step, items = restored
        return step, items["state"], dict(items["loader"])

    def restore_latest_params(
        self, abstract_params, shardings, model_config
    ) -> tuple[int, object] | None:
        """The newest readable checkpoint's ``(step, params)``, or None: what sampling,
        evaluation and export read. Nothing else is read, so the run's optimizer need not be
        the checkpoint's; raises ConfigError when it holds another model than
        ``model_config``. Unreadable newer checkpoints are skipped as ``restore_latest``
        skips them."""
        target = {"params": _placed(abstract_params, shardings)}
        fields = _fields_to_compare(model_config)
        restored = self._newest_readable(
            lambda step: self._restore(step, target, fields, whole=False)
        )
        if restored is None:
            return None
        step, items = restored
        return step, items["state"]["params"]

    def stored_section(self, step: int, section: str) -> dict:
        """The ``section`` (``"train"``, ``"data"``, ...) of the config checkpoint ``step`` was
        saved with ({} where an older version saved none)."""
        stored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(stored["config"].get(section, {}))

    def _newest_readable(self, restore: Callable[[int], dict]) -> tuple[int, dict] | None:
        """``(step, restore(step))`` for the newest step ``restore`` can read, or None;
        unreadable newer steps are skipped with a warning (and, unless read only, moved
        aside). Over several processes a step is read where every process could read its
        part: damage to one process's files alone would have them resume different steps."""
        unreadable = []
        restored = None
        for step in reversed(self.steps()):
            try:
                items = restore(step)
            except _Unreadable as error:
                items = None
                log.warning(
                    "Checkpoint %s in %s cannot be read (%s); trying the previous one.",
                    step,
                    self.directory,
                    error,
                )
            if _every_process(items is not None):
                restored = step, items
                break
            if items is not None:
                log.warning("Checkpoint %s: another process cannot read its part.", step)
            unreadable.append(step)
        if unreadable and not self.read_only:
            self._move_aside(unreadable)
        return restored

    def _restore(self, step: int, target, fields: dict, *, whole: bool = True) -> dict:
        """Checks that ``step`` holds the run's ``fields`` (see ``_fields_to_compare``) and
        the arrays of ``target``, then restores its items: the state's arrays ``target``
        names and, when it is the ``whole`` state, the loader's."""
        with _unreadable_on_error(), _absl_level(logging.ERROR):  # ours says what is missing
            stored = self.manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
            )["config"]
            stored = {"model": dict(stored["model"]), "train": dict(stored.get("train", {}))}
            arrays = jax.tree.leaves(self.manager.item_metadata(step)["state"])
            if not arrays:
                raise ValueError("the state's array metadata is missing")
        self._check_fields(step, stored, fields)
        self._check_arrays(step, {array.name: array.shape for array in arrays}, target, whole)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        items = {"state": ocp.args.PyTreeRestore(target, restore_args, partial_restore=not whole)}
        if whole:
            items["loader"] = ocp.args.JsonRestore()
        with _unreadable_on_error():
            return self.manager.restore(step, args=ocp.args.Composite(**items))

    def _check_ours(self) -> None:
        """ConfigError naming the first step directory, finished or not, that holds a name no
        checkpoint of ours does: another program's, which training would set aside as
        unreadable or rotate out, or (unfinished) delete when it saves that step."""
        unfinished = sorted(
            path
            for path in self.directory.glob(f"*{_UNFINISHED}*")
            if path.is_dir() and path.name.split(_UNFINISHED)[0].isdigit()
        )
        for path in [self.directory / str(step) for step in self.steps()] + unfinished:
            foreign = _foreign_names(path)
            if foreign:
                raise ConfigError(
                    f"{path} is not a jaxpt checkpoint (it holds {foreign[0]}), so this is not "
                    "a jaxpt run's directory: choose another --workdir (nothing was changed)."
                )

    def _check_fields(self, step: int, stored: dict, fields: dict) -> None:
        """ConfigError naming the first of ``fields`` (``"section.field"`` -> the run's value)
        whose value differs from checkpoint ``step``'s ``stored`` config (fields it lacks,
        e.g. from another version, are not compared), and the flags of every field that does
        (another preset's checkpoint differs in many: fixing the first led to the next)."""
        trained = {}  # "section.field" -> the checkpoint's value, where it differs
        for name, value in fields.items():
            section, field = name.split(".")
            if stored[section].get(field, value) != value:
                trained[name] = stored[section][field]
        if not trained:
            return
        first, *others = trained
        more = f" ({len(others)} more differ)" if len(others) > 1 else " (1 more)" * len(others)
        flags = " ".join(f"--config.{name}={value}" for name, value in trained.items())
        raise ConfigError(
            f"{first}={fields[first]!r} differs from checkpoint {step} in {self.directory}, "
            f"which was trained with {first}={trained[first]!r}{more}: run with {flags} to use "
            "it, or start the new run in another --workdir (nothing was changed)."
        )

    def _check_arrays(self, step: int, stored_shapes: dict, target, whole: bool) -> None:
        """ConfigError naming the first array of ``target`` whose shape differs from
        checkpoint ``step``'s, or else, when ``target`` is the ``whole`` state, the first
        array the checkpoint holds that it lacks (``stored_shapes``: orbax's dotted array
        name -> shape)."""
        names = ocp.tree.get_param_names(target, include_empty_nodes=False)
        needed = {
            name: array.shape
            for name, array in zip(jax.tree.leaves(names), jax.tree.leaves(target), strict=True)
        }
        for name, shape in needed.items():
            if stored_shapes.get(name) != shape:
                held = f"{name} with shape {stored_shapes[name]}" if name in stored_shapes else None
                needs = f"{_part(name)} needs shape {shape}"
                raise self._array_mismatch(step, held or f"no {name}", needs)
        extra = sorted(set(stored_shapes) - set(needed)) if whole else []
        if extra:
            raise self._array_mismatch(step, extra[0], f"{_part(extra[0])} has no such array")

    def _array_mismatch(self, step: int, held: str, where: str) -> ConfigError:
        return ConfigError(
            f"Checkpoint {step} in {self.directory} holds {held} where this config's {where}: "
            "run with the config it was trained with, or start the new run in another "
            "--workdir (nothing was changed)."
        )

    def _move_aside(self, steps: list[int]) -> None:
        """Renames each of ``steps`` to ``<step>.unreadable-<n>``: process 0 does, while the
        others (which share the directory, and found the same steps unreadable) wait."""
        self.manager.close()
        if jax.process_index() == 0:
            for step in steps:
                source = self.directory / str(step)
                target = next(
                    path
                    for n in itertools.count(1)
                    if not (path := self.directory / f"{step}.unreadable-{n}").exists()
                )
                source.rename(target)
                log.warning("Moved unreadable checkpoint %s to %s.", source, target)
        multihost_utils.sync_global_devices("jaxpt: unreadable checkpoints moved aside")
        self.manager = self._open()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def has_checkpoint(workdir: str | Path) -> bool:
    """Whether ``workdir/checkpoints`` holds a step's checkpoint (orbax names each by its
    step); reads none."""
    directory = Path(workdir) / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a finished step checkpoint of ours (``<run>/checkpoints/<step>``)."""
    return path.name.isdigit() and all((path / item).is_dir() for item in ("state", "config"))


def _is_checkpoints_of_a_run(path: Path) -> bool:
    """Whether ``path`` is a run's ``checkpoints`` directory holding a step checkpoint."""
    return (
        path.name == "checkpoints"
        and path.is_dir()
        and any(_is_checkpoint(step) for step in path.iterdir())
    )


def check_outside_checkpoints(path: str | Path, flag: str = "--workdir") -> None:
    """ConfigError naming ``flag`` when ``path`` is, or is inside, a run's ``checkpoints``
    directory or one of its step checkpoints (``--workdir=runs/a/checkpoints/4``, meant to
    resume ``runs/a``; an export's ``--out`` there): files written there sit among that run's
    checkpoints, whose training then refuses them. Names the run's directory; reads no
    checkpoint."""
    absolute = Path(path).absolute()
    for place in (absolute, *absolute.parents):
        if _is_checkpoint(place):
            run = place.parent.parent
        elif _is_checkpoints_of_a_run(place):
            run = place.parent
        else:
            continue
        todo = (
            f"pass --workdir={run} to resume or read that run, or choose a new --workdir"
            if flag == "--workdir"
            else f"choose a {flag} outside {run / 'checkpoints'}"
        )
        raise ConfigError(
            f"{flag}={path} is inside the checkpoints of the run in {run}, where this command "
            f"would write its own files among that run's checkpoints: {todo} (nothing was "
            "changed)."
        )


def _every_process(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (all of them call this together)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def trained_checkpoints(workdir: str | Path, *, or_init_from: bool = False) -> Path:
    """``workdir/checkpoints``, after checking that it holds a step's checkpoint (ConfigError
    saying what to do when it does not: train, or, ``or_init_from`` where the command reads
    ``checkpoint.init_from`` without one, name a pretrained checkpoint); reads no
    checkpoint."""
    directory = Path(workdir) / "checkpoints"
    todo = f"train this config with --mode=train and --workdir={workdir} first" + (
        ", or read a Hugging Face checkpoint with --config.checkpoint.init_from=<its directory "
        "or hub name>"
        if or_init_from
        else ""
    )
    check_outside_checkpoints(workdir)
    if Path(workdir).is_file():  # training there would fail too
        raise ConfigError(
            f"--workdir={workdir} is a file, not a run's directory: name the --workdir a run "
            "trained in."
        )
    if directory.exists() and not directory.is_dir():
        raise ConfigError(
            f"{directory} is a file, not a run's checkpoints: name another --workdir."
        )
    if not directory.is_dir():
        raise ConfigError(f"{directory} does not exist: {todo}.")
    if not has_checkpoint(workdir):
        raise ConfigError(f"{directory} holds no checkpoint: {todo}.")
    return directory


def latest_params(config, workdir: str | Path) -> tuple[int, object]:
    """The step and params of the newest readable checkpoint in ``workdir/checkpoints``
    (ConfigError when it holds another model than ``config.model``, or none, as
    ``trained_checkpoints`` says; the rest of the config, the optimizer included, may differ);
    reads only, and nothing but the params."""
    directory = trained_checkpoints(workdir)
    checkpoints = Checkpoints(directory, keep=None)  # read only: nothing is touched
    try:
        mesh = sharding.make_mesh(config.mesh)
        abstract, shardings = abstract_state(config, mesh)
        restored = checkpoints.restore_latest_params(
            abstract.params, shardings.params, config.model
        )
    finally:
        checkpoints.close()
    if restored is None:
        raise ConfigError(
            f"no checkpoint in {directory} could be read (the warnings above give each one's "
            "cause): restore their files from a copy, or train this config again with "
            f"--mode=train and --workdir={workdir}, which sets them aside and starts at step 0."
        )
    return restored


def read_tree(directory: str | Path):
    """The pytree an orbax checkpointer saved in ``directory``, as nested dicts of numpy
    arrays; ConfigError naming ``directory`` and the cause when it is missing, incomplete or
    damaged."""
    try:
        with _unreadable_on_error(), _absl_level(logging.ERROR):
            return ocp.StandardCheckpointer().restore(Path(directory).absolute())
    except _Unreadable as error:
        raise ConfigError(
            f"{directory} cannot be read as a checkpoint ({error}): name a complete checkpoint "
            "directory."
        ) from None


def _fields_to_compare(model_config, train_config=None) -> dict:
    """What a checkpoint must share with a run, ``"section.field"`` -> the run's value: the
    model fields but ``FREE_MODEL_FIELDS``, and, to resume training (``train_config`` given),
    ``train.optimizer`` (whose state it holds) and ``train.batch_size`` (whose batches its
    loader state counts)."""
    fields = {f"model.{k}": v for k, v in model_config.items() if k not in FREE_MODEL_FIELDS}
    if train_config is None:
        return fields
    resumed = {f"train.{k}": train_config[k] for k in ("optimizer", "batch_size")}
    return {**fields, **resumed}


def _placed(abstract, shardings):
    """``abstract``'s shapes and dtypes with ``shardings`` (the same tree): a restore target."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def _part(array_name: str) -> str:
    """Which part of the train state an orbax array name (``params.wte.weight``) is in."""
    return "model" if array_name.startswith("params.") else "optimizer state"


class _Unreadable(Exception):
    """A checkpoint's files are missing or cannot be parsed."""


@contextlib.contextmanager
def _unreadable_on_error():
    """Turns whatever orbax and tensorstore raise on missing or damaged files into
    ``_Unreadable`` with the first line of the root cause. Orbax reads arrays (and their
    metadata) concurrently, and when one fails it closes its event loop with the others
    still running: they fail in turn, on its threads, from that moment to the process's exit.
    Their errors are dropped while a read is in flight and, once one has failed, for good
    (``_AbandonedReadErrors``)."""
    abandoned_reads = _abandoned_read_errors()
    abandoned_reads.reading += 1
    try:
        yield
    except Exception as error:  # orbax wraps tensorstore's errors in a bare Exception
        abandoned_reads.failed = True
        cause = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        first_line = (str(cause).splitlines() or [""])[0]
        first_line = _TENSORSTORE_PAYLOADS.sub("", first_line)[:300]
        raise _Unreadable(f"{type(cause).__name__}: {first_line}") from error
    finally:
        abandoned_reads.reading -= 1


# What tensorstore appends to an error's message: " [tensorstore_spec='{...the whole spec as
# JSON...}']", " [source locations='...']"; the message before it says what is wrong.
_TENSORSTORE_PAYLOADS = re.compile(r" \[[\w ]+='.*")


class _AbandonedReadErrors:
    """Keeps the errors of the reads a failed restore abandoned off the console: asyncio and
    the unraisable hook would print each one's traceback, hundreds of lines after the
    checkpoint was reported unreadable. Its hooks drop them only while a read is in flight
    (``reading``) or after one ``failed``."""

    def __init__(self):
        self.reading = 0
        self.failed = False
        logging.getLogger("asyncio").addFilter(self._keeps_log_record)
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable_hook

    def _dropping(self) -> bool:
        return self.reading > 0 or self.failed

    def _keeps_log_record(self, record: logging.LogRecord) -> bool:
        return not (self._dropping() and "exception was never retrieved" in record.getMessage())

    def _unraisable_hook(self, unraisable) -> None:
        if not (self._dropping() and _abandoned_read_error(unraisable.exc_value)):
            self._previous_hook(unraisable)


def _abandoned_read_error(error: BaseException | None) -> bool:
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    return any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames)


@functools.cache  # one per process, made at its first read
def _abandoned_read_errors() -> _AbandonedReadErrors:
    return _AbandonedReadErrors()


@contextlib.contextmanager
def _absl_level(level: int):
    """Raises the absl logger's threshold (orbax logs through absl) for a block."""
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
