"""What ``launch.py`` runs, importable so tests can drive it without a subprocess."""

from __future__ import annotations

import jax

from jaxpt import models


def count_params(config) -> int:
    """Number of parameters of ``config.model``, without allocating them."""
    model = models.get(config.model.name)
    shapes = jax.eval_shape(lambda key: model.init(key, config.model), jax.random.key(0))
    return sum(leaf.size for leaf in jax.tree.leaves(shapes))


def run(config, *, workdir: str | None, mode: str) -> None:
    """Validates ``config`` and reports the run it describes."""
    models.get(config.model.name).validate(config.model)
    print(config)
    print(f"model {config.model.name}: {count_params(config):,} parameters")
    print(f"mode={mode} workdir={workdir}: training lands with the training issue.")
