"""MoE layers against float64 numpy loops: routing, capacity, outputs, losses, Soft MoE."""

import dataclasses
import functools
import importlib.util
import math
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt import models, nn
from jaxpt.errors import ConfigError

from .test_models import adam_losses

ROOT = pathlib.Path(__file__).parent.parent


def moe_config(**overrides):
    """A small model config with every MoE field."""
    fields = dict(
        mixer="moe",
        n_embed=8,
        n_head=2,
        n_kv_head=2,
        n_mlp_hidden=12,
        block_size=16,
        n_layer=1,
        n_experts=4,
        top_k=2,
        load_factor=1.0,
        expert_weight_priority=False,
        moe_expert="glu",
        moe_bias=True,
        moe_router_bias=True,
        activation="silu",
        proj_init="normal",
    )
    return models.ModelConfig(**{**fields, **overrides})


def random_setup(kind, cfg, seed, shape):
    """Params of mixer ``kind`` for ``cfg`` with every array N(0, 1) (nonzero biases, decisive
    routing), and inputs ``(*shape, D)``. numpy draws them: no random kernels to compile."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: models.MIXERS[kind].init(key, cfg), jax.random.key(0))
    normal = lambda size: jnp.asarray(rng.normal(size=size), jnp.float32)
    return jax.tree.map(lambda a: normal(a.shape), shapes), normal((*shape, cfg.n_embed))


def f64(a):
    return np.asarray(a, np.float64)


# ---------------------------------------------------------------- float64 references

ACTS = {"silu": lambda z: z / (1 + np.exp(-z)), "squared_relu": lambda z: np.maximum(z, 0) ** 2}


def np_expert(p: nn.Experts, e: int, x, activation: str):
    """Expert ``e`` of ``p`` on rows ``x`` (N, D), float64."""

    def lin(layer, h):
        y = h @ f64(layer.weight[e])
        return y if layer.bias is None else y + f64(layer.bias[e])

    act = ACTS[activation]
    h = act(lin(p.up, x)) if p.gate is None else act(lin(p.gate, x)) * lin(p.up, x)
    return lin(p.down, h)


def np_softmax(z, axis=-1):
    z = z - z.max(axis, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis, keepdims=True)


def np_capacity(cfg, n_tokens):
    """Slots per expert for a sequence of ``n_tokens`` real tokens."""
    slots = cfg.load_factor * cfg.top_k * max(1, n_tokens / cfg.n_experts)
    return min(math.ceil(round(slots, 9)), n_tokens)


def np_route(probs, valid, top_k, capacity, priority):
    """Loop reference: top-k experts and buffer slots (-1 dropped) per (b, t, k).

    ``capacity``: slots per expert, one int or one per sequence."""
    b_size, t_size, n_experts = probs.shape
    capacity = np.broadcast_to(capacity, (b_size,))
    expert = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
    slot = -np.ones(expert.shape, int)
    for b in range(b_size):
        tokens = range(t_size)
        if priority:  # highest top-1 probability first; all first choices before second ones
            tokens = sorted(tokens, key=lambda t, b=b: -probs[b, t, expert[b, t, 0]])
            order = [(t, k) for k in range(top_k) for t in tokens]
        else:  # token by token
            order = [(t, k) for t in tokens for k in range(top_k)]
        used = [0] * n_experts
        for t, k in order:
            e = expert[b, t, k]
            if valid[b, t] and used[e] < capacity[b]:
                slot[b, t, k] = used[e]
                used[e] += 1
    return expert, slot


def np_moe(p: nn.MoE, x, valid, cfg, noise=1.0):
    """Reference MoE layer: output, load-balance loss, z-loss (float64 loops). ``noise``
    multiplies the router logits, as the original's ``add_noise`` does, after the z-loss."""
    x = f64(x)
    logits = x @ f64(p.router.weight) + (0 if p.router.bias is None else f64(p.router.bias))
    probs = np_softmax(logits * f64(noise))
    n_experts = probs.shape[-1]
    capacity = [np_capacity(cfg, n) for n in valid.sum(1)]  # T counts each row's real tokens
    expert, slot = np_route(probs, valid, cfg.top_k, capacity, cfg.expert_weight_priority)
    y = np.zeros_like(x)
    frac_tokens = np.zeros(n_experts)
    for b, t, k in np.ndindex(expert.shape):
        e = expert[b, t, k]
        frac_tokens[e] += valid[b, t]
        if slot[b, t, k] >= 0:
            y[b, t] += probs[b, t, e] * np_expert(p.experts, e, x[b, t][None], cfg.activation)[0]
    n = valid.sum()
    frac_tokens /= cfg.top_k * n
    load_balance = n_experts * np.sum(frac_tokens * probs[valid].mean(0))
    log_z = np.log(np.exp(logits[valid]).sum(-1))
    return y, load_balance, np.mean(log_z**2)


