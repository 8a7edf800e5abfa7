"""Mixture-of-experts feed-forward layers.

Top-k routing with a per-sequence expert capacity as in vmoe (Riquelme et al., 2021;
``vmoe/nn/routing.py``), with the Switch load-balance loss (Fedus et al., 2021) and the ST-MoE
router z-loss (Zoph et al., 2022); and Soft MoE (Puigcerver et al., 2023).

The E experts are feed-forward networks stored as stacked ``(E, ...)`` arrays whose leading
logical axis is ``"expert"``, so expert parallelism is a sharding rule. Tokens reach the expert
buffers ``(B, E, C, D)`` through per-sequence dispatch and combine tensors ``(B, T, E, C)`` and
einsums (no scatter of activations, no ``(T, T)`` array for top-k routing).

Causality. Top-k routing with token-order priority (``expert_weight_priority=False``) is
causal: choices claim buffer slots token by token, so whether token ``t`` is dropped depends
only on tokens ``<= t``. With ``expert_weight_priority=True`` tokens claim slots in order of
their top-1 router probability, so a later token can take an earlier token's slot: an earlier
output can change with a later token. Soft MoE mixes every token of a sequence into every slot
by construction. jaxpt marks both as non-causal (``jaxpt.models.ModelConfig.is_causal``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from jaxpt.nn._axes import HasAxes
from jaxpt.nn._linear import Linear, init_linear, linear, normal_or_zeros
from jaxpt.nn._mlp import ACTIVATIONS


class ExpertLinear(HasAxes):
    """E independent ``in -> out`` layers: ``y[e] = x[e] @ weight[e] + bias[e]``."""

    weight: Array  # (E, in, out)
    bias: Array | None  # (E, out)
    axes: tuple[str | None, str | None] = eqx.field(static=True)  # logical names of (in, out)

    def param_axes(self):
        return {"weight": ("expert", *self.axes), "bias": ("expert", self.axes[1])}


def init_expert_linear(
    key: Array,
    n_experts: int,
    d_in: int,
    d_out: int,
    *,
    axes: tuple[str | None, str | None],
    bias: bool,
    std: float,
    dtype,
) -> ExpertLinear:
    """``n_experts`` stacked ``d_in -> d_out`` layers, N(0, std^2) weights and zero bias."""
    weight = normal_or_zeros(key, (n_experts, d_in, d_out), std, dtype)
    return ExpertLinear(weight, jnp.zeros((n_experts, d_out), dtype) if bias else None, axes)


def expert_linear(p: ExpertLinear, x: Array) -> Array:
    """Expert ``e`` maps its buffer ``x[:, e]``. ``(B, E, C, in)`` -> ``(B, E, C, out)``."""
    y = jnp.einsum("beci,eio->beco", x, p.weight.astype(x.dtype))
    return y if p.bias is None else y + p.bias[:, None, :].astype(x.dtype)


class Experts(eqx.Module):
    """E feed-forward experts: ``down(act(gate(x)) * up(x))`` (GLU) or ``down(act(up(x)))``."""

    up: ExpertLinear  # D -> F
    gate: ExpertLinear | None  # D -> F, GLU experts only
    down: ExpertLinear  # F -> D


def init_experts(
    key: Array,
    n_experts: int,
    d_model: int,
    d_hidden: int,
    *,
    gated: bool,
    bias: bool,
    std: float,
    out_std: float,
    dtype,
) -> Experts:
    """``n_experts`` GLU (``gated``) or MLP experts ``d_model -> d_hidden -> d_model``:
    N(0, std^2) ``up`` and ``gate``, N(0, out_std^2) ``down``, zero biases if ``bias``."""
    k_up, k_gate, k_down = jax.random.split(key, 3)
    d, f = d_model, d_hidden
    make = functools.partial(init_expert_linear, n_experts=n_experts, bias=bias, dtype=dtype)
    return Experts(
        up=make(k_up, d_in=d, d_out=f, axes=("embed", "mlp"), std=std),
        gate=make(k_gate, d_in=d, d_out=f, axes=("embed", "mlp"), std=std) if gated else None,
        down=make(k_down, d_in=f, d_out=d, axes=("mlp", "embed"), std=out_std),
    )


@jax.named_scope("experts")
def experts(p: Experts, x: Array, *, activation: str) -> Array:
    """Every expert on its own buffer; ``activation`` names one of ``ACTIVATIONS``.

    ``(B, E, C, D)`` -> ``(B, E, C, D)``.
    """
    act = ACTIVATIONS[activation]
    if p.gate is None:
        h = act(expert_linear(p.up, x))
    else:
        h = act(expert_linear(p.gate, x)) * expert_linear(p.up, x)
    return expert_linear(p.down, h)


# ---------------------------------------------------------------- top-k routing


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """How a top-k mixture of experts routes tokens (hashable, so a static jit argument)."""

    n_experts: int  # E
    top_k: int  # experts per token
    load_factor: float  # slots per expert: ceil(load_factor * top_k * max(1, T / E))
    expert_weight_priority: bool  # surest tokens claim slots first (not causal); else in order
    router_noise: float = 0.0  # eps of the training-time noise: logits * U(1 - eps, 1 + eps)


class MoE(eqx.Module):
    """A top-k routed mixture of experts."""

    router: Linear  # D -> E, applied in float32
    experts: Experts


def init_moe(
    key: Array,
    d_model: int,
    d_hidden: int,
    n_experts: int,
    *,
    gated: bool,
    bias: bool,
    router_bias: bool,
    std: float,
    out_std: float,
    dtype,
) -> MoE:
    """MoE params: an N(0, std^2) router (with a zero bias if ``router_bias``) and
    ``init_experts``'s experts."""
    k_router, k_experts = jax.random.split(key)
    router = init_linear(
        k_router, d_model, n_experts, axes=("embed", None), bias=router_bias, std=std, dtype=dtype
    )
    experts = init_experts(
        k_experts,
        n_experts,
        d_model,
        d_hidden,
        gated=gated,
        bias=bias,
        std=std,
        out_std=out_std,
        dtype=dtype,
    )
    return MoE(router, experts)


