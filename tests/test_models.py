"""Every registry preset: shapes, causality, learning, scan/remat equivalence, validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpt import models, nn
from jaxpt.config import preset_config
from jaxpt.errors import ConfigError

VOCAB = 97


def tiny_config(preset: str, **overrides):
    """The preset's smoke-size model config with a small vocabulary."""
    cfg = preset_config(preset, "smoke").model
    cfg.vocab_size = VOCAB
    cfg.block_size = 16
    cfg.update(overrides)
    return cfg


def forward(name, cfg, params, tokens, **kwargs):
    return jax.jit(functools.partial(models.get(name).apply, cfg=cfg, **kwargs))(params, tokens)


def random_tokens(seed, shape=(2, 16)):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


@pytest.mark.parametrize("name", models.names())
def test_logits_shape_finite_and_causal(name):
    cfg = tiny_config(name)
    params = models.get(name).init(jax.random.key(0), cfg)
    tokens = random_tokens(1)
    logits, aux = forward(name, cfg, params, tokens)
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == jnp.float32
    assert jnp.isfinite(logits).all()
    assert set(aux) == set(models.AUX_KEYS)
    t = 9  # change every token after position t
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 1) % VOCAB)
    logits2, _ = forward(name, cfg, params, changed)
    if promises_causality(cfg):
        np.testing.assert_array_equal(logits[:, : t + 1], logits2[:, : t + 1])
    else:  # the documented leak (weight-priority capacity, Soft MoE): later tokens reach back
        assert not np.allclose(logits[:, : t + 1], logits2[:, : t + 1])
    assert not np.allclose(logits[:, t + 1 :], logits2[:, t + 1 :])


def promises_causality(cfg) -> bool:
    """Every preset is causal except MoE routing that is not (see jaxpt/nn/_moe.py)."""
    return "mixer" not in cfg or models.is_causal(cfg)


@pytest.mark.parametrize("name", models.names())
def test_training_steps_lower_the_loss(name):
    cfg = tiny_config(name)
    model = models.get(name)
    params = model.init(jax.random.key(0), cfg)
    tokens = jnp.tile(random_tokens(2, (1, 8)), (2, 3))[:, :17]  # a repeated sequence

    def loss_fn(params):
        logits, _ = model.apply(params, tokens[:, :-1], cfg)
        return nn.cross_entropy(logits, tokens[:, 1:])

    opt = optax.adam(3e-2)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = opt.init(params)
    losses = []
    for _ in range(10):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.4, losses  # nats


@pytest.mark.parametrize("name", ["gpt", "gqa_glu_rope_gpt", "smollm"])
def test_scanned_layers_equal_unrolled_loop(name):
    cfg = tiny_config(name, n_layer=4)
    params = models.get(name).init(jax.random.key(3), cfg)
    tokens = random_tokens(4)
    scanned, _ = forward(name, cfg, params, tokens)
    unrolled, _ = forward(name, tiny_config(name, n_layer=4, scan_layers=False), params, tokens)
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5)
    by_hand = unrolled_by_hand(params, tokens, cfg)
    np.testing.assert_allclose(scanned, by_hand, atol=1e-5)


def unrolled_by_hand(params, tokens, cfg):
    """The decoder written as a plain loop over layer slices, independent of scan_layers."""
    from jaxpt.models._decoder import block

    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = nn.embed(params.wte, tokens, jnp.float32)
    if params.wpe is not None:
        x = x + nn.embed(params.wpe, positions, jnp.float32)
    (stacked,) = params.blocks
    for i in range(cfg.n_layer):
        layer = jax.tree.map(lambda a, i=i: a[i], stacked)
        x, _, _ = block(layer, x, cfg, cfg.mixer, positions=positions, mask=None)
    x = nn.NORMS[cfg.norm][1](params.ln_f, x, cfg.ln_epsilon)
    return nn.unembed(params.wte, x)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_changes_nothing_but_memory(policy):
    cfg = tiny_config("glu_rope_gpt")
    model = models.get("glu_rope_gpt")
    params = model.init(jax.random.key(5), cfg)
    tokens = random_tokens(6, (2, 17))

    def grads(cfg):
        loss = lambda p: nn.cross_entropy(model.apply(p, tokens[:, :-1], cfg)[0], tokens[:, 1:])
        return jax.jit(jax.grad(loss))(params)

    plain = grads(cfg)
    rematted = grads(tiny_config("glu_rope_gpt", remat_policy=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, rematted)


def test_padding_mask_hides_padded_tokens():
    cfg = tiny_config("gqa_glu_rope_gpt")
    model = models.get("gqa_glu_rope_gpt")
    params = model.init(jax.random.key(7), cfg)
    tokens = random_tokens(8)
    mask = jnp.arange(16)[None, :] < jnp.array([[10], [16]])  # row 0: 6 padding tokens
    logits, _ = forward("gqa_glu_rope_gpt", cfg, params, tokens, mask=mask)
    other_padding = tokens.at[0, 10:].set(0)
    logits2, _ = forward("gqa_glu_rope_gpt", cfg, params, other_padding, mask=mask)
    np.testing.assert_allclose(logits[0, :10], logits2[0, :10], atol=1e-6)
    unpadded, _ = forward("gqa_glu_rope_gpt", cfg, params, tokens[:1, :10])
    np.testing.assert_allclose(logits[0, :10], unpadded[0], atol=1e-5)


def count(name, **overrides):
    cfg = models.get(name).default_config()
    cfg.update(overrides)
    shapes = jax.eval_shape(lambda k: models.get(name).init(k, cfg), jax.random.key(0))
    return sum(leaf.size for leaf in jax.tree.leaves(shapes))


def test_parameter_counts_match_the_published_models():
    assert count("gpt", vocab_size=50257) == 124_439_808  # GPT-2 124M
    assert count("gpt") == 124_475_904  # vocab padded to 50304
    assert count("smollm") == 134_515_008  # SmolLM-135M


def test_bf16_compute_keeps_float32_params_and_logits():
    cfg = tiny_config("gpt", dtype="bfloat16")
    params = models.get("gpt").init(jax.random.key(0), cfg)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    logits, _ = forward("gpt", cfg, params, random_tokens(0))
    assert logits.dtype == jnp.float32 and jnp.isfinite(logits).all()


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(n_embed=100, n_head=3), "model.n_embed=100 is not divisible by model.n_head=3"),
        (dict(n_head=4, n_kv_head=3), "model.n_head=4 is not divisible by model.n_kv_head=3"),
        (dict(activation="swish"), "model.activation='swish' is not one of"),
        (dict(name="gpt5"), "model.name='gpt5' is not one of"),
        (dict(mixer="mlp,moe_x"), "names 'moe_x'"),
        (dict(n_layer=3, mixer="mlp,glu"), "model.n_layer=3 is not a multiple"),
        (dict(remat_policy="sometimes"), "model.remat_policy='sometimes'"),
        (dict(dtype="float8"), "model.dtype='float8' is not one of"),
    ],
)
def test_bad_config_gets_one_clear_sentence(overrides, words):
    cfg = tiny_config("gpt", **overrides)
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        models.get("gpt").init(jax.random.key(0), cfg)


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.name=.nope. is not one of"):
        models.get("nope")
