"""Rotary position embedding, Llama-style "rotate half" layout (Su et al., 2021).

The original JaxPT writes ``rope_theta=1e-4``, meaning inverse frequencies
``1e-4 ** (2i / Dh)``; jaxpt's ``rope_base=10000`` is the same thing, ``base ** (-2i / Dh)``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array


def rope_angles(positions: Array, head_dim: int, base: float) -> tuple[Array, Array]:
    """cos and sin of ``position * base ** (-2i / Dh)``.

    Args:
        positions: ``(B, T)`` int positions (per sequence, so caches and padding can offset them).
    Returns:
        ``(cos, sin)``, each ``(B, T, Dh // 2)`` float32.
    """
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # (Dh/2,)
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates pairs ``(x[i], x[i + Dh/2])`` by the angles. ``x``: ``(B, T, H, Dh)``."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, Dh/2)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
