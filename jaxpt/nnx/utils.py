"""The original's ``jaxpt.utils``: parameter counts, sharded construction, params by path."""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh

from jaxpt import sharding
from jaxpt.errors import ConfigError
from jaxpt.nnx.models import _layout
from jaxpt.nnx.models._config import Config
from jaxpt.nnx.models._module import ConfiguredModel, FunctionalModel, init_params


def count_params(m: FunctionalModel, layer_type: str | None = None) -> int:
    """The number of parameters, counted over the original's tree as the original counts:
    with ``layer_type`` (e.g. ``"attn"``, ``"moe"``) only those whose path has that exact
    component. The RoPE table is not a parameter."""
    cfg = m.model_config()
    flat = jax.eval_shape(
        lambda params: _layout.to_original(m.layout, params, cfg), m.functional_params()
    )
    return sum(
        leaf.size
        for path, leaf in flat.items()
        if layer_type is None or layer_type in path.split(".")
    )


def create_sharded_model(
    Model: type[ConfiguredModel],
    config: Config,
    rngs: nnx.Rngs,
    mesh: Mesh,
    rules: Mapping | None = None,
) -> ConfiguredModel:
    """``Model(config, rngs)`` with its params created sharded over ``mesh``.

    Each param's PartitionSpec comes from the core's logical-axis ``rules``
    (``jaxpt.sharding.default_rules()`` by default, over the mesh axes of
    ``jaxpt.sharding.make_mesh``: data, fsdp, tensor, expert), not from per-weight config
    fields; a dimension whose mesh axes do not divide it stays replicated. The params are
    placed on ``mesh``'s devices with ``Auto`` axes, as the core's meshes have, whatever
    ``mesh``'s axis types (``jax.make_mesh`` makes ``Explicit`` ones, on which the layers'
    products of sharded dimensions do not trace).

    Raises ConfigError naming the first mesh axis the rules name that ``mesh`` lacks.
    """
    rules = sharding.default_rules() if rules is None else rules
    _check_rule_axes(mesh, rules)
    auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)
    cfg = config.model_config()
    abstract = jax.eval_shape(init_params, jax.random.key(0), cfg)
    shardings = sharding.param_shardings(abstract, auto, rules)
    make = jax.jit(init_params, static_argnums=1, out_shardings=shardings)
    return Model.from_params(make(rngs.params(), cfg), config, rngs)


def _check_rule_axes(mesh: Mesh, rules: Mapping) -> None:
    """ConfigError naming the first mesh axis ``rules`` (logical name -> mesh axes) names
    that ``mesh`` lacks."""
    for name, axes in rules.items():
        missing = [axis for axis in axes if axis not in mesh.axis_names]
        if missing:
            raise ConfigError(
                f"the mesh's axes are {mesh.axis_names}, but the sharding rule {name}="
                f"{tuple(axes)!r} names {missing[0]!r}: build the mesh over "
                "jaxpt.sharding.MESH_AXES (jax.make_mesh(shape, MESH_AXES)), or pass rules "
                "that name its axes."
            )


def get_param(state: nnx.State, path: str) -> jax.Array:
    """The array at the dotted ``path`` of ``state`` (``nnx.state(model)``), whose paths are
    the core's, e.g. ``"params.blocks.0.attn.q.weight"`` (the original asserted a
    ``VariableState``, which flax 0.11 no longer has [D17])."""
    return _variable(state, path)[...]


def update_param(state: nnx.State, path: str, value) -> nnx.State:
    """Sets the array at the dotted ``path`` of ``state`` to ``value`` (the same shape; cast to
    the param's dtype) and returns ``state``; ``nnx.update(model, state)`` then applies it."""
    variable = _variable(state, path)
    value = jax.numpy.asarray(value, variable.dtype)
    if value.shape != variable.shape:
        raise ConfigError(
            f"update_param: {path} has shape {variable.shape}, the value {value.shape}."
        )
    variable.value = value
    return state


def _variable(state: nnx.State, path: str) -> nnx.Variable:
    """The variable at the dotted ``path``; ConfigError naming what is there instead."""
    node = state
    for depth, key in enumerate(int(k) if k.isdigit() else k for k in path.split(".")):
        where = ".".join(path.split(".")[:depth]) or "the state"
        if not isinstance(node, nnx.State):
            raise ConfigError(f"{path} is not a param path: {where} is a param already.")
        if key not in node:
            known = sorted(map(str, node))
            raise ConfigError(f"{path} is not a param path: {where} holds {known}.")
        node = node[key]
    if not isinstance(node, nnx.Variable):
        raise ConfigError(f"{path} holds several params ({sorted(map(str, node))}), not one.")
    return node
