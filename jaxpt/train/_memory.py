"""The train state's device memory, checked from its shapes before anything is initialised, and
the train step's, checked once it is compiled and before it first runs: a state or step that
cannot fit is one sentence saying what would, not a hang or an allocator's out-of-memory report.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax

from jaxpt import memory, sharding
from jaxpt.errors import ConfigError

# the share of a device's memory a suggested setting may plan for: the estimate scales the
# step's temporaries with the micro-batch, though some (the gradients) do not shrink with it
_PLANNED_SHARE = 0.85


def check_state_fits(abstract, shardings, mesh) -> None:
    """ConfigError when the train state (``abstract``: shapes and dtypes; ``shardings``: the
    same tree's shardings over ``mesh``) needs more bytes on a device than ``memory_limit``
    allows for the devices of ``mesh`` this process holds."""
    need = sum(
        math.prod(where.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for leaf, where in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)
    )
    limit, what = _memory_limit(mesh)
    if need <= limit:
        return
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract.params))
    raise ConfigError(
        f"the params ({count:,} of them) and optimizer state need {memory.size_text(need)} on "
        f"each device, more than the {memory.size_text(limit)} {what}: train a smaller model "
        "(model.n_layer, model.n_embed), or shard the state over more devices (mesh.fsdp)."
    )


def _memory_limit(mesh) -> tuple[int, str]:
    """``memory.memory_limit`` for the devices of ``mesh`` this process holds."""
    local = sum(device.process_index == jax.process_index() for device in mesh.devices.flat)
    return memory.memory_limit(local)


def memory_checked(step: Callable, config, mesh) -> Callable:
    """``step`` (a jitted train step), compiled at its first call for those arguments, which
    every later call then runs: before it first runs, ``check_step_fits`` against what
    ``memory.memory_limit`` allows each of this process's devices of ``mesh``."""
    compiled = None

    def run(*args):
        nonlocal compiled
        if compiled is None:
            compiled = step.lower(*args).compile()
            if (stats := compiled.memory_analysis()) is not None:
                limit, what = _memory_limit(mesh)
                check_step_fits(stats, limit, what, config, mesh)
        return compiled(*args)

    return run


def check_step_fits(stats, limit: int, what: str, config, mesh) -> None:
    """ConfigError when the compiled step (``stats``: its ``memory_analysis()``) needs more
    than ``limit`` bytes on a device (``what`` says what sets that limit, as
    ``memory.memory_limit`` does), naming the smallest ``train.grad_accum_steps`` that should
    fit (the step's temporaries scaled with the micro-batch), or, where none would, what else
    lowers the need."""
    need = memory.program_bytes(stats)
    if need <= limit:
        return
    train_cfg, shards = config.train, sharding.batch_shards(mesh, config.mesh.rules)
    micro = train_cfg.batch_size // train_cfg.grad_accum_steps // shards
    where = (
        f"the train step needs {memory.size_text(need)} on each device, more than the "
        f"{memory.size_text(limit)} {what}, at {micro} sequences of "
        f"{config.model.block_size} tokens a device at a time "
        f"(train.batch_size={train_cfg.batch_size}, "
        f"train.grad_accum_steps={train_cfg.grad_accum_steps})"
    )
    accum = _fitting_accumulation(stats, limit, config, mesh)
    if accum is None:
        raise ConfigError(
            f"{where}, and fewer sequences at a time would not fit either: shard the params "
            "and optimizer state over more devices (mesh.fsdp), recompute activations "
            "(model.remat_policy=full) or shorten model.block_size."
        )
    raise ConfigError(
        f"{where}: set --config.train.grad_accum_steps={accum} (or recompute activations, "
        "model.remat_policy=full, or spread the batch over more devices)."
    )


def _fitting_accumulation(stats, limit: int, config, mesh) -> int | None:
    """The smallest ``train.grad_accum_steps`` above the config's that keeps whole micro-batches
    on every batch shard and whose estimated need is at most ``_PLANNED_SHARE`` of ``limit``;
    None when there is none."""
    batch, accum = config.train.batch_size, config.train.grad_accum_steps
    shards = sharding.batch_shards(mesh, config.mesh.rules)
    fixed = memory.program_bytes(stats) - stats.temp_size_in_bytes
    for more in range(accum + 1, batch // shards + 1):
        if batch % more or (batch // more) % shards:
            continue
        if fixed + stats.temp_size_in_bytes * accum / more <= _PLANNED_SHARE * limit:
            return more
    return None
