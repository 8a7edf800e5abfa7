"""Sharded train steps (data, FSDP, tensor and expert parallel on 8 CPU devices) against the
same steps on one device."""

import contextlib

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from jaxpt import models, nn, sharding, train
from jaxpt.config import preset_config
from jaxpt.errors import ConfigError

STEPS = 3


def small_config(preset: str, model=None, **mesh):
    config = preset_config(preset, "smoke")
    config.model.update(vocab_size=512, block_size=32, **(model or {}))
    # a small lr: Adam turns float noise in near-zero gradients into steps of about lr
    config.train.update(batch_size=8, grad_accum_steps=2, lr=1e-3, warmup_steps=1)
    config.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    config.mesh.update(mesh)
    return config


def batches(config):
    rng = np.random.default_rng(0)
    shape = (STEPS, config.train.batch_size, config.model.block_size + 1)
    return rng.integers(0, config.model.vocab_size, shape, dtype=np.int32)


def run_steps(config, mesh=None):
    """Params and losses after STEPS steps, on ``mesh`` or on one device (mesh=None)."""
    cfg = models.config_from(config.model)
    params = jax.eval_shape(lambda k: models.get(cfg.name).init(k, cfg), jax.random.key(0))
    tx = train.optimizer(config.train, params)
    state = jax.jit(lambda k: train.init_state(k, cfg, tx))(jax.random.key(0))
    step = train.make_train_step(config, tx)
    if mesh is None:
        step = jax.jit(step)
    else:
        _, shardings = train.abstract_state(config, mesh)
        state = jax.device_put(state, shardings)
        batch = sharding.batch_sharding(mesh, config.mesh.rules)
        step = jax.jit(
            step,
            in_shardings=(shardings, batch, batch),
            out_shardings=(shardings, sharding.replicated(mesh)),
        )
    losses = []
    with contextlib.nullcontext() if mesh is None else activations(mesh, config.mesh.rules):
        for tokens in batches(config):
            state, metrics = step(state, tokens[:, :-1], tokens[:, 1:])
            losses.append(float(metrics["loss"]))
    return state, losses


@contextlib.contextmanager
def activations(mesh, rules):
    """The train loop's activation constraints, checking that attention asks for them."""
    asked = []

    def sharding_of(shape, names):
        asked.append(names)
        return NamedSharding(mesh, sharding.spec_for(shape, names, mesh, rules))

    with nn.shard_activations(sharding_of):
        yield
    assert ("batch", None, "q_heads", None) in asked


@pytest.mark.parametrize(
    ("preset", "mesh", "model"),
    [
        ("gqa_glu_rope_gpt", dict(data=2, fsdp=2, tensor=2), {}),
        ("gpt", dict(fsdp=4, tensor=2), {}),
        # training randomness: the same dropout masks and router noise on every mesh
        ("tiny_moe_2", dict(data=2, tensor=2, expert=2), dict(dropout=0.1, router_noise=0.01)),
    ],
)
def test_sharded_steps_equal_one_device(preset, mesh, model):
    config = small_config(preset, model, **mesh)
    device_mesh = sharding.make_mesh(config.mesh)
    _, shardings = train.abstract_state(config, device_mesh)
    specs = {s.spec for s in jax.tree.leaves(shardings.params)}
    for axis, size in mesh.items():  # every mesh axis in use splits some weight
        if size > 1 and axis != "data":
            assert any(axis in jax.tree.leaves(tuple(spec)) for spec in specs), axis
    sharded, sharded_losses = run_steps(config, device_mesh)
    single, single_losses = run_steps(config)
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        jax.device_get(sharded.params),
        jax.device_get(single.params),
    )


def test_a_mesh_that_does_not_fit_the_devices_is_one_sentence():
    config = small_config("gpt", data=3)
    with pytest.raises(ConfigError, match="devices"):
        sharding.make_mesh(config.mesh)