def setup_moe(cfg, *, seed=0, shape=(2, 12)):
    return random_setup("moe", cfg, seed, shape)


_moe = jax.jit(nn.moe, static_argnames=("spec", "activation"))
_soft_moe = jax.jit(nn.soft_moe, static_argnames="activation")


def run_moe(params, x, cfg, mask=None, key=None):
    """``nn.moe`` compiled once per config and shape."""
    return _moe(params, x, cfg.moe_spec, activation=cfg.activation, mask=mask, key=key)


def run_soft_moe(params, x, cfg, mask=None):
    return _soft_moe(params, x, activation=cfg.activation, mask=mask)


@functools.partial(jax.jit, static_argnames="spec")
def _routing(params, x, mask, spec):
    probs = jax.nn.softmax(nn.linear(params.router, x), axis=-1)
    r = nn.route(
        probs,
        mask,
        top_k=spec.top_k,
        capacity=nn.expert_capacity(spec, x.shape[1]),
        expert_weight_priority=spec.expert_weight_priority,
    )
    return r, probs


def routing_of(params, x, cfg, mask):
    """The routing and router probabilities ``nn.moe`` computes inside."""
    return _routing(params, x, mask, spec=cfg.moe_spec)


LEFT_PADDED = np.array([[False] * 3 + [True] * 9, [True] * 12])  # (2, 12)


# ---------------------------------------------------------------- capacity and routing


def test_capacity_rounds_up_and_is_at_most_t():
    cap = lambda t, lf, k, e: nn.expert_capacity(
        moe_config(load_factor=lf, top_k=k, n_experts=e).moe_spec, t
    )
    assert cap(64, 1.1, 2, 8) == 18  # ceil(1.1 * 2 * 8) = ceil(17.6)
    assert cap(2048, 1.25, 2, 8) == 640
    assert cap(40, 1.1, 2, 8) == 11  # 1.1 * 2 * 5 = 11.000000000000002 in floats
    assert cap(4, 1.1, 2, 8) == 3  # max(1, 4 / 8) = 1
    assert cap(1, 1.1, 2, 8) == 1  # never more slots than tokens


@pytest.mark.parametrize("priority", [False, True])
def test_routing_and_drops_match_loop_reference(priority):
    cfg = moe_config(expert_weight_priority=priority)
    params, x = setup_moe(cfg)
    r, probs = routing_of(params, x, cfg, jnp.asarray(LEFT_PADDED))
    expert, slot = np_route(f64(probs), LEFT_PADDED, 2, 6, priority)
    np.testing.assert_array_equal(r.expert, expert)
    np.testing.assert_array_equal(r.slot, slot)
    np.testing.assert_allclose(r.weight, np.take_along_axis(f64(probs), expert, -1), rtol=1e-6)
    assert (slot[LEFT_PADDED] == -1).any(), "the case should drop some choices"
    assert (slot[~LEFT_PADDED] == -1).all()
    other, _ = np_route(f64(probs), LEFT_PADDED, 2, 6, not priority)
    assert (other != slot).any(), "the two priority orders should differ on this case"


