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


def small_config(preset: str, **mesh):
    config = preset_config(preset, "smoke")
    config.model.update(vocab_size=512, block_size=32)
    # a small lr: Adam turns float noise in near-zero gradients into steps of about lr
    config.train.update(batch_size=8, grad_accum_steps=2, lr=1e-3, warmup_steps=1)
    config.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    config.mesh.update(mesh)
    return config


def batches(config):
    rng = np.random.default_rng(0)
    shape = (STEPS, config.train.batch_size, config.model.block_size + 1)
    return rng.integers(0, config.model.vocab_size, shape, dtype=np.int32)


def initial_state_and_step(config, mesh=None):
    """The initial train state and the jitted train step, on ``mesh`` or on one device."""
    cfg = models.config_from(config.model)
    params = jax.eval_shape(lambda k: models.get(cfg.name).init(k, cfg), jax.random.key(0))
    tx = train.optimizer(config.train, params)
    state = jax.jit(lambda k: train.init_state(k, cfg, tx))(jax.random.key(0))
    step = train.make_train_step(config, tx)
    if mesh is None:
        return state, jax.jit(step)
    _, shardings = train.abstract_state(config, mesh)
    batch = sharding.batch_sharding(mesh, config.mesh.rules)
    step = jax.jit(
        step,
        in_shardings=(shardings, batch, batch),
        out_shardings=(shardings, sharding.replicated(mesh)),
    )
    return jax.device_put(state, shardings), step


def run_steps(config, mesh=None):
    """Params and losses after STEPS steps, on ``mesh`` or on one device (mesh=None)."""
    state, step = initial_state_and_step(config, mesh)
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
    ("preset", "mesh"),
    [
        ("gqa_glu_rope_gpt", dict(data=2, fsdp=2, tensor=2)),
        ("gpt", dict(fsdp=4, tensor=2)),
        ("tiny_moe_2", dict(data=2, tensor=2, expert=2)),
    ],
)
def test_sharded_steps_equal_one_device(preset, mesh):
    config = small_config(preset, **mesh)
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


def test_expert_parallel_moe_moves_tokens_by_all_to_all_and_equals_one_device(capfd):
    config = small_config("tiny_moe", data=2, tensor=2, expert=2)  # GLU experts with biases
    config.train.batch_size = 16  # micro-batches of 8: one sequence per device
    mesh = sharding.make_mesh(config.mesh)
    state, step = initial_state_and_step(config, mesh)
    tokens = batches(config)
    with activations(mesh, config.mesh.rules):
        step = step.lower(state, tokens[0, :, :-1], tokens[0, :, 1:]).compile()
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    hlo = step.as_text()
    assert "all-to-all(" in hlo  # tokens go to their experts' devices and back
    assert "all-gather(" not in hlo and "collective-permute(" not in hlo  # nothing else moves
    losses = []
    for batch in tokens:
        state, metrics = step(state, batch[:, :-1], batch[:, 1:])
        losses.append(float(metrics["loss"]))
    single, single_losses = run_steps(config)
    np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        jax.device_get(state.params),
        jax.device_get(single.params),
    )


def test_ragged_experts_split_over_the_mesh_are_one_sentence():
    config = small_config("tiny_moe", expert=8)
    config.model.moe_matmul = "ragged"
    cfg = models.config_from(config.model)
    model = models.get(cfg.name)
    params = jax.eval_shape(lambda k: model.init(k, cfg), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((8, cfg.block_size), np.int32)
    mesh = sharding.make_mesh(config.mesh)
    with (
        sharding.activation_sharding(mesh, config.mesh.rules),
        pytest.raises(ConfigError, match="moe_matmul='ragged' cannot split the experts"),
    ):
        jax.eval_shape(lambda p, t: model.apply(p, t, cfg), params, tokens)


def test_a_mesh_that_does_not_fit_the_devices_is_one_sentence():
    config = small_config("gpt", data=3)
    with pytest.raises(ConfigError, match="devices"):
        sharding.make_mesh(config.mesh)
