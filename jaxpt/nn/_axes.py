"""Logical axis names for parameters.

Every weight names its axes where it is created (``Linear(axes=("embed", "mlp"))``); stacking
layers adds a leading ``"layers"`` axis. :func:`logical_axes` returns a pytree of the same
structure as the params whose leaves are :class:`Axes` tuples, from which sharding rules derive
``PartitionSpec``s (see ``jaxpt.sharding``).
"""

from __future__ import annotations

import dataclasses

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


def _leaf_layer_axes(layer: HasAxes) -> HasAxes:
    if not isinstance(layer, HasAxes):
        raise TypeError(f"Every parameter must live in a layer that names its axes; got {layer!r}.")
    replaced = {}
    for name, names in layer.param_axes().items():
        array = getattr(layer, name)
        if array is None:
            continue
        stacked = ("layers",) * (array.ndim - len(names))  # leading axes added by stacking
        replaced[name] = Axes(stacked + tuple(names))
    return dataclasses.replace(layer, **replaced)


def logical_axes(params):
    """The logical axis names of every array in ``params``, as a pytree of :class:`Axes`."""
    return jax.tree.map(_leaf_layer_axes, params, is_leaf=lambda x: isinstance(x, HasAxes))
