"""Orbax checkpoints in ``<workdir>/checkpoints/<step>/``: train state, loader state, config.

Saves are asynchronous; orbax writes each one under a temporary name and renames it when
complete, so a half-written checkpoint is never listed. A listed checkpoint that cannot be
read (truncated, corrupted) is reported, moved aside to ``<step>.unreadable`` (nothing is
deleted) and the previous one is used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpoints:
    """Save and restore ``(state, loader_state, config)`` under ``directory``."""

    def __init__(self, directory: str | Path, *, keep: int):
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=True, enable_async_checkpointing=True
        )
        return ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "loader", "config")
        )

    def save(self, step: int, state, loader_state: dict, config) -> None:
        """Starts an asynchronous save of ``step`` (waits for the previous one first)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
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

    def restore_latest(self, abstract_state, shardings) -> tuple[int, object, dict] | None:
        """The newest readable checkpoint as ``(step, state, loader_state)``, or None.

        ``abstract_state`` gives the tree, shapes and dtypes, ``shardings`` (the same tree)
        where each array goes, so a checkpoint restores onto a different mesh. Unreadable
        newer checkpoints are moved aside with a warning.
        """
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            shardings,
        )
        unreadable = []
        restored = None
        for step in reversed(self.steps()):
            try:
                items = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target),
                        loader=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as error:
                log.warning(
                    "Checkpoint %s is unreadable (%s: %s); trying the previous one.",
                    step,
                    type(error).__name__,
                    str(error).splitlines()[0][:200],
                )
                unreadable.append(step)
                continue
            restored = (step, items["state"], dict(items["loader"]))
            break
        if unreadable:
            self._move_aside(unreadable)
        return restored

    def _move_aside(self, steps: list[int]) -> None:
        self.manager.close()
        for step in steps:
            source = self.directory / str(step)
            target = self.directory / f"{step}.unreadable"
            source.rename(target)
            log.warning("Moved unreadable checkpoint %s to %s.", source, target)
        self.manager = self._open()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
