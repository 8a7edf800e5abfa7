"""Logical axis names for parameters.

Every weight names its axes where it is created (``Linear(axes=("embed", "mlp"))``); stacking
layers adds a leading ``"layers"`` axis. :func:`logical_axes` returns a pytree of the same
structure as the params whose leaves are :class:`Axes` tuples, from which sharding rules derive
``PartitionSpec``s (see ``jaxpt.sharding``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax


class Axes(tuple):
    """Logical axis names of one array; a pytree leaf (a plain tuple would be a node)."""

    def __repr__(self) -> str:
        return f"Axes{tuple(self)!r}"


class HasAxes(eqx.Module):
    """A leaf layer: its array fields are listed with their logical axes by ``param_axes``."""

    def param_axes(self) -> dict[str, tuple[str | None, ...]]:
        raise NotImplementedError


def map_params(fn: Callable[[HasAxes, jax.Array, tuple], object], params):
    """Replaces every array of ``params`` by ``fn(layer, array, names)``.

    ``layer`` is the leaf layer holding the array and ``names`` the logical axes it declared
    (without the leading ``"layers"`` axes that stacking adds).
    """

    def per_layer(layer):
        if not isinstance(layer, HasAxes):
            raise TypeError(f"Every parameter must live in a layer that names its axes: {layer!r}")
        replaced = {
            field: fn(layer, getattr(layer, field), tuple(names))
            for field, names in layer.param_axes().items()
            if getattr(layer, field) is not None
        }
        return dataclasses.replace(layer, **replaced)

    return jax.tree.map(per_layer, params, is_leaf=lambda x: isinstance(x, HasAxes))


def logical_axes(params):
    """The logical axis names of every array in ``params``, as a pytree of :class:`Axes`."""
    return map_params(
        lambda layer, array, names: Axes(("layers",) * (array.ndim - len(names)) + names),
        params,
    )


# ---------------------------------------------------------------- activations

# How to shard an activation by its logical axis names: set by ``jaxpt.sharding``'s
# ``activation_sharding`` while a sharded step is traced; None: leave it to the compiler.
_ACTIVATION_SHARDING: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "jaxpt_activation_sharding", default=None
)


@contextlib.contextmanager
def shard_activations(sharding_of: Callable):
    """While active, :func:`constrain` pins activations to ``sharding_of(shape, names)``."""
    token = _ACTIVATION_SHARDING.set(sharding_of)
    try:
        yield
    finally:
        _ACTIVATION_SHARDING.reset(token)


def activation_sharding_of(
    shape: tuple[int, ...], names: tuple[str | None, ...]
) -> jax.sharding.NamedSharding | None:
    """The sharding an activation of ``shape`` with logical axis ``names`` gets while a sharded
    step is being traced (see :func:`constrain`); None otherwise."""
    sharding_of = _ACTIVATION_SHARDING.get()
    return None if sharding_of is None else sharding_of(shape, names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """``x`` constrained to the sharding its logical axis ``names`` map to, when a sharded
    step is being traced (``jaxpt.sharding.activation_sharding``); otherwise ``x``."""
    sharding = activation_sharding_of(x.shape, names)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