def test_priority_order_by_hand():
    # token 0 prefers e0 (0.7) then e1; token 1 prefers e1 (0.8) then e0; one slot per expert.
    probs = jnp.array([[[0.7, 0.3], [0.2, 0.8]]])
    valid = jnp.ones((1, 2), bool)
    route = lambda priority: (
        nn.route(probs, valid, top_k=2, capacity=1, expert_weight_priority=priority).slot
    )
    # token order: token 0 takes both experts, token 1 finds both full
    np.testing.assert_array_equal(route(False), [[[0, 0], [-1, -1]]])
    # weight priority: first choices go first (token 1 before token 0), second choices find
    # their experts full
    np.testing.assert_array_equal(route(True), [[[0, -1], [0, -1]]])


# ---------------------------------------------------------------- outputs and losses


@pytest.mark.parametrize(
    "overrides",
    [
        dict(expert_weight_priority=False),
        dict(expert_weight_priority=True),
        dict(moe_expert="mlp", activation="squared_relu", moe_bias=False, moe_router_bias=False),
    ],
)
def test_moe_output_and_losses_match_loop_reference(overrides):
    cfg = moe_config(**overrides)
    params, x = setup_moe(cfg, seed=3)
    y, losses = run_moe(params, x, cfg, jnp.asarray(LEFT_PADDED))
    want_y, want_lb, want_z = np_moe(params, x, LEFT_PADDED, cfg)
    np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(losses["load_balance_loss"], want_lb, rtol=1e-5)
    np.testing.assert_allclose(losses["z_loss"], want_z, rtol=1e-5)


def test_router_noise_scales_the_logits_as_the_original_draws_it():
    cfg = moe_config(router_noise=0.5)  # wide enough to change top-k choices
    params, x = setup_moe(cfg, seed=3)
    key = jax.random.key(4)
    noise = jax.random.uniform(key, (*x.shape[:2], cfg.n_experts), jnp.float32, 0.5, 1.5)
    y, losses = run_moe(params, x, cfg, jnp.asarray(LEFT_PADDED), key=key)
    want_y, want_lb, want_z = np_moe(params, x, LEFT_PADDED, cfg, noise=noise)
    np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(losses["load_balance_loss"], want_lb, rtol=1e-5)
    np.testing.assert_allclose(losses["z_loss"], want_z, rtol=1e-5)
    quiet_y, _ = run_moe(params, x, cfg, jnp.asarray(LEFT_PADDED))  # no key: no noise
    np.testing.assert_allclose(quiet_y, np_moe(params, x, LEFT_PADDED, cfg)[0], atol=1e-4)
    assert not np.allclose(quiet_y, y, atol=1e-3)


def test_tiny_moe_2_has_the_originals_gated_squared_relu_experts():
    preset = models.get("tiny_moe_2").default_config()
    assert preset.n_params == 1_061_041_200  # the original's count_params (NNX_API.md)
    ungated = dataclasses.replace(preset, moe_expert="mlp")  # still available
    assert ungated.n_params == preset.n_params - 30 * 8 * 672 * 2048  # no w_gate
    small = dict(n_embed=8, n_head=2, n_kv_head=2, n_mlp_hidden=12, block_size=16, n_layer=1)
    cfg = dataclasses.replace(preset, **small)
    params, x = setup_moe(cfg, seed=6)
    assert params.experts.gate is not None and params.experts.up.bias is None
    y, _ = run_moe(params, x, cfg)
    relu2 = lambda z: np.maximum(z, 0) ** 2
    want = np.zeros(x.shape)  # w_c_proj(relu(w_gate x)^2 * w_c_fc x), expert by expert
    logits = f64(x) @ f64(params.router.weight) + f64(params.router.bias)
    expert, slot = np_route(
        np_softmax(logits), np.ones(x.shape[:2], bool), 2, np_capacity(cfg, 12), False
    )
    for b, t, k in np.ndindex(expert.shape):
        e, h = expert[b, t, k], f64(x[b, t])
        gated = relu2(h @ f64(params.experts.gate.weight[e])) * (
            h @ f64(params.experts.up.weight[e])
        )
        if slot[b, t, k] >= 0:
            want[b, t] += np_softmax(logits[b, t])[e] * gated @ f64(params.experts.down.weight[e])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_all_experts_chosen_is_the_probability_weighted_sum():
    # Combine weights are the raw router probabilities (vmoe, original JaxPT), not
    # renormalised over the top k; with top_k == n_experts they sum to 1.
    cfg = moe_config(top_k=4, load_factor=1.0)  # capacity = T: nothing dropped
    params, x = setup_moe(cfg, seed=5)
    y, _ = run_moe(params, x, cfg)
    xs = f64(x).reshape(-1, 8)
    probs = np_softmax(xs @ f64(params.router.weight) + f64(params.router.bias))
    want = sum(probs[:, e : e + 1] * np_expert(params.experts, e, xs, "silu") for e in range(4))
    np.testing.assert_allclose(y.reshape(-1, 8), want, rtol=1e-4, atol=1e-4)


