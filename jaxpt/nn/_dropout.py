"""Dropout (Srivastava et al., 2014), as GPT-2 and nanoGPT train with it: inverted, so the
expected activation is unchanged and evaluation needs no rescaling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Zeroes each element of ``x`` with probability ``rate`` and scales the rest by
    ``1 / (1 - rate)``; returns ``x`` itself without a key (evaluation, generation) or at rate 0.

    ``x``: any shape -> the same shape and dtype.
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
