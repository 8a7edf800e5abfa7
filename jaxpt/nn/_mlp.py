"""Feed-forward mixers: the GPT-2 MLP and the gated linear unit (Shazeer, 2020)."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
from jax import Array

from jaxpt.nn._axes import constrain
from jaxpt.nn._linear import Linear, init_linear, linear, stacked_linear


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


@functools.partial(jax.checkpoint, static_argnums=0, prevent_cse=False)
def activate(activation: str, x: Array, up: Array | None = None) -> Array:
    """``act(x)``, or ``act(x) * up`` for a gated unit; ``activation`` names one of
    ``ACTIVATIONS``. Any shape.

    Its backward keeps only ``x`` and ``up`` and recomputes the activation's elementwise
    intermediates from them. Plain autodiff keeps those intermediates for the backward (four
    more ``(B, T, F)`` arrays for GELU's tanh form), and under ``lax.scan`` (``scan_layers``)
    each kept array is written into an ``(L, B, T, F)`` stack in the forward and read back in
    the backward. Without the CSE barrier (``prevent_cse=False``) an unrolled step runs as fast
    as with plain autodiff (``bench/README.md``).
    """
    y = ACTIVATIONS[activation](x)
    return y if up is None else y * up


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


def _hidden(h: Array) -> Array:
    """The hidden activations ``(B, T, F)`` pinned to the batch's split and the ``mlp`` rule's
    other axes (tensor): left to itself, the partitioner could give them (and their gradient)
    the output projection's FSDP split of F and then fail to move them back."""
    return constrain(h, ("batch", None, "mlp"))


@jax.named_scope("mlp")
def mlp(p: MLP, x: Array, *, activation: str) -> Array:
    """``(B, T, D)`` -> ``(B, T, D)``; ``activation`` names one of ``ACTIVATIONS``."""
    return linear(p.proj, _hidden(activate(activation, linear(p.fc, x))))


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
    gate, up = stacked_linear((p.gate, p.up), x)  # (B, T, F) each
    return linear(p.down, _hidden(activate(activation, gate, up)))
