"""LayerNorm and RMSNorm. Statistics are computed in float32 whatever the compute dtype."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from jaxpt.nn import _norm_pallas
from jaxpt.nn._axes import HasAxes
from jaxpt.nn._pallas import use_kernel


class LayerNorm(HasAxes):
    """Scale and shift over the last axis (Ba et al., 2016)."""

    scale: Array  # (D,)
    bias: Array  # (D,)

    def param_axes(self):
        return {"scale": ("norm",), "bias": ("norm",)}


class RMSNorm(HasAxes):
    """Root-mean-square scaling over the last axis, no shift (Zhang & Sennrich, 2019)."""

    scale: Array  # (D,)

    def param_axes(self):
        return {"scale": ("norm",)}


def init_layer_norm(d: int, dtype) -> LayerNorm:
    """Unit scale, zero shift."""
    return LayerNorm(jnp.ones((d,), dtype), jnp.zeros((d,), dtype))


def init_rms_norm(d: int, dtype) -> RMSNorm:
    """Unit scale."""
    return RMSNorm(jnp.ones((d,), dtype))


@jax.named_scope("layer_norm")
def layer_norm(p: LayerNorm, x: Array, eps: float, *, kernels: str = "xla") -> Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis, in x's dtype.

    ``kernels`` (``nn.KERNELS``) may run the Pallas kernel, for ``(B, ..., D)`` activations
    whose rows are split like the batch and whose D is whole on every device.
    """
    if use_kernel(kernels, x) and _norm_pallas.supported(x):
        return _norm_pallas.norm(x, p.scale, p.bias, eps)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jnp.reciprocal(jnp.sqrt(var + eps))
    scale, bias = (jax.lax.broadcast_to_rank(a, x.ndim) for a in (p.scale, p.bias))
    return (y * scale + bias).astype(x.dtype)


@jax.named_scope("rms_norm")
def rms_norm(p: RMSNorm, x: Array, eps: float, *, kernels: str = "xla") -> Array:
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis, in x's dtype; ``kernels``
    as in ``layer_norm``."""
    if use_kernel(kernels, x) and _norm_pallas.supported(x):
        return _norm_pallas.norm(x, p.scale, None, eps)
    x32 = x.astype(jnp.float32)
    y = x32 * jnp.reciprocal(jnp.sqrt(jnp.square(x32).mean(-1, keepdims=True) + eps))
    return (y * jax.lax.broadcast_to_rank(p.scale, x.ndim)).astype(x.dtype)


class Norm(NamedTuple):
    """One kind of norm: ``init(d, dtype) -> params`` and
    ``apply(params, x, eps, *, kernels) -> y``."""

    init: Callable
    apply: Callable


NORMS = {
    "layernorm": Norm(init_layer_norm, layer_norm),
    "rmsnorm": Norm(init_rms_norm, rms_norm),
}
