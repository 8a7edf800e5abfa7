"""The original's ``jaxpt.checkpointers``: model and optimizer checkpoints under
``output_dir/<config.name>/``."""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from jaxpt import train
from jaxpt.errors import ConfigError
from jaxpt.nnx.models._config import Config
from jaxpt.nnx.models._module import ConfiguredModel, save_new_checkpoint


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
    """The optimizer's state (step, moments) at ``.../optimizer_checkpoints/<run>/step-<step>``,
    which must not exist yet (ConfigError)."""
    path = _optimizer_path(output_dir, config, run_dirname, int(optimizer.step[...]))
    save_new_checkpoint(path, nnx.to_pure_dict(nnx.state(optimizer)))


def load_optimizer_state(
    config: Config, optimizer: nnx.Optimizer, output_dir: Path, run_dirname: str, step: int
) -> nnx.Optimizer:
    """Restores the state ``save_optimizer_state`` wrote at ``step`` into ``optimizer``, each
    array with the dtype and sharding of the one it replaces.

    Raises ConfigError naming the directory when it is missing, incomplete or damaged, or
    the first array it does not hold as ``optimizer`` does (another model or optimizer).
    """
    state = nnx.state(optimizer)
    target = nnx.to_pure_dict(state)
    path = _optimizer_path(output_dir, config, run_dirname, step)
    stored = _by_name(train.read_tree(path))
    _check_same_arrays(path, stored, _by_name(target))
    restored = jax.tree_util.tree_map_with_path(
        lambda key, like: jax.device_put(stored[_name(key)], like.sharding),
        target,
    )
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(optimizer, state)
    return optimizer


def _name(key_path) -> str:
    """A pytree key path as a dotted name: ``opt_state.0.mu.params.wte.weight``."""
    return jax.tree_util.keystr(key_path, simple=True, separator=".")


def _by_name(tree) -> dict:
    """The arrays of ``tree`` by dotted name."""
    return {_name(key): leaf for key, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _describe(array) -> str:
    return f"{array.dtype} {tuple(array.shape)}"


def _check_same_arrays(path: Path, stored: dict, target: dict) -> None:
    """ConfigError naming the first array of ``target`` that ``stored`` lacks or holds with
    another dtype or shape, or else the first one ``stored`` holds beyond ``target``."""
    for name, like in target.items():
        if name not in stored:
            raise _another_state(path, f"this optimizer's {name} ({_describe(like)}) is not in it")
        if _describe(stored[name]) != _describe(like):
            saved, wanted = _describe(stored[name]), _describe(like)
            raise _another_state(path, f"its {name} is {saved}, this optimizer's {wanted}")
    extra = sorted(set(stored) - set(target))
    if extra:
        raise _another_state(path, f"it holds {extra[0]}, which this optimizer has not")


def _another_state(path: Path, difference: str) -> ConfigError:
    return ConfigError(
        f"{path} holds the state of another model or optimizer ({difference}): load it with "
        "the model config and optax transformation it was saved with."
    )
