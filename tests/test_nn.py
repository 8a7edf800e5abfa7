"""Layers against float64 numpy references (both ways of ``kernels`` for the loss; the
kernels themselves: test_kernels.py)."""

import contextlib
import functools
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jaxpt import nn


def numpy_attention(q, k, v, valid=None, keep=None):
    """float64 causal attention; query head h reads kv head h // (H // K). ``keep``:
    optional ``(B, H, T, S)`` dropout scale of each attention probability."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, dh = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            scores = q[bi, :, hi] @ k[bi, :, hi // group].T / np.sqrt(dh)  # (T, S)
            allowed = np.tril(np.ones((t, t), bool))
            if valid is not None:
                allowed &= valid[bi][None, :]
            scores = np.where(allowed, scores, -np.inf)
            with np.errstate(invalid="ignore"):  # rows with no visible key become NaN
                probs = np.exp(scores - scores.max(-1, keepdims=True))
                probs /= probs.sum(-1, keepdims=True)
            if keep is not None:
                probs = probs * keep[bi, hi]
            out[bi, :, hi] = probs @ v[bi, :, hi // group]
    return out


def random_qkv(h, k, *, b=2, t=7, dh=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(keys[0], (b, t, h, dh)),
        jax.random.normal(keys[1], (b, t, k, dh)),
        jax.random.normal(keys[2], (b, t, k, dh)),
    )


@pytest.mark.parametrize("impl", ["einsum", "xla", "auto"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_matches_float64_numpy(impl, heads, kv_heads, padded):
    q, k, v = random_qkv(heads, kv_heads)
    valid = None
    mask = None
    if padded:  # right padding in row 0, left padding in row 1
        valid = np.array([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]], bool)
        positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
        mask = nn.causal_mask(positions, positions, jnp.asarray(valid))
    got = nn.attend(q, k, v, mask=mask, implementation=impl)
    want = numpy_attention(q, k, v, valid)
    if padded:  # outputs at padded queries are undefined; compare real tokens
        got, want = np.asarray(got)[valid], want[valid]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_float16_attention_compiles_off_a_gpu(padded):
    """jax.nn.dot_product_attention computes float16 scores with an F16_F16_F32 matmul that
    XLA:CPU does not compile; its fallback catches that eagerly only, so a jitted "auto" (a
    model's apply, its decode with a mask) stopped in "The precision 'F16_F16_F32' is not
    supported by dot_general on CPU"."""
    q, k, v = (a.astype(jnp.float16) for a in random_qkv(4, 2))
    valid = np.array([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]], bool) if padded else None
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    mask = nn.causal_mask(positions, positions, jnp.asarray(valid)) if padded else None
    got = jax.jit(functools.partial(nn.attend, implementation="auto"))(q, k, v, mask=mask)
    want = numpy_attention(q, k, v, valid)
    if padded:
        got, want = np.asarray(got)[valid], want[valid]
    assert got.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=5e-3, rtol=5e-3)


def test_dropout_zeroes_at_the_rate_and_keeps_the_mean():
    x = jnp.ones((20_000,))
    dropped = nn.dropout(x, 0.1, jax.random.key(0))
    np.testing.assert_allclose(np.unique(np.asarray(dropped)), [0.0, 1 / 0.9], rtol=1e-6)
    assert abs(float((dropped == 0).mean()) - 0.1) < 0.01
    assert nn.dropout(x, 0.1, None) is x and nn.dropout(x, 0.0, jax.random.key(0)) is x


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_bfloat16_dropout_scales_kept_values_by_exactly_one_over_keep(rate):
    # 1 - rate rounded to bfloat16 first (0.9 -> 0.8984) scaled every kept value 0.18% more
    x = jax.random.normal(jax.random.key(0), (100_000,)).astype(jnp.bfloat16)
    dropped = nn.dropout(x, rate, jax.random.key(1))
    assert dropped.dtype == jnp.bfloat16
    kept = np.asarray(dropped != 0)
    scale = np.float64(dropped)[kept] / np.float64(x)[kept]  # float64 reference: 1 / (1 - rate)
    np.testing.assert_allclose(scale, 1 / (1 - rate), rtol=2**-8)  # each rounded once
    np.testing.assert_allclose(scale.mean(), 1 / (1 - rate), rtol=2e-4)  # and without bias


