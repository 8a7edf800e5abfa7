"""Every registry preset: shapes, causality, learning, scan/remat equivalence, validation;
the typed config and registering a preset."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpt
from jaxpt import hf, models, nn
from jaxpt.config import preset_config
from jaxpt.errors import ConfigError, DataError
from tests.test_nn import equations, kept_for_backward

VOCAB = 97


def tiny_config(preset: str, **overrides):
    """The preset's smoke-size model config with a small vocabulary."""
    cfg = models.config_from(preset_config(preset, "smoke").model)
    return dataclasses.replace(cfg, vocab_size=VOCAB, block_size=16, **overrides)


def forward(name, cfg, params, tokens, **kwargs):
    return jax.jit(functools.partial(models.get(name).apply, cfg=cfg, **kwargs))(params, tokens)


def random_tokens(seed, shape=(2, 16)):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


def perturbed(params, seed=0, std=0.1):
    """``params`` plus N(0, std) noise drawn by numpy: norms and biases off their init values,
    and (std 0.3) logits that depend on the context. At init a tied tiny model's greedy choice
    is the token it was fed, whatever came before."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + rng.normal(0, std, a.shape).astype(a.dtype), params)


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
    return cfg.is_causal


@pytest.mark.parametrize("name", models.names())
def test_training_steps_lower_the_loss(name):
    cfg = tiny_config(name)
    model = models.get(name)
    params = model.init(jax.random.key(0), cfg)
    tokens = jnp.tile(random_tokens(2, (1, 8)), (2, 3))[:, :17]  # a repeated sequence

    def loss_fn(params):
        logits, _ = model.apply(params, tokens[:, :-1], cfg)
        return nn.cross_entropy(logits, tokens[:, 1:])

    losses = adam_losses(loss_fn, params, steps=10)
    assert losses[-1] < losses[0] - 0.4, losses  # nats


def adam_losses(loss_fn, params, *, steps: int) -> list[float]:
    """The losses of ``steps`` jitted Adam steps (lr 3e-2) on ``loss_fn(params)``."""
    opt = optax.adam(3e-2)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = opt.init(params), []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("name", ["gpt", "gqa_glu_rope_gpt", "smollm"])
def test_scanned_layers_equal_unrolled_loop(name):
    cfg = tiny_config(name, n_layer=4, scan_layers=True)
    params = models.get(name).init(jax.random.key(3), cfg)
    tokens = random_tokens(4)
    scanned, _ = forward(name, cfg, params, tokens)
    unrolled, _ = forward(name, tiny_config(name, n_layer=4, scan_layers=False), params, tokens)
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5)
    by_hand = unrolled_by_hand(params, tokens, cfg)
    np.testing.assert_allclose(scanned, by_hand, atol=1e-5)


def unrolled_by_hand(params, tokens, cfg):
    """The decoder written as a plain loop over layer slices, independent of scan_layers."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = nn.embed(params.wte, tokens, jnp.float32)
    if params.wpe is not None:
        x = x + nn.embed(params.wpe, positions, jnp.float32)
    (stacked,) = params.blocks
    for i in range(cfg.n_layer):
        layer = jax.tree.map(lambda a, i=i: a[i], stacked)
        x, _, _ = models.block(layer, x, cfg, cfg.mixer, positions=positions, mask=None)
    x = nn.NORMS[cfg.norm].apply(params.ln_f, x, cfg.ln_epsilon)
    return nn.unembed(params.wte, x)


def test_read_out_weight_gradient_passes_a_barrier_with_the_layers_below():
    """The read-out table's gradient and the activation gradient the layers below take meet
    at one optimization barrier (``nn.weight_gradients_first``); the gradients equal those of
    the plain loop, which has none."""
    cfg = tiny_config("gpt", n_layer=3)
    params = models.get("gpt").init(jax.random.key(7), cfg)
    tokens = random_tokens(8)

    def grad(apply):
        return jax.grad(lambda p: jnp.mean(apply(p) ** 2))

    model_grad = grad(lambda p: models.get("gpt").apply(p, tokens, cfg)[0])
    want = grad(lambda p: unrolled_by_hand(p, tokens, cfg))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), model_grad(params), want)
    assert len(equations(jax.make_jaxpr(model_grad)(params).jaxpr, "optimization_barrier")) == 1


