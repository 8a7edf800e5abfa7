"""Feed-forward mixers: the GPT-2 MLP and the gated linear unit (Shazeer, 2020)."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
from jax import Array

from jaxpt.nn._linear import (
    Linear,
    add_bias,
    init_linear,
    linear,
    matmul,
    stacked_bias,
    stacked_matmul,
)


def squared_relu(x: Array) -> Array:
    """``relu(x) ** 2`` (So et al., 2021, "Primer")."""
    return jax.numpy.square(jax.nn.relu(x))


ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "squared_relu": squared_relu,
}


class MLP(eqx.Module):
    """``proj(act(fc(x)))``."""

    fc: Linear  # D -> F
    proj: Linear  # F -> D


class GLU(eqx.Module):
    """``down(act(gate(x)) * up(x))``."""

    gate: Linear  # D -> F
    up: Linear  # D -> F
    down: Linear  # F -> D


def init_mlp(
    key: Array, d_model: int, d_hidden: int, *, bias: bool, std: float, out_std: float, dtype
) -> MLP:
    """MLP params: N(0, std^2) ``fc``, N(0, out_std^2) ``proj`` (it writes into the residual
    stream), zero biases if ``bias``."""
    k_fc, k_proj = jax.random.split(key)
    return MLP(
        fc=init_linear(
            k_fc, d_model, d_hidden, axes=("embed", "mlp"), bias=bias, std=std, dtype=dtype
        ),
        proj=init_linear(
            k_proj, d_hidden, d_model, axes=("mlp", "embed"), bias=bias, std=out_std, dtype=dtype
        ),
    )


@jax.named_scope("mlp")
def mlp(p: MLP, x: Array, *, activation: str) -> Array:
    """``(B, T, D)`` -> ``(B, T, D)``; ``activation`` names one of ``ACTIVATIONS``."""
    h = matmul(p.fc, x)  # (B, T, F)
    return linear(p.proj, recomputed_activation(ACTIVATIONS[activation], h, p.fc.bias))


def recomputed_activation(activation: Callable, h: Array, bias: Array | None) -> Array:
    """``activation(h + bias)`` whose backward recomputes the bias add and the activation
    from ``h``, the matmul's output, instead of saving their intermediates (GELU's tanh: a
    write and a read of a ``(B, T, F)`` array per layer), as torch.compile's partitioner
    recomputes pointwise ops."""
    return jax.checkpoint(lambda h, bias: activation(add_bias(h, bias)))(h, bias)


def init_glu(
    key: Array, d_model: int, d_hidden: int, *, bias: bool, std: float, out_std: float, dtype
) -> GLU:
    """GLU params: N(0, std^2) ``gate`` and ``up``, N(0, out_std^2) ``down``, zero biases if
    ``bias``."""
    k_gate, k_up, k_down = jax.random.split(key, 3)
    d, f = d_model, d_hidden
    return GLU(
        gate=init_linear(k_gate, d, f, axes=("embed", "mlp"), bias=bias, std=std, dtype=dtype),
        up=init_linear(k_up, d, f, axes=("embed", "mlp"), bias=bias, std=std, dtype=dtype),
        down=init_linear(k_down, f, d, axes=("mlp", "embed"), bias=bias, std=out_std, dtype=dtype),
    )


@jax.named_scope("glu")
def glu(p: GLU, x: Array, *, activation: str) -> Array:
    """``(B, T, D)`` -> ``(B, T, D)``; the gate's ``activation`` names one of ``ACTIVATIONS``."""
    layers = (p.gate, p.up)
    y = stacked_matmul(layers, x)  # (B, T, 2, F)
    return linear(p.down, recomputed_activation(_gated(activation), y, stacked_bias(layers)))


def _gated(activation: str):
    """``act(gate) * up`` of the stacked ``(..., 2, F)`` gate and up."""
    return lambda y: ACTIVATIONS[activation](y[..., 0, :]) * y[..., 1, :]
