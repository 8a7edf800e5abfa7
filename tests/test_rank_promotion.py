"""The library under strict rank promotion (``jax.numpy_rank_promotion("raise")``, which many
JAX codebases set): every preset's forward and gradient and a train step of each optimizer lower
to the program they lower to under the default ("allow"); cached decoding and sampling give its
tokens."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt import generate, models, nn, train
from tests.test_models import perturbed, random_tokens, tiny_config
from tests.test_train import tiny_run


def strict_lowers_as_default(jitted, *args, **kwargs) -> None:
    """``jitted`` lowered for ``args`` under rank promotion "raise" (where tracing it would
    raise at an implicit rank promotion) is the program it lowers to under "allow"."""
    with jax.numpy_rank_promotion("raise"):
        strict = jitted.lower(*args, **kwargs).as_text()
    with jax.numpy_rank_promotion("allow"):
        default = jitted.lower(*args, **kwargs).as_text()
    assert strict == default


def strict_equals_default(fn, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)`` under rank promotion "raise" equals it under "allow"."""
    with jax.numpy_rank_promotion("raise"):
        strict = fn(*args, **kwargs)
    with jax.numpy_rank_promotion("allow"):
        default = fn(*args, **kwargs)
    jax.tree.map(np.testing.assert_array_equal, strict, default)


@functools.partial(jax.jit, static_argnames="cfg")
def gradient_and_logits(params, tokens, cfg):
    """The gradient of a padded batch's loss plus its auxiliary losses (the second row's last
    five tokens are padding), and its logits."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    lengths = jnp.array([inputs.shape[1], inputs.shape[1] - 5])
    mask = jnp.arange(inputs.shape[1])[None, :] < lengths[:, None]  # (B, T)

    def loss(params):
        logits, aux = models.get(cfg.name).apply(params, inputs, cfg, mask=mask)
        return nn.cross_entropy(logits, targets, mask) + sum(aux.values()), logits

    return jax.grad(loss, has_aux=True)(params)


# every preset, and the experts the presets do not run: ragged (the presets pad them)
MODELS = [(name, {}) for name in models.names()] + [("tiny_moe_2", dict(moe_matmul="ragged"))]


@pytest.mark.parametrize(("name", "overrides"), MODELS)
def test_every_preset_forward_and_gradient(name, overrides):
    cfg = tiny_config(name, **overrides)
    params = models.get(name).init(jax.random.key(0), cfg)
    strict_lowers_as_default(gradient_and_logits, params, random_tokens(1, (2, 17)), cfg)


@pytest.mark.parametrize(
    ("name", "sampling"),
    [
        ("gqa_glu_rope_gpt", dict(temperature=0.0)),
        ("tiny_moe_2", dict(temperature=0.8, top_k=20, top_p=0.9)),
    ],
    ids=["dense-greedy", "moe-sampled"],
)
def test_cached_generation(name, sampling):
    """Prompts of two lengths, decoded with a KV cache (top-k MoE at a capacity that drops
    nothing is cacheable), stopping at a sequence of two tokens: the same tokens."""
    cfg = tiny_config(name, **({"load_factor": 4.0} if "moe" in name else {}))
    assert cfg.is_cacheable
    params = perturbed(models.get(name).init(jax.random.key(0), cfg), std=0.3)
    strict_equals_default(
        generate,
        params,
        [[5, 17, 3], [42, 7, 7, 1, 90]],
        cfg,
        max_new_tokens=6,
        key=jax.random.key(2),
        stop_sequences=[[7, 1]],
        **sampling,
    )


@pytest.mark.parametrize("optimizer", list(train.OPTIMIZERS))
def test_a_train_step_of_each_optimizer(optimizer):
    """One MoE step (its stacked expert matrices are Muon's and Adafactor's hard case) with
    dropout, router noise and the auxiliary losses on."""
    config, params = tiny_run("tiny_moe_2")
    config = config.copy_and_resolve_references()
    config.train.update(
        optimizer=optimizer, warmup_steps=0, load_balance_loss_coeff=0.01, z_loss_coeff=1e-3
    )
    tx = train.optimizer(config.train, params)
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, config.model.vocab_size)
    step = jax.jit(train.make_train_step(config, tx))
    state = train.start_state(params, tx)
    strict_lowers_as_default(step, state, tokens[:, :-1], tokens[:, 1:])