def test_attention_probability_dropout_matches_numpy():
    q, k, v = random_qkv(4, 2)  # (B, T, H, Dh), G = 2
    key = jax.random.key(3)
    got = nn.attend(q, k, v, mask=None, implementation="xla", dropout_rate=0.25, key=key)
    kept = jax.random.bernoulli(key, 0.75, (2, 2, 2, 7, 7))  # (B, K, G, T, S): head = K * G + g
    keep = np.asarray(kept, np.float64).reshape(2, 4, 7, 7) / 0.75
    np.testing.assert_allclose(got, numpy_attention(q, k, v, keep=keep), atol=1e-5)


def test_read_out_adds_its_bias():
    key_w, key_b, key_x = jax.random.split(jax.random.key(0), 3)
    p = nn.init_read_out(key_w, 11, 8, axes=("vocab", "embed"), std=1.0, dtype=jnp.float32)
    p = nn.ReadOut(p.weight, jax.random.normal(key_b, (11,)), p.axes)
    x = jax.random.normal(key_x, (2, 3, 8))
    want = np.asarray(x, np.float64) @ np.asarray(p.weight, np.float64).T + np.asarray(p.bias)
    np.testing.assert_allclose(nn.read_out(p, x), want, rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    q, k, v = random_qkv(6, 2, seed=1)
    gqa = nn.attend(q, k, v, mask=None, implementation="einsum")
    mha = nn.attend(
        q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), mask=None, implementation="einsum"
    )
    np.testing.assert_allclose(gqa, mha, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    q, k, _ = random_qkv(2, 2, b=1, t=1, dh=16, seed=2)

    def score(m, n):
        rot = lambda x, pos: nn.apply_rope(x, *nn.rope_angles(jnp.array([[pos]]), 16, 10000.0))
        return jnp.sum(rot(q, m) * rot(k, n), axis=-1)

    np.testing.assert_allclose(score(5, 2), score(105, 102), atol=1e-4)
    np.testing.assert_allclose(score(0, 0), jnp.sum(q * k, axis=-1), atol=1e-5)
    assert not np.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_rope_matches_numpy_rotate_half():
    x = np.random.default_rng(0).normal(size=(1, 3, 1, 8))
    pos = np.array([[0, 1, 7]])
    inv = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    ang = pos[..., None] * inv  # (1, 3, 4)
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)
    rotate_half = np.concatenate([-x[..., 4:], x[..., :4]], -1)
    want = x * cos[:, :, None] + rotate_half * sin[:, :, None]
    got = nn.apply_rope(jnp.asarray(x, jnp.float32), *nn.rope_angles(jnp.asarray(pos), 8, 1e4))
    np.testing.assert_allclose(got, want, atol=1e-5)