@pytest.mark.parametrize("name,kept", [("gpt", 2), ("glu_rope_gpt", 3)])
def test_scanned_layers_keep_no_activation_intermediates(name, kept):
    """Under ``scan_layers`` each value a layer keeps for the backward is copied into an
    ``(L, B, T, F)`` stack: of the feed-forward's hidden values only the up projections and the
    down projection's input are kept (GELU's tanh form kept four more, SiLU three)."""
    cfg = tiny_config(name, n_layer=2, scan_layers=True, dtype="float32")
    params = models.get(name).init(jax.random.key(0), cfg)
    tokens = random_tokens(1)

    def loss(p):
        return nn.cross_entropy(models.get(name).apply(p, tokens, cfg)[0], tokens)

    stacked_hidden = f"[{cfg.n_layer},{tokens.shape[0]},{tokens.shape[1]},{cfg.n_mlp_hidden}]"
    assert sum(stacked_hidden in line for line in kept_for_backward(loss, params)) == kept


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


def test_more_tokens_than_learned_positions_is_one_sentence_not_nan_logits():
    cfg = tiny_config("gpt")  # block_size 16; the lookup past the table filled NaN
    params = models.get("gpt").init(jax.random.key(0), cfg)
    with pytest.raises(DataError, match=r"^17 tokens per sequence exceed model\.block_size=16"):
        forward("gpt", cfg, params, random_tokens(0, (1, 17)))
    rope = tiny_config("rope_gpt")  # rotary positions have no table to run past
    rope_params = models.get("rope_gpt").init(jax.random.key(0), rope)
    logits, _ = forward("rope_gpt", rope, rope_params, random_tokens(0, (1, 17)))
    assert jnp.isfinite(logits).all()


@pytest.mark.parametrize(
    "mask, positions, words",
    [
        # HF's attention_mask is int 0/1: jax stopped in "mask dtype should be bool"
        (jnp.ones((2, 16), jnp.int32), None, "mask must be a (2, 16) bool array, not int32"),
        (jnp.ones((2, 16)), None, "mask must be a (2, 16) bool array, not float32"),
        (jnp.ones((2, 15), bool), None, "mask must be a (2, 16) bool array, not (2, 15)"),
        (None, jnp.zeros((2, 15), jnp.int32), "positions must be a (2, 16) integer array, not"),
        (None, jnp.zeros((2, 16)), "positions must be a (2, 16) integer array, not float32"),
    ],
)
def test_a_mask_or_positions_unlike_the_tokens_is_one_sentence(mask, positions, words):
    cfg = tiny_config("tiny_moe_2")
    params = models.get("tiny_moe_2").init(jax.random.key(0), cfg)
    with pytest.raises(DataError, match=re.escape(words)):
        forward("tiny_moe_2", cfg, params, random_tokens(0), mask=mask, positions=positions)


def count(name, **overrides):
    cfg = dataclasses.replace(models.get(name).default_config(), **overrides)
    shapes = jax.eval_shape(lambda k: models.get(name).init(k, cfg), jax.random.key(0))
    counted = sum(leaf.size for leaf in jax.tree.leaves(shapes))
    assert cfg.n_params == counted
    return counted


def test_parameter_counts_match_the_published_models():
    assert count("gpt", vocab_size=50257) == 124_439_808  # GPT-2 124M
    assert count("gpt") == 124_475_904  # vocab padded to 50304
    assert count("smollm") == 134_515_008  # SmolLM-135M


def test_presets_follow_the_originals_init():
    """SmolLM scales its residual-out projections by 1/sqrt(2L); Charformer reads out through
    an untied table with a bias and trains with dropout 0.1 (NNX_API.md, section 4)."""
    cfg = tiny_config("smollm", n_layer=4)
    block = jax.jit(models.get("smollm").init, static_argnums=1)(jax.random.key(0), cfg).blocks[0]
    for out_projection in (block.attn.o.weight, block.mixer.down.weight):
        np.testing.assert_allclose(np.std(out_projection), 0.02 / np.sqrt(8), rtol=0.05)
    np.testing.assert_allclose(np.std(block.attn.q.weight), 0.02, rtol=0.05)
    char = models.get("charformer").default_config()
    shapes = jax.eval_shape(lambda k: models.get("charformer").init(k, char), jax.random.key(0))
    assert (shapes.lm_head.weight.shape, shapes.lm_head.bias.shape) == ((256, 960), (256,))
    assert char.dropout == 0.1


def test_flops_per_token_is_6n_plus_attention():
    gpt = models.get("gpt").default_config()  # nanoGPT's estimate for GPT-2 124M at T = 1024
    assert gpt.flops_per_token == 6 * 124_475_904 + 12 * 12 * 768 * 1024
    bigram = models.get("bigram").default_config()
    assert bigram.flops_per_token == 6 * 256 and bigram.n_active_params == bigram.n_params == 256**2


