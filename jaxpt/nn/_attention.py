"""Causal self-attention with multi-head or grouped-query heads (Vaswani et al., 2017;
Ainslie et al., 2023), optional QK-norm and rotary positions.

Query head ``h`` reads key/value head ``h // (H // K)``, as in Hugging Face's ``repeat_kv``.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from jaxpt.nn import _decode_pallas
from jaxpt.nn._axes import activation_sharding_of, constrain
from jaxpt.nn._dropout import dropout
from jaxpt.nn._linear import Linear, init_linear, linear, stacked_linear
from jaxpt.nn._norm import RMSNorm, init_rms_norm, rms_norm
from jaxpt.nn._pallas import use_kernel
from jaxpt.nn._rope import apply_rope, rope_angles

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "einsum")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What one attention layer computes (hashable, so a static jit argument)."""

    n_head: int  # H query heads
    n_kv_head: int  # K key/value heads; H % K == 0 (K < H is grouped-query attention)
    head_dim: int  # Dh
    qk_norm: bool = False  # RMSNorm over Dh on queries and keys
    norm_eps: float = 1e-5  # that RMSNorm's epsilon
    rope_base: float | None = None  # rotary positions with this base; None: no rotation
    implementation: str = "auto"  # one of IMPLEMENTATIONS
    dropout: float = 0.0  # attention-probability dropout rate when a key is given (training)


class Attention(eqx.Module):
    """Projections of one attention layer; ``q_norm``/``k_norm`` exist only with QK-norm."""

    q: Linear  # D -> H * Dh
    k: Linear  # D -> K * Dh
    v: Linear  # D -> K * Dh
    o: Linear  # H * Dh -> D
    q_norm: RMSNorm | None  # over Dh
    k_norm: RMSNorm | None


def init_attention(
    key: Array, d_model: int, spec: AttentionSpec, *, bias: bool, std: float, out_std: float, dtype
) -> Attention:
    """Attention params for width ``d_model``: N(0, std^2) q, k, v and N(0, out_std^2) output
    projections (the output writes into the residual stream), zero biases if ``bias``."""
    kq, kk, kv, ko = jax.random.split(key, 4)
    q_width, kv_width = spec.n_head * spec.head_dim, spec.n_kv_head * spec.head_dim
    project = dict(bias=bias, dtype=dtype)
    qk_norm = init_rms_norm(spec.head_dim, dtype) if spec.qk_norm else None
    return Attention(
        q=init_linear(kq, d_model, q_width, axes=("embed", "q_heads"), std=std, **project),
        k=init_linear(kk, d_model, kv_width, axes=("embed", "kv_heads"), std=std, **project),
        v=init_linear(kv, d_model, kv_width, axes=("embed", "kv_heads"), std=std, **project),
        o=init_linear(ko, q_width, d_model, axes=("q_heads", "embed"), std=out_std, **project),
        q_norm=qk_norm,
        k_norm=qk_norm,
    )


class KVCache(eqx.Module):
    """Keys and values of one attention layer for ``S`` positions of ``B`` sequences.

    Position ``s`` of row ``b`` holds the key/value of that sequence's token at position
    ``s`` (only the K KV heads: GQA caches ``K / H`` of what MHA would).
    """

    k: Array  # (layers, B, S, K, Dh)
    v: Array  # (layers, B, S, K, Dh)


