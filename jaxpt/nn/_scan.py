"""Stacked layers: init with ``vmap`` over keys, run with ``lax.scan`` (or an unrolled loop)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array


def stack_layers(init_fn: Callable[[Array], object], key: Array, n: int):
    """``n`` independent inits of one layer, stacked on a leading axis of every array."""
    return jax.vmap(init_fn)(jax.random.split(key, n))


# The jax.checkpoint_policies members that are policies themselves; the module's others
# (save_only_these_names, offload_dot_with_no_batch_dims, ...) build one from arguments that a
# policy name cannot carry.
REMAT_POLICIES = (
    "none",
    "full",
    "everything_saveable",
    "nothing_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)


def remat(fn: Callable, policy: str) -> Callable:
    """Wraps ``fn`` in ``jax.checkpoint`` by policy name (one of ``REMAT_POLICIES``).

    ``"none"`` keeps every activation; ``"full"`` recomputes everything in the backward pass;
    any other name is that ``jax.checkpoint_policies`` policy, e.g. ``"dots_saveable"``.
    """
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn)
    return jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, policy))


def scan_layers(body: Callable, carry, stacked, *, scan: bool = True):
    """Runs ``carry, out = body(carry, layer)`` over the leading axis of ``stacked``.

    With ``scan=False`` the same params run in a Python loop (one compiled copy per layer),
    which gives identical results and can help XLA schedule small models; arrays of
    ``stacked`` may then come split already (``split_layers``).
    Returns the final carry and the per-layer outputs stacked on a leading axis.
    """
    if scan:
        return jax.lax.scan(body, carry, stacked)
    outs = []
    for layer in unstack(stacked):
        carry, out = body(carry, layer)
        outs.append(out)
    return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def unstack(stacked) -> list:
    """The layers of ``stacked`` (every array ``(L, ...)``, or ``SplitLayers``) as ``L``
    pytrees of ``(...)``.

    One split per array, whose gradient is one concatenate. Indexing each layer (``a[i]``)
    would give each array a gradient of ``L`` zero-padded copies of the whole stack added up,
    which XLA:GPU evaluated inside the gradient norm: 60 of the 178 ms of a Tiny_MoE_2 step
    (30 layers of ``(8, 672, 2048)`` experts, one H200).
    """
    leaves, treedef = jax.tree.flatten(stacked, is_leaf=_is_split)
    split = [a if _is_split(a) else _split(a) for a in leaves]
    return [treedef.unflatten([pieces[i] for pieces in split]) for i in range(len(split[0]))]


class SplitLayers(tuple):
    """The ``L`` layers of one stacked array, split already (``split_layers``)."""


jax.tree_util.register_pytree_node(
    SplitLayers, lambda layers: (tuple(layers), None), lambda _, layers: SplitLayers(layers)
)


def split_layers(stacked):
    """``stacked`` with every array ``(L, ...)`` split into its layers (``SplitLayers``), for
    ``scan_layers(..., scan=False)`` to take as they are.

    A decoding loop's params, split once before the loop: split inside it, XLA:GPU copies
    every layer's weights out of their stacks at every step (the GEMMs do not read a slice in
    place).
    """
    return jax.tree.map(lambda a: SplitLayers(_split(a)), stacked)


def _split(a: Array) -> list[Array]:
    """``(L, ...)`` -> ``L`` arrays ``(...)``, by one split."""
    return [piece.reshape(piece.shape[1:]) for piece in jnp.split(a, a.shape[0])]


def _is_split(x) -> bool:
    return isinstance(x, SplitLayers)
