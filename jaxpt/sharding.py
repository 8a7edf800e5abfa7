"""Mesh and logical-axis rules: PartitionSpecs for params, optimizer state and batches.

Weights name their logical axes where they are created (``jaxpt.nn.logical_axes``); the rules
table in ``config.mesh.rules`` maps each logical name to mesh axes. Data parallel, FSDP, tensor
and expert parallelism are all just rule tables over the one mesh
``("data", "fsdp", "tensor", "expert")``.
"""

from __future__ import annotations

import math

import jax
import ml_collections
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpt import nn
from jaxpt.errors import ConfigError, check_range

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def default_rules() -> ml_collections.ConfigDict:
    """Logical name -> mesh axes (a tuple; empty = replicated)."""
    return ml_collections.ConfigDict(
        dict(
            batch=("data", "fsdp", "expert"),  # activations and input batches
            embed=("fsdp",),
            mlp=("tensor",),
            q_heads=("tensor",),
            kv_heads=("tensor",),
            vocab=("tensor",),
            expert=("expert",),
            layers=(),
            norm=(),
        )
    )


def validate_mesh(mesh_cfg) -> None:
    """Raises ConfigError naming the first ``config.mesh`` field that breaks a rule: sizes are
    positive or -1 (the devices left over, on one axis at most), and rules name mesh axes."""
    for axis in MESH_AXES:
        size = mesh_cfg[axis]
        if size != -1:
            check_range(f"mesh.{axis}", size, at_least=1, integer=True, note=", or -1 (the rest)")
    rest = [f"mesh.{axis}" for axis in MESH_AXES if mesh_cfg[axis] == -1]
    if len(rest) > 1:
        raise ConfigError(
            f"{' and '.join(rest)} are all -1: at most one axis takes the devices left over."
        )
    for name, axes in mesh_cfg.rules.items():
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ConfigError(
                f"mesh.rules.{name}={tuple(axes)!r} names {unknown[0]!r}, not one of the mesh "
                f"axes {list(MESH_AXES)}."
            )


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, ...]:
    """Sizes of MESH_AXES; one size may be -1 (the devices left over)."""
    validate_mesh(mesh_cfg)
    sizes = [mesh_cfg[axis] for axis in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise ConfigError(
                f"The fixed mesh axes multiply to {fixed}, which does not divide "
                f"the {n_devices} devices."
            )
        sizes[sizes.index(-1)] = n_devices // fixed
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"The mesh {dict(zip(MESH_AXES, sizes, strict=True))} has "
            f"{math.prod(sizes)} slots for {n_devices} devices; make the product "
            "of mesh.data, mesh.fsdp, mesh.tensor and mesh.expert equal it."
        )
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """The device mesh described by ``config.mesh`` over ``devices`` (default: all)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: shardings come from the rules and the compiler, as jit's in/out_shardings say
    auto = (AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, auto, devices=devices)


def spec_for(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh, rules) -> P:
    """The PartitionSpec of one array from its logical axes.

    A dimension stays replicated where the rules give no mesh axis, where its size does not
    divide by the mesh axes' size, or where a mesh axis is already used by another dimension.
    """
    used: set[str] = set()
    spec = []
    for size, name in zip(shape, axes, strict=True):
        mesh_axes = tuple(
            a for a in (rules.get(name, ()) if name else ()) if mesh.shape[a] > 1 and a not in used
        )
        if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return P(*spec)


def param_shardings(params, mesh: Mesh, rules):
    """NamedShardings for every array of ``params`` (abstract shapes are fine)."""
    return jax.tree.map(
        lambda x, axes: NamedSharding(mesh, spec_for(x.shape, axes, mesh, rules)),
        params,
        nn.logical_axes(params),
    )


def batch_axes(mesh: Mesh, rules) -> tuple[str, ...]:
    """Mesh axes that split the batch dimension (those of size > 1)."""
    return tuple(a for a in rules["batch"] if mesh.shape[a] > 1)


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Batches ``(B, ...)`` split over the batch axes, replicated along the rest."""
    return NamedSharding(mesh, P(batch_axes(mesh, rules) or None, *([None] * (ndim - 1))))


def activation_sharding(mesh: Mesh, rules):
    """A context in which layers pin the activations they name (``nn.constrain``) to the
    sharding the rules give their logical axes. Enter it around the first call of a jitted
    step (that is when it is traced)."""
    return nn.shard_activations(
        lambda shape, names: NamedSharding(mesh, spec_for(shape, names, mesh, rules))
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())
