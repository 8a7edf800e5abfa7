"""Next-token cross-entropy, in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from jaxpt.nn import _loss_pallas
from jaxpt.nn._pallas import use_kernel


def cross_entropy(
    logits: Array, targets: Array, mask: Array | None = None, *, kernels: str = "xla"
) -> Array:
    """Mean negative log-likelihood of ``targets``.

    Args:
        logits: ``(B, T, V)``; targets: ``(B, T)`` int; mask: optional ``(B, T)`` weights
            (e.g. False for padding), the mean is taken over the weighted positions.
        kernels: as in ``token_nll``.
    Returns:
        A float32 scalar.
    """
    nll = token_nll(logits, targets, kernels=kernels)  # (B, T) float32
    if mask is None:
        return nll.mean()
    mask = mask.astype(jnp.float32)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def token_nll(logits: Array, targets: Array, *, kernels: str = "xla") -> Array:
    """``logsumexp(logits) - logits[target]`` per position: ``(B, T, V)`` -> float32 ``(B, T)``.

    ``kernels`` (``nn.KERNELS``) may run the Pallas kernel (one read of the logits per pass),
    for logits whose rows are split like the batch and whose V is whole on every device.
    """
    if use_kernel(kernels, logits) and _loss_pallas.supported(logits):
        return _loss_pallas.token_nll(logits, targets)
    return _xla_token_nll(logits, targets)


@jax.custom_vjp
def _xla_token_nll(logits: Array, targets: Array) -> Array:
    """``token_nll`` in XLA. The arithmetic is float32 whatever the logits' dtype (bfloat16
    logits are read, not copied). Its gradient ``softmax(logits) - one_hot(targets)`` is
    written as one elementwise expression (no scatter into a zero ``(B, T, V)`` array, as the
    gradient of a gather would be), so it fuses with whatever consumes it, e.g. a cast to
    bfloat16.
    """
    return _nll_fwd(logits, targets)[0]


def _shifted_exp(logits: Array, peak: Array) -> Array:
    """``exp(logits - peak)`` in float32; forward and backward build the same expression, so
    a CPU computes it once and a GPU recomputes it in place."""
    return jnp.exp(logits.astype(jnp.float32) - peak[..., None])


@jax.named_scope("cross_entropy")
def _nll_fwd(logits: Array, targets: Array):
    peak = jax.lax.stop_gradient(logits.max(axis=-1).astype(jnp.float32))  # (B, T)
    total = _shifted_exp(logits, peak).sum(axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = peak + jnp.log(total) - target_logit.astype(jnp.float32)
    return nll, (logits, peak, total, targets)


@jax.named_scope("cross_entropy")
def _nll_bwd(residuals, grad: Array):
    logits, peak, total, targets = residuals
    one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.bool_)  # (B, T, V)
    probs = _shifted_exp(logits, peak) / total[..., None]
    dlogits = (probs - one_hot) * grad[..., None]
    return dlogits.astype(logits.dtype), None


_xla_token_nll.defvjp(_nll_fwd, _nll_bwd)
