"""jaxpt's Pallas kernels (interpreted on the CPU) against float64 references, alone, under
an 8-device mesh and inside a model."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt import generate, models, nn, sharding
from jaxpt.config import preset_config
from jaxpt.nn import _decode_pallas, _loss_pallas, _norm_pallas, _pallas
from tests.test_models import perturbed
from tests.test_nn import numpy_nll


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few rows and three backward programs, so a test's rows span several tiles
    per program, the last tile part-empty and the last program's tiles partly past the rows."""
    monkeypatch.setattr(_norm_pallas, "TILE", 256)
    monkeypatch.setattr(_norm_pallas, "PROGRAMS", 3)


def activations_over(data: int, tensor: int):
    """A context in which activations are sharded over a (data, tensor) mesh of the 8 test
    devices, by the default rules."""
    mesh_cfg = preset_config("gpt", None).mesh
    mesh_cfg.update(data=data, tensor=tensor)
    return sharding.activation_sharding(sharding.make_mesh(mesh_cfg), mesh_cfg.rules)


def float64_norm(x, scale, bias, eps):
    """The norm's definition in float64 (jax, so it has a gradient)."""
    mean = x.mean(-1, keepdims=True) if bias is not None else 0.0
    centred = x - mean
    y = centred / jnp.sqrt((centred * centred).mean(-1, keepdims=True) + eps) * scale
    return y if bias is None else y + bias


def norm_inputs(d, centered, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 37, d)) * 2 + 0.5
    scale = rng.normal(size=d)
    bias = rng.normal(size=d) if centered else None
    weights = rng.normal(size=x.shape)  # the loss sum(norm(x) * weights) gives g = weights
    cast = [None if a is None else jnp.asarray(a, dtype) for a in (x, scale, bias)]
    return (x, scale, bias, weights), tuple(cast)


@pytest.mark.parametrize("centered", [True, False], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("d", [96, 40])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_norm_kernel_matches_float64(small_tiles, centered, d, dtype, tol):
    (x, scale, bias, weights), args = norm_inputs(d, centered, dtype)
    argnums = (0, 1, 2) if centered else (0, 1)

    def loss_of(norm):
        return lambda *args: (norm(*args, 1e-5).astype(jnp.float32) * weights).sum()

    got = _norm_pallas.norm(*args, 1e-5)
    grads = jax.grad(loss_of(_norm_pallas.norm), argnums)(*args)
    with jax.enable_x64():
        x64 = [None if a is None else jnp.asarray(a, jnp.float64) for a in (x, scale, bias)]
        want = float64_norm(*x64, 1e-5)
        want_grads = jax.grad(loss_of(float64_norm), argnums)(*x64)
    assert got.dtype == dtype and all(g.dtype == dtype for g in grads)
    for g, w in zip((got, *grads), (want, *want_grads), strict=True):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g, np.float64), w, atol=tol * np.abs(w).max())


def test_norm_kernel_runs_per_shard_under_a_mesh(small_tiles):
    _, (_, scale, bias) = norm_inputs(40, True, jnp.float32)
    x = jax.random.normal(jax.random.key(0), (8, 5, 40))  # one row per device

    def loss(x, scale, bias):
        return (nn.layer_norm(nn.LayerNorm(scale, bias), x, 1e-5, kernels="pallas") ** 2).sum()

    grad = jax.jit(jax.grad(loss, (0, 1, 2)))
    want = grad(x, scale, bias)
    with activations_over(8, 1):
        assert "shard_map" in str(jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(x, scale, bias))
        got = grad(x, scale, bias)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "preset,layers", [("gpt", dict(scan_layers=False)), ("smollm", dict(remat_policy="full"))]
)
def test_model_with_kernels_equals_xla(small_tiles, preset, layers):
    cfg = dataclasses.replace(
        models.config_from(preset_config(preset, "smoke").model),
        **{"vocab_size": 64, "scan_layers": True, **layers},
    )
    model = models.get(preset)
    params = model.init(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)

    def loss(params, kernels):
        logits, _ = model.apply(params, tokens, dataclasses.replace(cfg, kernels=kernels))
        return nn.cross_entropy(logits, tokens)

    got, grads = jax.value_and_grad(loss)(params, "pallas")
    want, want_grads = jax.value_and_grad(loss)(params, "xla")
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_auto_kernels_need_an_nvidia_gpu_and_enough_rows(monkeypatch):
    decoding, training = jnp.zeros((8, 1, 16)), jnp.zeros((2, nn.MIN_ROWS // 2, 16))
    assert not nn.use_kernel("auto", training)  # on this CPU
    monkeypatch.setattr(_pallas, "on_cuda", lambda: True)
    assert nn.use_kernel("auto", training) and not nn.use_kernel("auto", decoding)
    assert nn.use_kernel("pallas", decoding) and not nn.use_kernel("xla", training)


@pytest.fixture
def small_chunks(monkeypatch):
    """Cross-entropy kernel tiles of 4 rows x 128 vocabulary columns: a vocabulary of 300
    takes three chunks, the last part-masked."""
    monkeypatch.setattr(_loss_pallas, "CHUNK", 128)
    monkeypatch.setattr(_loss_pallas, "TILE", 512)


@pytest.mark.parametrize(
    "dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)], ids=["float32", "bfloat16"]
)
def test_token_nll_kernel_matches_numpy(small_chunks, dtype, tolerance):
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(3, 5, 300)) * 4, dtype)  # 15 rows: a part tile
    targets = rng.integers(0, 300, (3, 5))
    grad = rng.normal(size=(3, 5))  # the incoming gradient, one per position
    nll, pullback = jax.vjp(
        lambda x: nn.token_nll(x, jnp.asarray(targets), kernels="pallas"), logits
    )
    (dlogits,) = pullback(jnp.asarray(grad, jnp.float32))
    want_nll, want_dlogits = numpy_nll(np.asarray(logits, np.float32), targets)
    assert nll.dtype == jnp.float32 and dlogits.dtype == dtype
    np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(dlogits, np.float32), want_dlogits * grad[..., None], atol=tolerance
    )