def expert_capacity(spec: MoESpec, t: int) -> int:
    """Buffer slots per expert and sequence of length ``t`` (vmoe's scheme).

    ``ceil(load_factor * top_k * max(1, t / n_experts))``, rounded up after discarding float
    noise below 1e-9 (so 1.1 * 2 * 5 is 11, not 12), and at most ``t``: a token takes at most
    one slot per expert, so more slots would stay empty.
    """
    slots = spec.load_factor * spec.top_k * max(1.0, t / spec.n_experts)
    return min(math.ceil(round(slots, 9)), t)


def sequence_capacity(spec: MoESpec, valid: Array) -> Array:
    """``(B, T)`` bool -> ``(B,)`` int: :func:`expert_capacity` of each row's real tokens.

    T in the capacity formula counts a sequence's real tokens, so a padded sequence routes
    exactly as it would alone.
    """
    table = jnp.asarray([expert_capacity(spec, n) for n in range(valid.shape[1] + 1)])
    return table[valid.sum(axis=1)]


class Routing(NamedTuple):
    """Where each token's top-k choices go; ``k`` is the choice rank, best first."""

    expert: Array  # (B, T, k) int: the chosen experts
    weight: Array  # (B, T, k) float32: their router probabilities (not renormalised over k)
    slot: Array  # (B, T, k) int: buffer position in that expert, -1 where dropped or padding


def route(
    probs: Array,
    valid: Array,
    *,
    top_k: int,
    capacity: int | Array,
    expert_weight_priority: bool,
) -> Routing:
    """Top-k choices per token and their expert-buffer slots, per sequence.

    Choices claim slots in priority order and a choice that finds its expert's ``capacity``
    slots taken is dropped (``capacity``: one int, or ``(B,)`` per sequence). Token order
    (``expert_weight_priority=False``): token by token, each token's choices best first, so a
    token's slots depend only on earlier tokens (causal).
    Weight priority (vmoe's ``batch_priority``): tokens ranked by their top-1 probability,
    highest first (ties in token order), and every token's first choice is placed before any
    second choice. Padding (``valid`` False) takes no slot.

    Args:
        probs: ``(B, T, E)`` router probabilities; valid: ``(B, T)`` bool.
    """
    weight, expert = jax.lax.top_k(probs, top_k)  # (B, T, k)
    chosen = jax.nn.one_hot(expert, probs.shape[-1], dtype=jnp.int32)  # (B, T, k, E)
    chosen = chosen * valid[:, :, None, None]
    priority = weight[..., 0] if expert_weight_priority else None
    position = _position_in_expert(chosen, priority)  # (B, T, k), -1 for padding
    limit = jnp.reshape(jnp.asarray(capacity), (-1, 1, 1))  # (B or 1, 1, 1)
    return Routing(expert, weight, jnp.where(position < limit, position, -1))


