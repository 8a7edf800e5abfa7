"""The evaluation tasks a run config names (``eval.tasks``)."""

from __future__ import annotations

from jaxpt.errors import ConfigError

NATIVE_TASKS = ("val_loss", "hellaswag")
HARNESS = "harness:"  # prefix of an lm-evaluation-harness task: a registered name or a YAML file


def parse_tasks(tasks: str) -> list[str]:
    """The comma-separated entries of ``eval.tasks``, e.g. ``"val_loss,harness:arc_easy"``.

    Raises ConfigError naming an entry that is neither a native task nor ``harness:NAME``, or
    an empty one (``"val_loss,,hellaswag"``: a name left out, e.g. an unset shell variable),
    or one named twice.
    """
    entries = [entry.strip() for entry in str(tasks).split(",")]
    if not any(entries):
        raise ConfigError(
            f"eval.tasks={tasks!r} names no task; give some of {', '.join(NATIVE_TASKS)} or "
            "harness:NAME, separated by commas."
        )
    if not all(entries):
        raise ConfigError(
            f"eval.tasks={tasks!r} has an empty entry (entry {entries.index('') + 1}); name a "
            "task between every two commas, or leave the extra comma out."
        )
    for entry in entries:
        if entry not in NATIVE_TASKS and not (entry.startswith(HARNESS) and entry[len(HARNESS) :]):
            raise ConfigError(
                f"eval.tasks entry {entry!r} is not one of {', '.join(NATIVE_TASKS)} nor "
                "harness:NAME (an lm-evaluation-harness task or task YAML file)."
            )
    for number, entry in enumerate(entries, 1):
        first = entries.index(entry) + 1
        if first < number:  # it would run once: the results would not show what was asked
            raise ConfigError(
                f"eval.tasks={tasks!r} names {entry!r} twice (entries {first} and {number}); "
                "name each task once."
            )
    return entries
