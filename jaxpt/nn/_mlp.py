"""Feed-forward mixers: the GPT-2 MLP and the gated linear unit (Shazeer, 2020)."""

from __future__ import annotations

import equinox as eqx
import jax
from jax import Array

from jaxpt.nn._linear import Linear, init_linear, linear, residual_out_std


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


def init_mlp(key: Array, cfg) -> MLP:
    """MLP params for the model config ``cfg`` (n_embed, n_mlp_hidden, mlp_bias, ...)."""
    k_fc, k_proj = jax.random.split(key)
    d, f, bias, dtype = cfg.n_embed, cfg.n_mlp_hidden, cfg.mlp_bias, cfg.param_dtype
    return MLP(
        fc=init_linear(
            k_fc, d, f, axes=("embed", "mlp"), bias=bias, std=cfg.init_stddev, dtype=dtype
        ),
        proj=init_linear(
            k_proj, f, d, axes=("mlp", "embed"), bias=bias, std=residual_out_std(cfg), dtype=dtype
        ),
    )


def mlp(p: MLP, x: Array, cfg) -> Array:
    """``(B, T, D)`` -> ``(B, T, D)`` with activation ``cfg.activation``."""
    return linear(p.proj, ACTIVATIONS[cfg.activation](linear(p.fc, x)))


def init_glu(key: Array, cfg) -> GLU:
    """GLU params for the model config ``cfg``."""
    k_gate, k_up, k_down = jax.random.split(key, 3)
    d, f, bias, dtype, std = (
        cfg.n_embed,
        cfg.n_mlp_hidden,
        cfg.mlp_bias,
        cfg.param_dtype,
        cfg.init_stddev,
    )
    return GLU(
        gate=init_linear(k_gate, d, f, axes=("embed", "mlp"), bias=bias, std=std, dtype=dtype),
        up=init_linear(k_up, d, f, axes=("embed", "mlp"), bias=bias, std=std, dtype=dtype),
        down=init_linear(
            k_down, f, d, axes=("mlp", "embed"), bias=bias, std=residual_out_std(cfg), dtype=dtype
        ),
    )


def glu(p: GLU, x: Array, cfg) -> Array:
    """``(B, T, D)`` -> ``(B, T, D)``, gate activation ``cfg.activation``."""
    gate = ACTIVATIONS[cfg.activation](linear(p.gate, x))
    return linear(p.down, gate * linear(p.up, x))
