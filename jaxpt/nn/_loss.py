"""Next-token cross-entropy, in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array


def cross_entropy(logits: Array, targets: Array, mask: Array | None = None) -> Array:
    """Mean negative log-likelihood of ``targets``.

    Args:
        logits: ``(B, T, V)``; targets: ``(B, T)`` int; mask: optional ``(B, T)`` weights
            (e.g. False for padding), the mean is taken over the weighted positions.
    Returns:
        A float32 scalar.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    if mask is None:
        return nll.mean()
    mask = mask.astype(jnp.float32)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)