def _position_in_expert(chosen: Array, priority: Array | None) -> Array:
    """How many choices of the same expert come earlier in claiming order; -1 where unchosen.

    Args:
        chosen: ``(B, T, k, E)`` one-hot choices; priority: ``(B, T)`` or None (token order).
    Returns:
        ``(B, T, k)`` int.
    """
    b, t, k, e = chosen.shape
    if priority is None:  # token-major: (t, k) pairs in token order
        return _running_count(chosen.reshape(b, t * k, e)).reshape(b, t, k)
    rank = jnp.argsort(-priority, axis=1)  # (B, T) stable, highest priority first
    ranked = jnp.take_along_axis(chosen, rank[:, :, None, None], axis=1)
    flat = ranked.transpose(0, 2, 1, 3).reshape(b, k * t, e)  # choice-major: first choices first
    position = _running_count(flat).reshape(b, k, t).transpose(0, 2, 1)  # (B, T ranked, k)
    return jnp.take_along_axis(position, jnp.argsort(rank, axis=1)[:, :, None], axis=1)


def _running_count(flat: Array) -> Array:
    """``(B, N, E)`` one-hot rows -> ``(B, N)``: earlier rows with the same expert (-1: empty)."""
    return (jnp.cumsum(flat, axis=1) * flat).sum(-1) - 1


def noisy_router_logits(logits: Array, eps: float, key: Array | None) -> Array:
    """The original JaxPT's router noise (``add_noise``): ``logits * U(1 - eps, 1 + eps)``,
    one draw per logit; ``logits`` unchanged without a key (evaluation, generation) or at 0.

    ``(B, T, E)`` float32 -> ``(B, T, E)``.
    """
    if key is None or eps == 0.0:
        return logits
    return logits * jax.random.uniform(key, logits.shape, logits.dtype, 1.0 - eps, 1.0 + eps)


def router_losses(logits: Array, probs: Array, expert: Array, valid: Array) -> dict[str, Array]:
    """Auxiliary router losses over the valid tokens of the whole batch.

    ``load_balance_loss = E * sum_e frac_tokens[e] * mean_prob[e]`` (Switch), where
    ``frac_tokens[e]`` = (valid tokens whose top-k includes ``e``) / (``top_k`` * valid tokens),
    counted before capacity drops, so ``sum_e frac_tokens[e] = 1`` and a uniform router scores 1;
    ``mean_prob[e]`` is the mean router probability of ``e``. Only ``mean_prob`` carries
    gradient. ``z_loss`` is the mean of ``logsumexp(logits) ** 2`` (ST-MoE).

    Args:
        logits, probs: ``(B, T, E)`` float32; expert: ``(B, T, k)`` int; valid: ``(B, T)`` bool.
    """
    n_experts, top_k = probs.shape[-1], expert.shape[-1]
    w = valid.astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    frac_tokens = jnp.einsum("btke,bt->e", jax.nn.one_hot(expert, n_experts), w) / (top_k * n)
    mean_prob = jnp.einsum("bte,bt->e", probs, w) / n
    z = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
    return {
        "load_balance_loss": n_experts * jnp.sum(frac_tokens * mean_prob),
        "z_loss": jnp.sum(w * jnp.square(z)) / n,
    }