def init_kv_cache(
    batch_size: int, length: int, spec: AttentionSpec, *, layers: int, dtype
) -> KVCache:
    """Zeroed buffers for ``layers`` stacked attention layers, in ``dtype`` (the compute
    dtype)."""
    shape = (layers, batch_size, length, spec.n_kv_head, spec.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def _project(p: Attention, x: Array, spec: AttentionSpec, positions: Array):
    """Queries ``(B, T, H, Dh)``, keys and values ``(B, T, K, Dh)``, QK-normed and rotated."""
    b, t, _ = x.shape
    if spec.n_head == spec.n_kv_head:
        q, k, v = stacked_linear((p.q, p.k, p.v), x)
    else:
        q, (k, v) = linear(p.q, x), stacked_linear((p.k, p.v), x)
    q = q.reshape(b, t, spec.n_head, spec.head_dim)
    k = k.reshape(b, t, spec.n_kv_head, spec.head_dim)
    v = v.reshape(b, t, spec.n_kv_head, spec.head_dim)
    if spec.qk_norm:
        q, k = rms_norm(p.q_norm, q, spec.norm_eps), rms_norm(p.k_norm, k, spec.norm_eps)
    if spec.rope_base is not None:
        cos, sin = rope_angles(positions, spec.head_dim, spec.rope_base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k, v


def _merge_heads(p: Attention, y: Array) -> Array:
    """``(B, T, H, Dh)`` -> ``(B, T, D)`` through the output projection. ``y`` is pinned as
    the queries are: left to itself, the partitioner could split its heads like the output
    projection's FSDP-split rows and move them there and back by all-to-all."""
    b, t, h, head_dim = y.shape
    y = constrain(y, ("batch", None, "q_heads", None))
    return linear(p.o, y.reshape(b, t, h * head_dim))


@jax.named_scope("attention")
def attention(
    p: Attention,
    x: Array,
    spec: AttentionSpec,
    *,
    positions: Array,
    mask: Array | None,
    key: Array | None = None,
) -> Array:
    """Causal self-attention over a full sequence.

    Args:
        x: ``(B, T, D)`` activations in the compute dtype.
        positions: ``(B, T)`` int positions, used by rotary embeddings.
        mask: optional ``(B, T)`` bool padding mask, True for real tokens. Keys at padded
            positions are never attended to; outputs at padded positions are finite but
            meaningless.
        key: drops attention probabilities at ``spec.dropout`` (training); None: no dropout.
    Returns:
        ``(B, T, D)``.
    """
    q, k, v = _project(p, x, spec, positions)
    full_mask = None if mask is None else causal_mask(positions, positions, mask)
    implementation = _resolved_implementation(spec.implementation, q, full_mask, spec.dropout, key)
    q, k, v = _constrain_heads(q, k, v, alike=implementation == "cudnn")
    y = attend(
        q,
        k,
        v,
        mask=full_mask,
        implementation=implementation,
        dropout_rate=spec.dropout,
        key=key,
    )
    return _merge_heads(p, y)


def _constrain_heads(q: Array, k: Array, v: Array, *, alike: bool):
    """q ``(B, T, H, Dh)``, k and v ``(B, S, K, Dh)`` pinned to their batch and head shardings
    (``q_heads``, ``kv_heads``). ``alike``: q takes k's and v's (cuDNN's partitioner refuses
    q, k and v sharded differently); a split of K heads splits H alike, as H % K == 0, and
    keeps each query head on the device of its key/value head."""
    k, v = (constrain(a, ("batch", None, "kv_heads", None)) for a in (k, v))
    kv_sharding = activation_sharding_of(k.shape, ("batch", None, "kv_heads", None))
    if alike and kv_sharding is not None:
        return jax.lax.with_sharding_constraint(q, kv_sharding), k, v
    return constrain(q, ("batch", None, "q_heads", None)), k, v


@jax.named_scope("attention")
def cached_attention(
    p: Attention,
    x: Array,
    spec: AttentionSpec,
    *,
    cache: KVCache,
    positions: Array,
    layer: Array | int = 0,
    kernels: str = "xla",
) -> tuple[Array, KVCache]:
    """Causal self-attention of new tokens over a sequence's cached keys and values.

    Writes the new tokens' keys/values at their positions in entry ``layer`` of the stacked
    cache (in place inside a loop), then each new token attends to every cached position up
    to its own. Positions of a row must be filled in order (a prefill, then one token at a
    time), so the positions a token reads all hold its sequence's tokens.

    Args:
        x: ``(B, T, D)``, the new tokens (T = prompt length at prefill, 1 per decode step).
        cache: ``KVCache`` with ``(layers, B, S, K, Dh)`` buffers; layer: the entry to use.
        positions: ``(B, T)`` int, each below the cache length S.
        kernels: ``"pallas"`` runs a decoding step's attention (T = 1) as one Pallas kernel
            (``_decode_pallas``; interpreted off a GPU); ``"auto"`` does on an NVIDIA GPU
            from ``_decode_pallas.MIN_PROGRAMS`` sequences x query heads up; ``"xla"`` never.
    Returns:
        ``(B, T, D)`` and the updated cache.
    """
    q, k, v = _project(p, x, spec, positions)
    rows = jnp.arange(x.shape[0])[:, None]  # (B, 1)
    cache = KVCache(
        cache.k.at[layer, rows, positions].set(k.astype(cache.k.dtype)),
        cache.v.at[layer, rows, positions].set(v.astype(cache.v.dtype)),
    )
    decode_kernel = use_kernel(kernels, q, min_rows=_decode_pallas.MIN_PROGRAMS)  # B x H rows
    if decode_kernel and _decode_pallas.supported(q, cache.k):
        y = _decode_pallas.decode_attention(q, cache.k, cache.v, layer, positions)
        return _merge_heads(p, y), cache
    keys, values = cache.k[layer], cache.v[layer]  # (B, S, K, Dh)
    b, s = keys.shape[:2]
    kv_positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    mask = causal_mask(positions, kv_positions, jnp.ones((b, s), bool))  # (B, T, S)
    implementation = "einsum" if spec.implementation == "einsum" else _best_implementation(q, mask)
    y = attend(q, keys, values, mask=mask, implementation=implementation)
    return _merge_heads(p, y), cache


def causal_mask(q_positions: Array, kv_positions: Array, kv_valid: Array) -> Array:
    """``(B, T, S)`` bool: query ``t`` may read key ``s`` if it is valid and not in the future.

    Args:
        q_positions: ``(B, T)``; kv_positions: ``(B, S)``; kv_valid: ``(B, S)`` bool.
    """
    not_future = kv_positions[:, None, :] <= q_positions[:, :, None]
    return not_future & kv_valid[:, None, :]


def attend(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None,
    implementation: str,
    dropout_rate: float = 0.0,
    key: Array | None = None,
) -> Array:
    """Scaled dot-product attention.

    Args:
        q: ``(B, T, H, Dh)``; k, v: ``(B, S, K, Dh)`` with ``H % K == 0``.
        mask: ``(B, T, S)`` bool (True = may attend), or None for plain causal with ``T == S``.
        implementation: one of ``IMPLEMENTATIONS``; ``"einsum"`` is the readable reference.
        dropout_rate, key: with a key, each attention probability is dropped at this rate;
            ``jax.nn.dot_product_attention`` has no dropout, so that runs the einsum path.
    Returns:
        ``(B, T, H, Dh)`` in q's dtype.
    """
    implementation = _resolved_implementation(implementation, q, mask, dropout_rate, key)
    if implementation == "einsum":
        return einsum_attention(q, k, v, mask=mask, dropout_rate=dropout_rate, key=key)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=None if mask is None else mask[:, None],  # (B, 1, T, S)
        is_causal=mask is None,
        implementation=implementation,
    )


def _resolved_implementation(
    implementation: str, q: Array, mask: Array | None, dropout_rate: float, key: Array | None
) -> str:
    """The implementation ``attend`` runs: ``"einsum"`` with dropout, ``"auto"`` resolved."""
    if key is not None and dropout_rate > 0.0:
        return "einsum"
    return _best_implementation(q, mask) if implementation == "auto" else implementation


def _best_implementation(q: Array, mask: Array | None) -> str:
    """cuDNN flash attention where it applies (GPU, 16-bit, no explicit mask); the einsums
    for float16 off a GPU, where ``jax.nn.dot_product_attention``'s float16 scores (an
    F16_F16_F32 matmul) do not compile under jit (XLA:CPU); else XLA."""
    if q.dtype == jnp.float16 and jax.default_backend() != "gpu":
        return "einsum"
    head_dim = q.shape[-1]
    cudnn_ok = (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and mask is None
        and head_dim % 8 == 0
        and head_dim <= 128
    )
    return "cudnn" if cudnn_ok else "xla"


def einsum_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None,
    dropout_rate: float = 0.0,
    key: Array | None = None,
) -> Array:
    """Reference attention with explicit einsums; softmax in float32, then probabilities
    dropped at ``dropout_rate`` if a ``key`` is given (see ``attend``)."""
    b, t, h, head_dim = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, head_dim)  # (B, T, K, G, Dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(head_dim)
    if mask is None:
        mask = jnp.tril(jnp.ones((t, s), bool))[None]  # (1, T, S)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, key).astype(v.dtype)
    y = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return y.reshape(b, t, h, head_dim)
