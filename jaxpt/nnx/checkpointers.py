"""The original's ``jaxpt.checkpointers``: model and optimizer checkpoints under
``output_dir/<config.name>/``."""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp
from flax import nnx

from jaxpt.nnx.models._config import Config
from jaxpt.nnx.models._module import ConfiguredModel


def checkpoint_path(output_dir: Path, name: str, run_dirname: str, step: int) -> Path:
    """``output_dir/name/checkpoints/run_dirname/checkpoint-<step>.pt`` (an orbax directory)."""
    return Path(output_dir) / name / "checkpoints" / run_dirname / f"checkpoint-{step}.pt"


def save_checkpoint(m: ConfiguredModel, output_dir: Path, run_dirname: str, step: int) -> None:
    """``m.save_checkpoint`` at ``checkpoint_path``; an existing checkpoint is never replaced."""
    m.save_checkpoint(checkpoint_path(output_dir, m.config.name, run_dirname, step))


def load_checkpoint(
    model: type[ConfiguredModel],
    output_dir: Path,
    config: Config,
    run_dirname: str,
    step: int,
    rngs: nnx.Rngs | None = None,
) -> ConfiguredModel:
    """``model.from_checkpoint`` (``model`` is the class) of ``checkpoint_path``."""
    path = checkpoint_path(output_dir, config.name, run_dirname, step)
    return model.from_checkpoint(path, rngs, config)


def _optimizer_path(output_dir: Path, config: Config, run_dirname: str, step: int) -> Path:
    return Path(output_dir) / config.name / "optimizer_checkpoints" / run_dirname / f"step-{step}"


def save_optimizer_state(
    output_dir: Path, run_dirname: str, config: Config, optimizer: nnx.Optimizer
) -> None:
    """The optimizer's state (step, moments) at ``.../optimizer_checkpoints/<run>/step-<step>``."""
    state = nnx.to_pure_dict(nnx.state(optimizer))
    path = _optimizer_path(output_dir, config, run_dirname, int(optimizer.step[...]))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.absolute(), state)
    checkpointer.wait_until_finished()


def load_optimizer_state(
    config: Config, optimizer: nnx.Optimizer, output_dir: Path, run_dirname: str, step: int
) -> nnx.Optimizer:
    """Restores the state ``save_optimizer_state`` wrote at ``step`` into ``optimizer``."""
    state = nnx.state(optimizer)
    target = nnx.to_pure_dict(state)
    path = _optimizer_path(output_dir, config, run_dirname, step).absolute()
    nnx.replace_by_pure_dict(state, ocp.StandardCheckpointer().restore(path, target))
    nnx.update(optimizer, state)
    return optimizer