@jax.named_scope("moe")
def moe(
    p: MoE,
    x: Array,
    spec: MoESpec,
    *,
    activation: str,
    mask: Array | None,
    key: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Top-k mixture of experts with per-sequence capacity (see :func:`route`).

    A token's output is the sum over its kept choices of router probability times expert
    output (raw softmax probabilities, as vmoe and the original JaxPT; not renormalised over
    the top k). Dropped choices add nothing: the residual stream carries the token.

    Args:
        x: ``(B, T, D)`` in the compute dtype; the router runs in float32.
        activation: the experts' (``ACTIVATIONS``).
        mask: optional ``(B, T)`` bool, True for real tokens; padding takes no expert slot,
            gets a zero output, is left out of the losses and of T in the capacity.
        key: router noise at ``spec.router_noise`` (:func:`noisy_router_logits`, training);
            the z-loss reads the logits before the noise, routing and the load-balance loss
            the probabilities after it, as in the original.
    Returns:
        ``(B, T, D)`` and ``{"load_balance_loss", "z_loss"}`` (:func:`router_losses`).
    """
    b, t, _ = x.shape
    valid = jnp.ones((b, t), bool) if mask is None else mask
    logits = linear(p.router, x.astype(jnp.float32))  # (B, T, E)
    probs = jax.nn.softmax(noisy_router_logits(logits, spec.router_noise, key), axis=-1)
    capacity = expert_capacity(spec, t)  # buffer slots: the capacity of an unpadded row
    r = route(
        probs,
        valid,
        top_k=spec.top_k,
        capacity=sequence_capacity(spec, valid),
        expert_weight_priority=spec.expert_weight_priority,
    )
    to_expert = jax.nn.one_hot(r.expert, spec.n_experts, dtype=x.dtype)  # (B, T, k, E)
    to_slot = jax.nn.one_hot(r.slot, capacity, dtype=x.dtype)  # (B, T, k, C), 0 where dropped
    dispatch = jnp.einsum("btke,btkc->btec", to_expert, to_slot)  # (B, T, E, C) 0 / 1
    combine = jnp.einsum("btke,btkc,btk->btec", to_expert, to_slot, r.weight.astype(x.dtype))
    buffers = jnp.einsum("btec,btd->becd", dispatch, x)  # (B, E, C, D)
    y = jnp.einsum("btec,becd->btd", combine, experts(p.experts, buffers, activation=activation))
    return y, router_losses(logits, probs, r.expert, valid)


# ---------------------------------------------------------------- Soft MoE


class SoftMoE(eqx.Module):
    """Soft MoE: every slot is a weighted average of the sequence's tokens."""

    phi: Linear  # D -> E * C slot logits, applied in float32
    experts: Experts


def init_soft_moe(
    key: Array,
    d_model: int,
    d_hidden: int,
    n_experts: int,
    *,
    slots: int,
    gated: bool,
    bias: bool,
    std: float,
    out_std: float,
    dtype,
) -> SoftMoE:
    """Soft MoE params: ``slots`` per expert read through an N(0, std^2) ``phi``, and
    ``init_experts``'s experts."""
    k_phi, k_experts = jax.random.split(key)
    phi = init_linear(
        k_phi, d_model, n_experts * slots, axes=("embed", None), bias=False, std=std, dtype=dtype
    )
    experts = init_experts(
        k_experts,
        n_experts,
        d_model,
        d_hidden,
        gated=gated,
        bias=bias,
        std=std,
        out_std=out_std,
        dtype=dtype,
    )
    return SoftMoE(phi, experts)


def soft_moe_weights(logits: Array, valid: Array) -> tuple[Array, Array]:
    """Dispatch and combine weights from slot logits ``(B, T, E, C)`` (float32).

    ``dispatch`` is a softmax over the valid tokens (each slot averages tokens);
    ``combine`` is a softmax over all ``E * C`` slots (each token averages slot outputs).
    Both are ``(B, T, E, C)``; dispatch is 0 at padding.
    """
    b, t = valid.shape
    masked = jnp.where(valid[:, :, None, None], logits, jnp.finfo(logits.dtype).min)
    dispatch = jax.nn.softmax(masked, axis=1)
    combine = jax.nn.softmax(logits.reshape(b, t, -1), axis=-1).reshape(logits.shape)
    return dispatch, combine


@jax.named_scope("soft_moe")
def soft_moe(p: SoftMoE, x: Array, *, activation: str, mask: Array | None) -> Array:
    """Soft MoE (Puigcerver et al., 2023). Not causal: every slot reads the whole sequence.

    Args:
        x: ``(B, T, D)``; activation: the experts' (``ACTIVATIONS``).
        mask: optional ``(B, T)`` bool, True for real tokens (padding is not
            read into any slot and gets a zero output).
    Returns:
        ``(B, T, D)``. Soft MoE has no auxiliary losses.
    """
    b, t, _ = x.shape
    valid = jnp.ones((b, t), bool) if mask is None else mask
    n_experts = p.experts.up.weight.shape[0]  # (E, D, F)
    logits = linear(p.phi, x.astype(jnp.float32)).reshape(b, t, n_experts, -1)
    dispatch, combine = soft_moe_weights(logits, valid)  # (B, T, E, C)
    slots = jnp.einsum("btec,btd->becd", dispatch.astype(x.dtype), x)  # (B, E, C, D)
    expert_out = experts(p.experts, slots, activation=activation)
    y = jnp.einsum("btec,becd->btd", combine.astype(x.dtype), expert_out)
    return jnp.where(valid[..., None], y, 0)