def randomised(params, seed=0):
    """``params`` with every array drawn N(0, 1) by numpy (nonzero biases and norm scales)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)


def numpy_rms_norm(x, scale, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def numpy_rope(x, positions, base):
    """float64 rotate-half rotation of ``(B, T, N, Dh)`` by ``(B, T)`` positions: pairs
    ``(i, i + Dh/2)`` turn by ``position * base ** (-2i / Dh)``."""
    half = x.shape[-1] // 2
    angles = positions[..., None, None] * base ** (-np.arange(half) * 2 / x.shape[-1])
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate(
        [x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)],
        -1,
    )


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_layer_matches_float64_numpy(qk_norm):
    """The whole layer: biased projections, GQA (6 query / 2 KV heads), QK-norm before rotary
    positions (offset, base 500), causal attention and the output projection."""
    b, t, d = 2, 7, 12
    spec = nn.AttentionSpec(6, 2, 4, qk_norm=qk_norm, norm_eps=1e-5, rope_base=500.0)
    init = functools.partial(nn.init_attention, bias=True, std=1.0, out_std=1.0, dtype=jnp.float32)
    p = randomised(jax.eval_shape(lambda key: init(key, d, spec), jax.random.key(0)))
    x = np.random.default_rng(1).normal(size=(b, t, d))
    positions = np.broadcast_to(3 + np.arange(t), (b, t))  # as after a cached prefix
    got = nn.attention(
        p, jnp.asarray(x, jnp.float32), spec, positions=jnp.asarray(positions), mask=None
    )

    def project(layer, heads):
        y = x @ np.asarray(layer.weight, np.float64) + np.asarray(layer.bias, np.float64)
        return y.reshape(b, t, heads, 4)

    q, k, v = project(p.q, 6), project(p.k, 2), project(p.v, 2)
    if qk_norm:
        q = numpy_rms_norm(q, np.asarray(p.q_norm.scale, np.float64), 1e-5)
        k = numpy_rms_norm(k, np.asarray(p.k_norm.scale, np.float64), 1e-5)
    q, k = numpy_rope(q, positions, 500.0), numpy_rope(k, positions, 500.0)
    y = numpy_attention(q, k, v).reshape(b, t, 24)
    want = y @ np.asarray(p.o.weight, np.float64) + np.asarray(p.o.bias, np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("activation", ["gelu_tanh", "silu", "sigmoid", "squared_relu"])
def test_mlp_and_glu_match_float64_numpy(activation):
    """``proj(act(fc(x)))`` and ``down(act(gate(x)) * up(x))``, biased."""
    act, d, f = FLOAT64_ACTIVATIONS[activation], 6, 10
    x = np.random.default_rng(2).normal(size=(2, 3, d))
    lin = lambda layer, h: h @ np.asarray(layer.weight, np.float64) + np.asarray(layer.bias)
    sizes = dict(bias=True, std=1.0, out_std=1.0, dtype=jnp.float32)
    for init, apply, want in [
        (nn.init_mlp, nn.mlp, lambda p: lin(p.proj, act(lin(p.fc, x)))),
        (nn.init_glu, nn.glu, lambda p: lin(p.down, act(lin(p.gate, x)) * lin(p.up, x))),
    ]:
        p = randomised(
            jax.eval_shape(lambda key, init=init: init(key, d, f, **sizes), jax.random.key(0))
        )
        got = apply(p, jnp.asarray(x, jnp.float32), activation=activation)
        np.testing.assert_allclose(got, want(p), rtol=1e-4, atol=1e-4, err_msg=apply.__name__)


def test_norms_match_numpy():
    x = np.random.default_rng(1).normal(size=(2, 3, 8)) * 3 + 1
    ln = nn.LayerNorm(jnp.linspace(0.5, 2, 8), jnp.linspace(-1, 1, 8))
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    want = (x - mean) / np.sqrt(var + 1e-5) * np.linspace(0.5, 2, 8) + np.linspace(-1, 1, 8)
    np.testing.assert_allclose(
        nn.layer_norm(ln, jnp.asarray(x, jnp.float32), 1e-5), want, atol=1e-5
    )
    rms = nn.RMSNorm(jnp.linspace(0.5, 2, 8))
    want = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * np.linspace(0.5, 2, 8)
    np.testing.assert_allclose(nn.rms_norm(rms, jnp.asarray(x, jnp.float32), 1e-6), want, atol=1e-5)


def numpy_nll(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(nll, softmax - one_hot)`` of ``(..., V)`` logits and ``(...)`` targets."""
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    one_hot = np.eye(logits.shape[-1])[targets]
    return -(logp * one_hot).sum(-1), np.exp(logp) - one_hot


@pytest.mark.parametrize("kernels", ["xla", "pallas"])
def test_cross_entropy_matches_numpy(kernels):
    rng = np.random.default_rng(2)
    logits, targets = rng.normal(size=(2, 5, 11)), rng.integers(0, 11, size=(2, 5))
    nll, _ = numpy_nll(logits, targets)
    loss = functools.partial(nn.cross_entropy, kernels=kernels)
    got = loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
    np.testing.assert_allclose(got, nll.mean(), rtol=1e-5)
    mask = rng.random((2, 5)) > 0.3
    got = loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), mask)
    np.testing.assert_allclose(got, nll[mask].mean(), rtol=1e-5)


FLOAT64_ACTIVATIONS = {
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2))),
    "relu": lambda x: np.maximum(x, 0),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "squared_relu": lambda x: np.maximum(x, 0) ** 2,
}


def test_activations_match_definitions():
    assert set(FLOAT64_ACTIVATIONS) == set(nn.ACTIVATIONS)
    x = np.linspace(-3, 3, 13)
    for name, act in FLOAT64_ACTIVATIONS.items():
        got = nn.ACTIVATIONS[name](jnp.asarray(x, jnp.float32))
        np.testing.assert_allclose(got, act(x), atol=1e-6, err_msg=name)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("name", sorted(nn.ACTIVATIONS))