@pytest.mark.parametrize(
    "name, experts_per_token",
    [
        ("tiny_moe", lambda cfg: cfg.top_k),
        ("tiny_moe_2", lambda cfg: cfg.top_k),
        # Soft MoE: block_size // E slots per expert, each slot one expert pass, T tokens
        (
            "tiny_moe_3",
            lambda cfg: cfg.n_experts * (cfg.block_size // cfg.n_experts) / cfg.block_size,
        ),
        ("gpt", None),
    ],
)
def test_mfu_counts_the_experts_a_token_uses(name, experts_per_token):
    cfg = models.get(name).default_config()
    shapes = jax.eval_shape(lambda: models.get(name).init(jax.random.key(0), cfg))
    total = skipped = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):  # (E, ...) expert arrays
        total += leaf.size
        if ".experts." in jax.tree_util.keystr(path):
            assert leaf.shape[1] == cfg.n_experts  # (layers, E, ...)
            skipped += leaf.size * (1 - experts_per_token(cfg) / cfg.n_experts)
    assert cfg.n_params == total
    assert cfg.n_active_params == round(total - skipped)
    assert (skipped > 0) == (experts_per_token is not None)


def multiply_adds_per_token(cfg) -> float:
    """A forward pass's multiply-adds per token, matmul by matmul from the config's shapes:
    attention's projections (K key/value heads) and its scores and weighted sum over T
    positions, each mixer's (a top-k router and ``top_k`` experts; Soft MoE's slot logits, one
    expert per slot, dispatch and combine over its S slots), the read-out."""
    d, f, t = cfg.n_embed, cfg.n_mlp_hidden, cfg.block_size
    kv = cfg.n_kv_head * cfg.head_dim
    expert = (3 if cfg.moe_expert == "glu" else 2) * d * f
    slots = None if cfg.n_experts is None else cfg.n_experts * (t // cfg.n_experts)
    mixer = {
        "mlp": lambda: 2 * d * f,
        "glu": lambda: 3 * d * f,
        "moe": lambda: d * cfg.n_experts + cfg.top_k * expert,
        "soft_moe": lambda: d * slots + expert * slots / t + 2 * slots * d,
    }
    layer = lambda kind: 2 * d * d + 2 * d * kv + 2 * t * d + mixer[kind]()
    return cfg.repeats * sum(layer(kind) for kind in cfg.mixer_pattern) + cfg.vocab_size * d


@pytest.mark.parametrize("name", [n for n in models.names() if n != "bigram"])
def test_flops_per_token_counts_every_matmul(name):
    # 2 FLOPs a multiply-add, 3 passes (forward, and backward for inputs and weights); what
    # 6 N counts beyond the matmuls (position table, biases, norms) is under 1%
    cfg = models.get(name).default_config()
    np.testing.assert_allclose(cfg.flops_per_token, 6 * multiply_adds_per_token(cfg), rtol=0.01)


def test_bf16_compute_keeps_float32_params_and_logits():
    cfg = tiny_config("gpt", dtype="bfloat16")
    params = models.get("gpt").init(jax.random.key(0), cfg)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    logits, _ = forward("gpt", cfg, params, random_tokens(0))
    assert logits.dtype == jnp.float32 and jnp.isfinite(logits).all()


def test_float16_compute_runs_on_a_cpu():
    """float16 compute on a CPU stopped in XLA's "The precision 'F16_F16_F32' is not supported
    by dot_general on CPU" (attention's scores) in apply and in cached decoding; it now runs
    there, its logits those of float32 compute to float16 rounding."""
    cfg = tiny_config("gpt", dtype="float16")
    model = models.get("gpt")
    params = perturbed(model.init(jax.random.key(0), cfg))
    tokens = random_tokens(0)
    want, _ = forward("gpt", dataclasses.replace(cfg, dtype="float32"), params, tokens)
    got, _ = forward("gpt", cfg, params, tokens)
    decode = jax.jit(functools.partial(model.decode, cfg=cfg, at=None))
    decoded, _ = decode(params, tokens, cache=model.init_cache(2, 16, cfg))
    for logits in (got, decoded):
        np.testing.assert_allclose(logits, want, atol=2e-2 * float(jnp.abs(want).max()))


def test_dropout_and_router_noise_act_only_with_a_key():
    """A key (training) draws dropout and router noise, the same for the same key; without one
    (evaluation, generation) the model is the one without dropout or noise."""
    cfg = tiny_config("tiny_moe_2", n_layer=1, dropout=0.1, router_noise=0.01)
    plain = dataclasses.replace(cfg, dropout=0.0, router_noise=0.0)
    noise_only = dataclasses.replace(cfg, dropout=0.0)
    params = models.get(cfg.name).init(jax.random.key(0), cfg)
    tokens = random_tokens(3)

    @functools.partial(jax.jit, static_argnames="cfg")
    def loss(cfg, key):
        logits, aux = models.get(cfg.name).apply(params, tokens[:, :-1], cfg, key=key)
        return {"ce": nn.cross_entropy(logits, tokens[:, 1:]), **aux}

    evaluated = loss(cfg, None)
    assert jax.tree.map(float, evaluated) == jax.tree.map(float, loss(plain, None))
    trained = loss(cfg, jax.random.key(1))
    assert jax.tree.map(float, trained) == jax.tree.map(float, loss(cfg, jax.random.key(1)))
    assert trained["ce"] != evaluated["ce"]
    assert loss(cfg, jax.random.key(2))["ce"] != trained["ce"]
    noisy = loss(noise_only, jax.random.key(1))  # the noise alone moves the routing
    assert noisy["z_loss"] == evaluated["z_loss"]  # the z-loss reads the logits before it
    assert noisy["load_balance_loss"] != evaluated["load_balance_loss"]


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
        # names in jax.checkpoint_policies that are no policy failed inside the first trace
        (dict(remat_policy="save_only_these_names"), "remat_policy='save_only_these_names' is not"),
        (dict(remat_policy="__doc__"), "model.remat_policy='__doc__' is not one of"),
        (dict(dtype="float8"), "model.dtype='float8' is not one of"),
        (dict(n_layer="4"), "model.n_layer='4' must be an integer."),
        (dict(qk_norm=1), "model.qk_norm=1 must be True or False."),
        (dict(n_layers=4), "model.n_layers is not a ModelConfig field: did you mean n_layer"),
        (dict(dropout=1.0), "model.dropout=1.0"),
        (dict(router_noise=0.01), "model.router_noise=0.01 needs a top-k router"),
        # accepted and never read: only a top-k 'moe' layer runs its experts ragged
        (dict(moe_matmul="ragged"), "model.moe_matmul='ragged' needs a top-k router"),
        (dict(lm_head_bias=True), "model.lm_head_bias=True needs an untied read-out"),
        # jax's XLA attention stopped in "The precision 'F16_F16_F32' is not supported"
        (dict(sdpa_implementation="xla", dtype="float16"), "with model.dtype='float16' needs"),
    ],
)
def test_bad_config_gets_one_clear_sentence(overrides, words):
    section = {**tiny_config("gpt").to_dict(), **overrides}  # a run config's model section
    with pytest.raises(ConfigError, match=re.escape(words)):
        models.config_from(section)