def test_balanced_router_scores_one():
    cfg = moe_config(top_k=1, n_experts=2)
    params, x = setup_moe(cfg)
    params = eqx.tree_at(lambda p: p.router.weight, params, jnp.zeros((8, 2)))
    params = eqx.tree_at(lambda p: p.router.bias, params, jnp.zeros(2))
    _, losses = run_moe(params, x, cfg)  # uniform probs: lb = 2 * sum(f * 0.5) = 1
    np.testing.assert_allclose(losses["load_balance_loss"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(losses["z_loss"], np.log(2) ** 2, rtol=1e-6)


@pytest.mark.parametrize("priority", [False, True])
def test_padding_takes_no_capacity_and_no_loss(priority):
    cfg = moe_config(expert_weight_priority=priority, load_factor=0.5)
    params, x = setup_moe(cfg, seed=7)
    mask = jnp.asarray(LEFT_PADDED)
    y, losses = run_moe(params, x, cfg, mask)
    other = x.at[0, :3].set(10 * np.random.default_rng(8).normal(size=(3, 8)))
    y2, losses2 = run_moe(params, other, cfg, mask)
    np.testing.assert_array_equal(y[0, :3], 0)
    np.testing.assert_array_equal(y[:, 3:], y2[:, 3:])
    jax.tree.map(np.testing.assert_array_equal, losses, losses2)
    _, unpadded = run_moe(params, x[1:], cfg)  # the losses do not depend on the capacity
    _, row1 = run_moe(params, x, cfg, mask.at[0].set(False))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), unpadded, row1)


@pytest.mark.parametrize("priority", [False, True])
def test_a_padded_sequence_routes_as_it_would_alone(priority):
    cfg = moe_config(expert_weight_priority=priority)
    assert nn.expert_capacity(cfg.moe_spec, 9) != nn.expert_capacity(cfg.moe_spec, 12)  # 5 vs 6
    params, x = setup_moe(cfg, seed=11)
    y, _ = run_moe(params, x, cfg, jnp.asarray(LEFT_PADDED))
    alone, _ = run_moe(params, x[:1, 3:], cfg)
    np.testing.assert_allclose(y[0, 3:], alone[0], rtol=1e-5, atol=1e-6)
    dropped = routing_of(params, x[:1, 3:], cfg, jnp.ones((1, 9), bool))[0].slot == -1
    assert dropped.any(), "the case should drop some choices"


def one_hot_moe(p: nn.MoE, x, cfg, expert, slot):
    """The one-hot formulation (jaxpt before grouped matmuls), for the routing ``expert``,
    ``slot`` (``np_route``'s, held fixed): dispatch and combine tensors ``(B, T, E, C)`` and
    einsums over every expert's whole capacity buffer ``(B, E, C, D)``."""
    logits = nn.linear(p.router, x)
    probs = jax.nn.softmax(logits, axis=-1)
    capacity = np_capacity(cfg, x.shape[1])
    to_expert = jax.nn.one_hot(expert, cfg.n_experts)  # (B, T, k, E)
    to_slot = jax.nn.one_hot(slot, capacity)  # (B, T, k, C), 0 where dropped
    weight = jnp.take_along_axis(probs, jnp.asarray(expert), axis=-1)  # (B, T, k)
    dispatch = jnp.einsum("btke,btkc->btec", to_expert, to_slot)
    combine = jnp.einsum("btke,btkc,btk->btec", to_expert, to_slot, weight)
    buffers = jnp.einsum("btec,btd->becd", dispatch, x)
    return jnp.einsum(
        "btec,becd->btd", combine, nn.experts(p.experts, buffers, activation=cfg.activation)
    )