def test_activation_gradients_match_float64_and_keep_only_the_inputs(name, gated):
    """``nn.activate``'s gradients against float64 central differences, and its backward keeps
    nothing but its inputs (the activation's intermediates are recomputed)."""
    rng = np.random.default_rng(0)
    x = np.linspace(-3.05, 3.05, 24).reshape(2, 3, 4)  # 0, the kink of relu, is not a point
    up = rng.normal(size=x.shape) if gated else None
    w = rng.normal(size=x.shape)  # d loss / d output

    def loss(x, up):
        return jnp.sum(nn.activate(name, x, up) * w)

    args = [None if a is None else jnp.asarray(a, jnp.float32) for a in (x, up)]
    dx, dup = jax.grad(loss, argnums=(0, 1))(*args)
    act, h = FLOAT64_ACTIVATIONS[name], 1e-6
    want_dx = (act(x + h) - act(x - h)) / (2 * h) * w * (1 if up is None else up)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    if gated:
        np.testing.assert_allclose(dup, act(x) * w, rtol=1e-5, atol=1e-6)
    kept = kept_for_backward(loss, *args)
    assert all(re.search(" from (the argument|a constant)", line) for line in kept), kept  # w


def kept_for_backward(f, *args) -> list[str]:
    """What ``f``'s backward keeps, a line each: ``dtype[shape] from ...`` (its source)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    return out.getvalue().splitlines()


def test_logical_axes_follow_stacking():
    layer = nn.stack_layers(
        lambda key: nn.init_linear(
            key, 4, 6, axes=("embed", "mlp"), bias=True, std=0.02, dtype=jnp.float32
        ),
        jax.random.key(0),
        3,
    )
    axes = nn.logical_axes(layer)
    assert layer.weight.shape == (3, 4, 6)
    assert tuple(axes.weight) == ("layers", "embed", "mlp")
    assert tuple(axes.bias) == ("layers", "mlp")


@pytest.mark.parametrize("kernels", ["xla", "pallas"])
@pytest.mark.parametrize("masked", [False, True])
def test_cross_entropy_gradient_is_softmax_minus_one_hot(masked, kernels):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 5, 11)) * 3
    targets = rng.integers(0, 11, (2, 5))
    mask = rng.random((2, 5)) > 0.3 if masked else np.ones((2, 5), bool)
    grad = jax.grad(functools.partial(nn.cross_entropy, kernels=kernels))(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(targets),
        jnp.asarray(mask) if masked else None,
    )
    want = numpy_nll(logits, targets)[1] * mask[..., None] / mask.sum()
    np.testing.assert_allclose(grad, want, atol=1e-6)


def test_unembed_backward_runs_in_the_compute_dtype():
    rng = np.random.default_rng(4)
    table = nn.Embedding(jnp.asarray(rng.normal(size=(13, 8)), jnp.float32), ("vocab", "embed"))
    x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 3, 13)), jnp.float32)

    def vjp(table, x):
        _, pullback = jax.vjp(nn.unembed, table, x)
        return pullback(g)

    d_table, dx = vjp(table, x)  # float32: the plain matmul transposes
    np.testing.assert_allclose(dx, np.einsum("btv,vd->btd", g, table.weight), rtol=1e-5)
    np.testing.assert_allclose(d_table.weight, np.einsum("btv,btd->vd", g, x), rtol=1e-5)
    d_table16, dx16 = vjp(table, x.astype(jnp.bfloat16))  # bfloat16: cotangent cast first
    g16, w16 = (np.asarray(a.astype(jnp.bfloat16), np.float32) for a in (g, table.weight))
    assert dx16.dtype == jnp.bfloat16 and d_table16.weight.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(dx16, np.float32), np.einsum("btv,vd->btd", g16, w16), rtol=2e-2, atol=2e-2
    )


def test_embedding_gradient_sums_rows_in_float32_and_leaves_in_the_compute_dtype():
    rng = np.random.default_rng(5)
    table = nn.Embedding(jnp.asarray(rng.normal(size=(13, 8)), jnp.float32), ("vocab", "embed"))
    ids = rng.integers(0, 13, (4, 6))  # 24 rows of 13: repeats
    g = rng.normal(size=(4, 6, 8))
    for dtype in (jnp.float32, jnp.bfloat16):
        cotangent = jnp.asarray(g, dtype)
        want = np.zeros((13, 8))
        np.add.at(want, ids, np.asarray(cotangent, np.float64))
        _, pullback = jax.vjp(lambda t, dtype=dtype: nn.embed(t, jnp.asarray(ids), dtype), table)
        grad = np.asarray(pullback(cotangent)[0].weight)
        assert grad.dtype == np.float32
        if dtype == jnp.float32:
            np.testing.assert_allclose(grad, want, rtol=1e-6)
        else:  # the float32 sums rounded once to bfloat16
            np.testing.assert_array_equal(grad, np.asarray(jnp.asarray(grad, dtype), np.float32))
            np.testing.assert_allclose(grad, want, rtol=2**-7, atol=1e-6)


def equations(jaxpr, primitive: str) -> list:
    """The ``primitive`` equations of ``jaxpr`` and of the jaxprs nested in it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            found.append(eqn)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found += equations(inner, primitive)
    return found


