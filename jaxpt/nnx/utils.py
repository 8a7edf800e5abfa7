"""The original's ``jaxpt.utils``: parameter counts and sharded construction."""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxpt import sharding
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
    fields; a dimension whose mesh axes do not divide it stays replicated.
    """
    rules = sharding.default_rules() if rules is None else rules
    cfg = config.model_config()
    abstract = jax.eval_shape(init_params, jax.random.key(0), cfg)
    shardings = sharding.param_shardings(abstract, mesh, rules)
    make = jax.jit(init_params, static_argnums=1, out_shardings=shardings)
    return Model.from_params(make(rngs.params(), cfg), config, rngs)