@pytest.mark.parametrize(
    "overrides",
    [
        dict(expert_weight_priority=True, moe_matmul="ragged"),
        dict(moe_expert="mlp", activation="squared_relu", moe_bias=False, moe_matmul="padded"),
    ],
)
def test_grouped_dispatch_equals_the_one_hot_formulation_with_gradients(overrides):
    cfg = moe_config(load_factor=0.5, **overrides)  # a third of the choices drop
    params, x = setup_moe(cfg, seed=17)
    probs = np_softmax(f64(x) @ f64(params.router.weight) + f64(params.router.bias))
    expert, slot = np_route(probs, LEFT_PADDED, 2, 3, cfg.expert_weight_priority)
    assert (slot[LEFT_PADDED] == -1).any() and (slot == 2).any(), "should fill and drop slots"
    target = jnp.asarray(np.random.default_rng(18).normal(size=x.shape), jnp.float32)
    grouped = lambda p, x: jnp.sum(run_moe(p, x, cfg, jnp.asarray(LEFT_PADDED))[0] * target)
    one_hot = lambda p, x: jnp.sum(one_hot_moe(p, x, cfg, expert, slot) * target)
    got, want = (
        jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x) for f in (grouped, one_hot)
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)
    y, _ = run_moe(params, x, cfg, jnp.asarray(LEFT_PADDED))
    np.testing.assert_allclose(y, np_moe(params, x, LEFT_PADDED, cfg)[0], rtol=1e-4, atol=1e-4)


def test_gradients_reach_router_and_every_expert():
    cfg = moe_config(top_k=2)
    params, x = setup_moe(cfg, shape=(2, 32))
    target = np.random.default_rng(9).normal(size=x.shape)

    def loss(p):
        y, aux = nn.moe(p, x, cfg.moe_spec, activation=cfg.activation, mask=None)
        return jnp.sum(y * target) + aux["load_balance_loss"] + aux["z_loss"]

    grads = jax.jit(jax.grad(loss))(params)
    assert jnp.all(jnp.abs(grads.router.weight).sum(0) > 0)
    assert jnp.all(jnp.abs(grads.router.bias) > 0)
    for layer in (grads.experts.up, grads.experts.gate, grads.experts.down):
        assert jnp.all(jnp.abs(layer.weight).sum((1, 2)) > 0)  # every expert
        assert jnp.all(jnp.abs(layer.bias).sum(1) > 0)


# ---------------------------------------------------------------- Soft MoE


def setup_soft_moe(cfg, seed=0, shape=(2, 12)):
    return random_setup("soft_moe", cfg, seed, shape)


def np_soft_moe(p: nn.SoftMoE, x, valid, cfg):
    """Soft MoE written as plain float64 softmaxes and einsums."""
    x = f64(x)
    b, t, _ = x.shape
    logits = (x @ f64(p.phi.weight)).reshape(b, t, cfg.n_experts, -1)  # (B, T, E, C)
    dispatch = np_softmax(np.where(valid[:, :, None, None], logits, -np.inf), axis=1)
    combine = np_softmax(logits.reshape(b, t, -1)).reshape(logits.shape)
    slots = np.einsum("btec,btd->becd", dispatch, x)
    outs = np.stack(
        [
            [np_expert(p.experts, e, slots[i, e], cfg.activation) for e in range(cfg.n_experts)]
            for i in range(b)
        ]
    )
    y = np.einsum("btec,becd->btd", combine, outs)
    return np.where(valid[..., None], y, 0), dispatch, combine