@pytest.mark.parametrize("tensor, per_shard", [(1, True), (2, False)])
def test_cross_entropy_kernel_under_a_mesh_equals_xla(small_chunks, tensor, per_shard):
    """Rows split 8 ways: the kernel runs on each device's rows; a vocabulary split over the
    tensor axis: XLA's loss."""
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.normal(size=(8, 3, 300)) * 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 300, (8, 3)))
    loss_and_grad = jax.value_and_grad(functools.partial(nn.cross_entropy, kernels="pallas"))
    with activations_over(8 // tensor, tensor):
        program = str(jax.make_jaxpr(loss_and_grad)(logits, targets))
        loss, dlogits = jax.jit(loss_and_grad)(logits, targets)
    assert ("shard_map" in program and "pallas_call" in program) == per_shard
    want_loss, want_dlogits = jax.value_and_grad(nn.cross_entropy)(logits, targets)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(dlogits, want_dlogits, atol=1e-7)


def test_cross_entropy_kernel_size_limit_is_per_device(monkeypatch):
    monkeypatch.setattr(_loss_pallas, "MAX_ELEMENTS", 1000)
    logits = jax.ShapeDtypeStruct((8, 3, 300), jnp.float32)  # 900 elements a device
    assert not _loss_pallas.supported(logits)
    with activations_over(8, 1):
        assert _loss_pallas.supported(logits)


def float64_decode_attention(q, cache_k, cache_v, layer, positions):
    """Each new token's softmax attention over positions 0..its own of cache entry ``layer``."""
    batch, _, n_head, head_dim = q.shape
    group = n_head // cache_k.shape[3]
    out = np.zeros(q.shape)
    for b, h in np.ndindex(batch, n_head):
        n = positions[b, 0] + 1
        keys, values = (np.float64(c[layer, b, :n, h // group]) for c in (cache_k, cache_v))
        scores = keys @ np.float64(q[b, 0, h]) / np.sqrt(head_dim)
        weights = np.exp(scores - scores.max())
        out[b, 0, h] = weights @ values / weights.sum()
    return out


@pytest.mark.parametrize(
    "n_head,n_kv,head_dim,dtype,tol",
    [(4, 2, 24, jnp.float32, 1e-5), (4, 4, 64, jnp.bfloat16, 3e-2)],
    ids=["gqa-f32-masked-columns", "mha-bf16"],
)
def test_decode_attention_kernel_matches_float64(n_head, n_kv, head_dim, dtype, tol):
    rng = np.random.default_rng(0)
    layers, batch, seq = 3, 3, 70  # 70: the last block of positions is part-empty
    q = jnp.asarray(rng.standard_normal((batch, 1, n_head, head_dim)), dtype)
    cache_k, cache_v = (
        jnp.asarray(rng.standard_normal((layers, batch, seq, n_kv, head_dim)), dtype)
        for _ in range(2)
    )
    positions = np.array([[0], [37], [seq - 1]], np.int32)  # each row reads 1, 38, 70 keys
    attend = jax.jit(_decode_pallas.decode_attention)  # the layer index traced, as in a scan
    got = attend(q, cache_k, cache_v, jnp.int32(2), jnp.asarray(positions))
    want = float64_decode_attention(*map(np.asarray, (q, cache_k, cache_v)), 2, positions)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.float64(got), want, rtol=tol, atol=tol)


def spy_on_decode_kernel(monkeypatch) -> list:
    """A list that the decode kernel appends to each time a decoding step traces it."""
    traced, kernel = [], _decode_pallas.decode_attention
    monkeypatch.setattr(
        _decode_pallas, "decode_attention", lambda *a: traced.append(1) or kernel(*a)
    )
    return traced


def smoke_model(preset):
    cfg = dataclasses.replace(
        models.config_from(preset_config(preset, "smoke").model), vocab_size=64, block_size=16
    )
    # perturbed: at init a tied model's greedy choice is the token it was fed, whatever the
    # attention over the cache returns
    return perturbed(models.get(preset).init(jax.random.key(0), cfg), std=0.3), cfg


def greedy(params, cfg, prompts, kernels):
    config = dataclasses.replace(cfg, kernels=kernels)
    return generate(params, prompts, config, max_new_tokens=6, temperature=0).tokens


@pytest.mark.parametrize("preset", ["gpt", "smollm"])  # multi-head, grouped-query
def test_greedy_decoding_with_the_decode_kernel_equals_xla(preset, monkeypatch):
    traced = spy_on_decode_kernel(monkeypatch)  # decoding steps (prefill: XLA's attention)
    params, cfg = smoke_model(preset)
    prompts = [[5, 17, 3], [42, 7, 7, 1, 9]]
    np.testing.assert_array_equal(
        greedy(params, cfg, prompts, "pallas"), greedy(params, cfg, prompts, "xla")
    )
    assert traced


@pytest.mark.parametrize("batch", [1, 2])
def test_auto_decoding_runs_the_kernel_from_enough_sequences_x_heads(batch, monkeypatch):
    traced = spy_on_decode_kernel(monkeypatch)
    params, cfg = smoke_model("gpt")
    monkeypatch.setattr(_pallas, "on_cuda", lambda: True)
    monkeypatch.setattr(_decode_pallas, "MIN_PROGRAMS", 2 * cfg.n_head)
    greedy(params, cfg, [[5, 17, 3]] * batch, "auto")
    assert bool(traced) == (batch == 2)