@pytest.mark.parametrize("layer", ["linear", "read_out"])
def test_bias_gradients_accumulate_in_float32(layer):
    """A bfloat16 layer's bias gradient (a sum over every row) reduces float32 values: the
    transpose of a bfloat16 broadcast add would reduce bfloat16 ones."""
    key = jax.random.key(0)
    p = nn.init_linear(key, 8, 4, axes=("embed", "mlp"), bias=True, std=0.02, dtype=jnp.float32)
    if layer == "read_out":
        p = nn.ReadOut(p.weight.T, p.bias, ("vocab", "embed"))
    apply = nn.linear if layer == "linear" else functools.partial(nn.read_out, dtype=jnp.bfloat16)
    x = jnp.ones((64, 8), jnp.bfloat16)
    grad = jax.grad(lambda p: apply(p, x).astype(jnp.float32).sum())
    dtypes = [
        e.invars[0].aval.dtype for e in equations(jax.make_jaxpr(grad)(p).jaxpr, "reduce_sum")
    ]
    assert dtypes and all(d == jnp.float32 for d in dtypes), dtypes
    np.testing.assert_array_equal(grad(p).bias, np.full(4, 64.0))


def test_unstacked_layers_take_their_gradient_as_one_concatenate():
    """Each array's gradient through ``unstack`` is one concatenate of the layers' gradients,
    not a sum of zero-padded copies of the whole stack (one ``pad`` per layer)."""
    stacked = {"w": jnp.ones((5, 3, 4)), "b": jnp.ones((5, 4))}

    def loss(p):
        return sum((i + 1) * (lr["w"].sum() + 2 * lr["b"].sum()) for i, lr in enumerate(p))

    def unstacked_loss(stacked):
        return loss(nn.unstack(stacked))

    def indexed_loss(stacked):
        return loss([jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(5)])

    primitives = [e.primitive.name for e in jax.make_jaxpr(jax.grad(unstacked_loss))(stacked).eqns]
    assert "pad" not in primitives and primitives.count("concatenate") == 2, primitives
    want = jax.grad(indexed_loss)(stacked)
    jax.tree.map(np.testing.assert_array_equal, jax.grad(unstacked_loss)(stacked), want)
    np.testing.assert_array_equal(want["b"][:, 0], [2, 4, 6, 8, 10])
    assert [x.shape for x in jax.tree.leaves(nn.unstack(stacked)[0])] == [(4,), (3, 4)]


def test_layers_split_ahead_unstack_like_their_stacks():
    stacked = {"w": jnp.arange(30.0).reshape(5, 3, 2), "b": None}
    split = nn.split_layers(stacked)
    assert len(split["w"]) == 5 and split["b"] is None
    # as the decoder's layer loop gets them: split params beside a stacked layer index
    layers = nn.unstack((split, jnp.arange(5)))
    for i, (p, index) in enumerate(layers):
        np.testing.assert_array_equal(p["w"], stacked["w"][i])
        assert int(index) == i
    jitted = jax.jit(lambda split: nn.unstack(split)[3])(split)  # SplitLayers is a pytree
    np.testing.assert_array_equal(jitted["w"], stacked["w"][3])