def test_soft_moe_weights_are_distributions_and_output_matches_einsums():
    cfg = moe_config(block_size=12)  # 3 slots per expert
    params, x = setup_soft_moe(cfg, seed=11)
    y = run_soft_moe(params, x, cfg, jnp.asarray(LEFT_PADDED))
    want, want_dispatch, want_combine = np_soft_moe(params, x, LEFT_PADDED, cfg)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    logits = nn.linear(params.phi, x).reshape(2, 12, 4, 3)
    dispatch, combine = nn.soft_moe_weights(logits, jnp.asarray(LEFT_PADDED))
    np.testing.assert_allclose(dispatch.sum(1), 1.0, rtol=1e-5)  # each slot: over tokens
    np.testing.assert_allclose(combine.sum((2, 3)), 1.0, rtol=1e-5)  # each token: over slots
    np.testing.assert_array_equal(dispatch[0, :3], 0)  # padding is read into no slot
    np.testing.assert_allclose(dispatch, want_dispatch, atol=1e-6)
    np.testing.assert_allclose(combine, want_combine, atol=1e-6)


def test_soft_moe_gradients_reach_phi_and_every_expert():
    cfg = moe_config(block_size=12)
    params, x = setup_soft_moe(cfg)
    soft_moe = functools.partial(nn.soft_moe, activation=cfg.activation, mask=None)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(soft_moe(p, x) ** 2)))(params)
    assert jnp.all(jnp.abs(grads.phi.weight).sum(0) > 0)  # every slot
    for layer in (grads.experts.up, grads.experts.gate, grads.experts.down):
        assert jnp.all(jnp.abs(layer.weight).sum((1, 2)) > 0)


# ---------------------------------------------------------------- causality


def test_token_order_routing_is_causal_even_with_drops():
    cfg = moe_config(load_factor=0.5, expert_weight_priority=False)  # half the choices drop
    params, x = setup_moe(cfg, seed=13, shape=(2, 16))
    changed = x.at[:, 9:].set(np.random.default_rng(14).normal(size=(2, 7, 8)))
    y, _ = run_moe(params, x, cfg)
    y2, _ = run_moe(params, changed, cfg)
    np.testing.assert_array_equal(y[:, :9], y2[:, :9])
    assert not np.allclose(y[:, 9:], y2[:, 9:])
    r, _ = routing_of(params, changed, cfg, jnp.ones((2, 16), bool))
    assert (r.slot[:, :9] == -1).any(), "earlier tokens should lose slots in this case"


def test_weight_priority_lets_a_later_token_take_an_earlier_slot():
    # Two tokens, one expert slot (top-1 of 2 experts); p(e0) = sigmoid(2 * x[0]).
    cfg_for = lambda priority: moe_config(
        n_embed=2, n_experts=2, top_k=1, expert_weight_priority=priority, moe_router_bias=False
    )
    params, _ = setup_moe(cfg_for(True), shape=(1, 2))
    params = eqx.tree_at(lambda p: p.router.weight, params, jnp.array([[1.0, -1.0], [0.0, 0.0]]))
    x = jnp.array([[[1.0, 0.0], [0.5, 0.0]]])  # token 1 is less sure of e0 than token 0
    surer = x.at[0, 1, 0].set(2.0)  # now token 1 is surer, and claims the slot first
    y, _ = run_moe(params, x, cfg_for(True))
    y2, _ = run_moe(params, surer, cfg_for(True))
    assert np.abs(y[0, 0]).sum() > 0
    np.testing.assert_array_equal(y2[0, 0], 0)  # token 0 was dropped because of token 1
    y, _ = run_moe(params, x, cfg_for(False))
    y2, _ = run_moe(params, surer, cfg_for(False))
    np.testing.assert_array_equal(y[0, 0], y2[0, 0])  # token order: token 0 keeps its slot


def test_soft_moe_reads_later_tokens():
    cfg = moe_config(block_size=12)
    params, x = setup_soft_moe(cfg)
    y = run_soft_moe(params, x, cfg)
    y2 = run_soft_moe(params, x.at[:, -1].add(1.0), cfg)
    assert not np.allclose(y[:, 0], y2[:, 0])


def test_presets_declare_their_causality():
    causal = {name: models.get(name).default_config().is_causal for name in models.names()}
    assert causal.pop("tiny_moe") is False  # weight priority
    assert causal.pop("tiny_moe_3") is False  # Soft MoE
    assert all(causal.values())  # tiny_moe_2 (token order), every dense preset and the bigram


# ---------------------------------------------------------------- presets and configs