@pytest.mark.parametrize(
    "capability, n_embed, n_head, widest",
    [("9.0", 48, 4, 256), ("9.0", 264, 1, 256), ("8.0", 192, 1, 128)],
    ids=["width-12", "width-264-hopper", "width-192-ampere"],
)
def test_cudnn_attention_on_a_head_width_cudnn_refuses_is_one_sentence(
    capability, n_embed, n_head, widest, monkeypatch
):
    # JAX's cuDNN flash attention refused them with a NotImplementedError from inside a trace
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    gpu = type("Gpu", (), {"compute_capability": capability})()
    monkeypatch.setattr(jax, "devices", lambda *a: [gpu])
    cudnn = dict(sdpa_implementation="cudnn", dtype="bfloat16", n_mlp_hidden=64)
    with pytest.raises(ConfigError) as refused:
        models.ModelConfig(n_embed=n_embed, n_head=n_head, n_kv_head=n_head, **cudnn)
    assert str(refused.value) == (
        f"model.sdpa_implementation='cudnn' needs a head width (n_embed // n_head = "
        f"{n_embed // n_head}) that is a multiple of 8 and at most {widest} on this GPU; use "
        "'auto' or 'xla'."
    )
    models.ModelConfig(n_embed=128, n_head=1, n_kv_head=1, **cudnn)  # 128 wide: cuDNN runs it


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.name=.nope. is not one of"):
        models.get("nope")


