"""Dropout (Srivastava et al., 2014), as GPT-2 and nanoGPT train with it: inverted, so the
expected activation is unchanged and evaluation needs no rescaling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Zeroes each element of ``x`` with probability ``rate`` and scales the rest by
    ``1 / (1 - rate)``; returns ``x`` itself without a key (evaluation, generation) or at rate 0.

    ``x``: any shape -> the same shape and dtype. The scaling runs in float32 and rounds once
    to x's dtype: ``1 - rate`` rounded to bfloat16 first (0.9 -> 0.8984) would scale every kept
    element 0.18% too much.
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    scaled = (x.astype(jnp.float32) / (1.0 - rate)).astype(x.dtype)
    return jnp.where(keep, scaled, jnp.zeros((), x.dtype))