def load_config(preset: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(preset, ROOT / "configs" / f"{preset}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize(
    "preset, lb, z", [("tiny_moe", 1e-2, 1e-3), ("tiny_moe_2", 1e-2, 5e-4), ("tiny_moe_3", 0, 0)]
)
def test_configs_set_the_original_loss_coefficients(preset, lb, z):
    config = load_config(preset)
    assert config.model.name == preset
    assert (config.train.load_balance_loss_coeff, config.train.z_loss_coeff) == (lb, z)
    smoke = load_config(preset, "smoke").model
    assert (smoke.block_size, smoke.n_experts, smoke.mixer) == (64, 8, config.model.mixer)
    assert models.config_from(smoke).n_experts == 8


def test_smoke_config_training_lowers_the_loss_with_aux_losses():
    config = load_config("tiny_moe", "smoke")
    cfg = dataclasses.replace(models.config_from(config.model), vocab_size=97, block_size=16)
    model = models.get("tiny_moe")
    params = model.init(jax.random.key(0), cfg)
    tokens = jnp.tile(jax.random.randint(jax.random.key(1), (1, 8), 0, 97), (2, 3))[:, :17]

    def loss_fn(params):
        logits, aux = model.apply(params, tokens[:, :-1], cfg)
        return (
            nn.cross_entropy(logits, tokens[:, 1:])
            + config.train.load_balance_loss_coeff * aux["load_balance_loss"]
            + config.train.z_loss_coeff * aux["z_loss"]
        )

    losses = adam_losses(loss_fn, params, steps=6)
    assert losses[-1] < losses[0] - 0.4, losses


def test_expert_weights_carry_the_expert_axis():
    cfg = models.config_from(load_config("tiny_moe_2", "smoke").model)
    shapes = jax.eval_shape(lambda k: models.get("tiny_moe_2").init(k, cfg), jax.random.key(0))
    axes = nn.logical_axes(shapes).blocks[0].mixer
    assert shapes.blocks[0].mixer.experts.up.weight.shape == (2, 8, 96, 384)
    assert tuple(axes.experts.up.weight) == ("layers", "expert", "embed", "mlp")
    assert tuple(axes.experts.down.weight) == ("layers", "expert", "mlp", "embed")
    assert tuple(axes.router.weight) == ("layers", "embed", None)
    assert tuple(axes.router.bias) == ("layers", None)


@pytest.mark.parametrize(
    "name, overrides, words",
    [
        ("tiny_moe", dict(top_k=9), "model.top_k=9 must be an integer from 1 to model.n_experts=8"),
        ("tiny_moe", dict(load_factor=0.0), "model.load_factor=0.0 must be positive"),
        ("tiny_moe_2", dict(moe_expert="swiglu"), "model.moe_expert='swiglu' is not one of"),
        ("tiny_moe_3", dict(block_size=4), "model.block_size=4 is smaller than model.n_experts"),
        ("gpt", dict(mixer="moe,mlp"), "uses 'moe', which needs model.n_experts"),
    ],
)
def test_bad_moe_config_gets_one_clear_sentence(name, overrides, words):
    with pytest.raises(ConfigError, match=words):
        dataclasses.replace(models.get(name).default_config(), **overrides)


@pytest.mark.parametrize("top_k", [1, 2, 3, 19])
def test_a_load_factor_of_zero_slots_is_refused_with_the_least_that_keeps_one(top_k):
    # vmoe's capacity in plain python; T = 1 has the fewest slots (max(1, T / E) = 1)
    slots = lambda lf: math.ceil(round(lf * top_k * 1.0, 9))
    cfg = lambda lf: moe_config(top_k=top_k, n_experts=32, load_factor=lf)
    with pytest.raises(ConfigError, match=r"model.load_factor=1e-12 gives each expert 0 slots"):
        cfg(1e-12)
    with pytest.raises(ConfigError) as refused:
        cfg(1e-11)
    least = float(str(refused.value).rsplit(" ", 1)[-1].rstrip("."))
    assert slots(least) == 1 and slots(math.nextafter(least, 0)) == 0
    assert nn.expert_capacity(cfg(least).moe_spec, 1) == 1