def test_config_is_validated_when_built_and_converts_both_ways():
    cfg = tiny_config("tiny_moe")
    with pytest.raises(ConfigError, match=r"model\.n_head=4 is not divisible by model\.n_kv"):
        dataclasses.replace(cfg, n_head=4, n_kv_head=3)
    with pytest.raises(ConfigError, match=r"model\.top_k=9 must be an integer from 1"):
        dataclasses.replace(cfg, top_k=9)
    assert models.config_from(cfg.to_dict()) == cfg
    assert models.ModelConfig.from_dict(cfg.to_dict()) == cfg
    dense = tiny_config("gpt")
    assert "n_experts" not in dense.to_dict()  # None fields: a run config cannot override them
    assert models.config_from({"name": "smollm"}) == models.get("smollm").default_config()
    with pytest.raises(ConfigError, match=r"model\.init_from is not a ModelConfig field"):
        models.config_from({**dense.to_dict(), "init_from": "hf/gpt2"})  # a run setting
    with pytest.raises(ConfigError, match="takes a ModelConfig, not a ConfigDict"):
        models.get("gpt").init(jax.random.key(0), preset_config("gpt", "smoke").model)


def test_a_changed_config_is_a_new_config_never_a_stale_trace():
    cfg = tiny_config("gpt")
    model = models.get("gpt")
    params = model.init(jax.random.key(0), cfg)
    tokens = random_tokens(0)
    assert jax.jit(functools.partial(model.apply, cfg=cfg))(params, tokens)[0].dtype == jnp.float32
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.logits_dtype = "bfloat16"  # a traced function can never hold a stale copy
    bf16 = dataclasses.replace(cfg, logits_dtype="bfloat16")
    logits, _ = jax.jit(functools.partial(model.apply, cfg=bf16))(params, tokens)
    assert logits.dtype == jnp.bfloat16
    static = jax.jit(model.apply, static_argnames="cfg")  # hashable: a static argument
    assert static(params, tokens, cfg=cfg)[0].dtype == jnp.float32
    assert static(params, tokens, cfg=bf16)[0].dtype == jnp.bfloat16
    back = dataclasses.replace(bf16, logits_dtype="float32")
    assert back == cfg and hash(back) == hash(cfg)
    assert static(params, tokens, cfg=back)[0].dtype == jnp.float32


def test_profiles_name_the_layers():
    cfg = tiny_config("tiny_moe", n_layer=2)  # one MoE and one GLU layer
    model = models.get("tiny_moe")
    params = jax.eval_shape(lambda k: model.init(k, cfg), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    lowered = jax.jit(functools.partial(model.apply, cfg=cfg)).lower(params, tokens)
    op_names = re.findall(r'loc\("(jit\(apply\)/[^"]*)"', lowered.as_text(debug_info=True))
    scopes = {scope for name in op_names for scope in name.split("/")[1:-1]}
    assert {"embed", "block", "attention", "moe", "experts", "glu", "unembed"} <= scopes


@pytest.fixture
def registered():
    """A preset research code adds: a small Llama-style decoder, registered for one test."""
    small = dataclasses.replace(
        models.get("smollm").default_config(),
        vocab_size=VOCAB,
        block_size=16,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embed=32,
        n_mlp_hidden=48,
        dtype="float32",
    )
    model = models.register("test_small_llama", small, summary="A two-layer SmolLM.")
    yield model
    models.unregister("test_small_llama")


def test_a_registered_preset_inits_applies_generates_and_exports(registered, tmp_path):
    assert models.get("test_small_llama") is registered
    cfg = registered.default_config()
    assert cfg.name == "test_small_llama" and cfg.n_layer == 2
    run_model = preset_config("test_small_llama", None).model  # what launch.py's config holds
    assert models.config_from(run_model) == cfg
    # perturbed: at init a tied model's greedy choice repeats the token it was fed
    params = perturbed(registered.init(jax.random.key(0), cfg), std=0.3)
    apply = jax.jit(functools.partial(registered.apply, cfg=cfg))
    prompts = [[5, 17, 3], [42, 7]]
    out = jaxpt.generate(params, prompts, cfg, max_new_tokens=3, temperature=0)
    for prompt, completion in zip(prompts, out.completions(), strict=True):
        tokens = list(prompt)
        for _ in range(3):
            tokens.append(int(jnp.argmax(apply(params, jnp.asarray([tokens]))[0][0, -1])))
        assert completion == tokens[len(prompt) :]
    assert any(len(set(tokens)) > 1 for tokens in out.completions())  # not one token repeated
    hf.save_pretrained(params, cfg, tmp_path)
    back = hf.from_pretrained(tmp_path)
    assert (back.config.n_layer, back.config.n_kv_head, back.config.vocab_size) == (2, 2, VOCAB)
    jax.tree.map(np.testing.assert_array_equal, back.params, params)
    with pytest.raises(ConfigError, match="already registered"):
        models.register("test_small_llama", cfg)
