"""Causal self-attention with multi-head or grouped-query heads (Vaswani et al., 2017;
Ainslie et al., 2023), optional QK-norm and rotary positions.

Query head ``h`` reads key/value head ``h // (H // K)``, as in Hugging Face's ``repeat_kv``.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from jaxpt.nn._linear import Linear, init_linear, linear, residual_out_std
from jaxpt.nn._norm import RMSNorm, init_rms_norm, rms_norm
from jaxpt.nn._rope import apply_rope, rope_angles

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "einsum")


class Attention(eqx.Module):
    """Projections of one attention layer; ``q_norm``/``k_norm`` exist only with QK-norm."""

    q: Linear  # D -> H * Dh
    k: Linear  # D -> K * Dh
    v: Linear  # D -> K * Dh
    o: Linear  # H * Dh -> D
    q_norm: RMSNorm | None  # over Dh
    k_norm: RMSNorm | None


def init_attention(key: Array, cfg) -> Attention:
    """Attention params for the model config ``cfg`` (fields n_embed, n_head, n_kv_head, ...)."""
    kq, kk, kv, ko = jax.random.split(key, 4)
    d, head_dim = cfg.n_embed, cfg.n_embed // cfg.n_head
    dtype, std, bias = cfg.param_dtype, cfg.init_stddev, cfg.attention_bias
    qk_norm = init_rms_norm(head_dim, dtype) if cfg.qk_norm else None
    return Attention(
        q=init_linear(
            kq, d, cfg.n_head * head_dim, axes=("embed", "q_heads"), bias=bias, std=std, dtype=dtype
        ),
        k=init_linear(
            kk,
            d,
            cfg.n_kv_head * head_dim,
            axes=("embed", "kv_heads"),
            bias=bias,
            std=std,
            dtype=dtype,
        ),
        v=init_linear(
            kv,
            d,
            cfg.n_kv_head * head_dim,
            axes=("embed", "kv_heads"),
            bias=bias,
            std=std,
            dtype=dtype,
        ),
        o=init_linear(
            ko,
            cfg.n_head * head_dim,
            d,
            axes=("q_heads", "embed"),
            bias=bias,
            std=residual_out_std(cfg),
            dtype=dtype,
        ),
        q_norm=qk_norm,
        k_norm=qk_norm,
    )


def attention(p: Attention, x: Array, cfg, *, positions: Array, mask: Array | None) -> Array:
    """Causal self-attention over a full sequence.

    Args:
        x: ``(B, T, D)`` activations in the compute dtype.
        positions: ``(B, T)`` int positions, used by rotary embeddings.
        mask: optional ``(B, T)`` bool padding mask, True for real tokens. Keys at padded
            positions are never attended to; outputs at padded positions are finite but
            meaningless.
    Returns:
        ``(B, T, D)``.
    """
    b, t, _ = x.shape
    head_dim = cfg.n_embed // cfg.n_head
    q = linear(p.q, x).reshape(b, t, cfg.n_head, head_dim)  # (B, T, H, Dh)
    k = linear(p.k, x).reshape(b, t, cfg.n_kv_head, head_dim)  # (B, T, K, Dh)
    v = linear(p.v, x).reshape(b, t, cfg.n_kv_head, head_dim)
    if cfg.qk_norm:
        q, k = rms_norm(p.q_norm, q, cfg.ln_epsilon), rms_norm(p.k_norm, k, cfg.ln_epsilon)
    if cfg.position == "rope":
        cos, sin = rope_angles(positions, head_dim, cfg.rope_base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    full_mask = None if mask is None else causal_mask(positions, positions, mask)
    y = attend(q, k, v, mask=full_mask, implementation=cfg.sdpa_implementation)
    return linear(p.o, y.reshape(b, t, cfg.n_head * head_dim))


def causal_mask(q_positions: Array, kv_positions: Array, kv_valid: Array) -> Array:
    """``(B, T, S)`` bool: query ``t`` may read key ``s`` if it is valid and not in the future.

    Args:
        q_positions: ``(B, T)``; kv_positions: ``(B, S)``; kv_valid: ``(B, S)`` bool.
    """
    not_future = kv_positions[:, None, :] <= q_positions[:, :, None]
    return not_future & kv_valid[:, None, :]


def attend(q: Array, k: Array, v: Array, *, mask: Array | None, implementation: str) -> Array:
    """Scaled dot-product attention.

    Args:
        q: ``(B, T, H, Dh)``; k, v: ``(B, S, K, Dh)`` with ``H % K == 0``.
        mask: ``(B, T, S)`` bool (True = may attend), or None for plain causal with ``T == S``.
        implementation: one of ``IMPLEMENTATIONS``; ``"einsum"`` is the readable reference.
    Returns:
        ``(B, T, H, Dh)`` in q's dtype.
    """
    if implementation == "auto":
        implementation = _best_implementation(q, mask)
    if implementation == "einsum":
        return einsum_attention(q, k, v, mask=mask)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=None if mask is None else mask[:, None],  # (B, 1, T, S)
        is_causal=mask is None,
        implementation=implementation,
    )


def _best_implementation(q: Array, mask: Array | None) -> str:
    """cuDNN flash attention where it applies (GPU, 16-bit, no explicit mask), else XLA."""
    head_dim = q.shape[-1]
    cudnn_ok = (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and mask is None
        and head_dim % 8 == 0
        and head_dim <= 128
    )
    return "cudnn" if cudnn_ok else "xla"


def einsum_attention(q: Array, k: Array, v: Array, *, mask: Array | None) -> Array:
    """Reference attention with explicit einsums; softmax in float32."""
    b, t, h, head_dim = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, head_dim)  # (B, T, K, G, Dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(head_dim)
    if mask is None:
        mask = jnp.tril(jnp.ones((t, s), bool))[None]  # (1, T, S)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    y = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return y.reshape(b, t, h, head_dim)
