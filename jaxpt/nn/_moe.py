"""Mixture-of-experts feed-forward layers.

Top-k routing with a per-sequence expert capacity as in vmoe (Riquelme et al., 2021;
``vmoe/nn/routing.py``), with the Switch load-balance loss (Fedus et al., 2021) and the ST-MoE
router z-loss (Zoph et al., 2022); and Soft MoE (Puigcerver et al., 2023).

The E experts are feed-forward networks stored as stacked ``(E, ...)`` arrays whose leading
logical axis is ``"expert"``, so expert parallelism is a sharding rule.

Top-k dispatch. :func:`route` gives every choice its expert and its slot in that expert's
per-sequence capacity C; :func:`expert_rows` turns (expert, sequence, slot) into a row of one
``(N, D)`` matrix grouped by expert; the tokens are gathered into those rows, the experts run
as grouped matmuls, and each token gathers its ``k`` output rows back, weighted. Only
``(B, T, k)`` indices and ``(B, T, E)`` counts are built on the way. The one-hot formulation
this replaces (GShard, vmoe: dispatch and combine tensors ``(B, T, E, C)`` and einsums) spent
``4 E C D``, about ``4 k load_factor T D``, forward FLOPs per token moving tokens: at Tiny_MoE's
shape (T = 2048, k = 2, load factor 1.1, D = 576, F = 2304) 2/3 of its GLU experts' own
``6 k D F``, at Tiny_MoE_2's 1.25 times its MLP experts' ``4 k D F``; and it kept two
``(B, T, E, C)`` tensors (4.5K entries per token) for the backward pass. The gathers move
``k D`` values per token.

The grouped matmuls (``MoESpec.grouped_matmul``): ``"padded"`` runs each expert on all its
``B * C`` slots as one batched matmul ``(E, B C, D) x (E, D, F)``, empty slots included (about
``load_factor`` times the kept choices' FLOPs, with cuBLAS-friendly equal groups);
``"ragged"`` packs the kept choices and runs ``jax.lax.ragged_dot`` over exactly them. Where
the backend has no grouped-matmul kernel, ``ragged_dot`` expands to a dense product over every
expert (E times the FLOPs: XLA's CPU lowering, and XLA GPU's for the weight gradient unless its
cuDNN ragged-dot fusion takes it), so ``"padded"`` is the default.

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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpt.errors import ConfigError
from jaxpt.nn._axes import HasAxes, activation_sharding_of
from jaxpt.nn._linear import Linear, add_bias, init_linear, linear, normal_or_zeros
from jaxpt.nn._mlp import activate

GROUPED_MATMULS = ("ragged", "padded")  # MoESpec.grouped_matmul


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
    return add_bias(y, None if p.bias is None else p.bias[:, None, :])


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
def experts(p: Experts, x: Array, *, activation: str, layer=expert_linear) -> Array:
    """Every expert on its own buffer; ``activation`` names one of ``ACTIVATIONS``.

    ``(B, E, C, D)`` -> ``(B, E, C, D)`` with :func:`expert_linear`; ``layer`` may map other
    layouts of the experts' rows (:func:`ragged_expert_linear`).
    """
    up = layer(p.up, x)
    h = activate(activation, up) if p.gate is None else activate(activation, layer(p.gate, x), up)
    return layer(p.down, h)


# ---------------------------------------------------------------- top-k routing


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """How a top-k mixture of experts routes tokens (hashable, so a static jit argument)."""

    n_experts: int  # E
    top_k: int  # experts per token
    load_factor: float  # slots per expert: ceil(load_factor * top_k * max(1, T / E))
    expert_weight_priority: bool  # surest tokens claim slots first (not causal); else in order
    grouped_matmul: str  # "padded" or "ragged": how the experts run (see expert_rows)
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
    router, experts = _router_and_experts(
        key,
        d_model,
        d_hidden,
        n_experts,
        n_logits=n_experts,
        router_bias=router_bias,
        gated=gated,
        bias=bias,
        std=std,
        out_std=out_std,
        dtype=dtype,
    )
    return MoE(router, experts)


def _router_and_experts(
    key: Array,
    d_model: int,
    d_hidden: int,
    n_experts: int,
    *,
    n_logits: int,
    router_bias: bool,
    gated: bool,
    bias: bool,
    std: float,
    out_std: float,
    dtype,
) -> tuple[Linear, Experts]:
    """A ``D -> n_logits`` N(0, std^2) router (zero bias if ``router_bias``) and
    ``init_experts``'s experts: what a top-k MoE and a Soft MoE layer both hold."""
    k_router, k_experts = jax.random.split(key)
    router = init_linear(
        k_router, d_model, n_logits, axes=("embed", None), bias=router_bias, std=std, dtype=dtype
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
    return router, experts


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


class ExpertRows(NamedTuple):
    """Where the kept top-k choices sit in the experts' grouped ``(N, D)`` matrix of rows."""

    row: Array  # (B, T, k) int: the choice's row; N (out of range) where dropped or padding
    # (E,) int: each expert's rows, one run per expert in expert order; None: E equal groups
    group_sizes: Array | None
    n_rows: int  # N


def expert_rows(r: Routing, n_experts: int, capacity: int, *, padded: bool) -> ExpertRows:
    """Rows for the kept choices of :func:`route`, grouped by expert, in slot order.

    ``padded``: expert ``e`` owns rows ``[e * B * C, (e + 1) * B * C)`` (sequence ``b``'s slots at
    ``b * C``), so the groups are equal and every expert can run as one batched matmul over
    ``(E, B * C, D)``. Otherwise the kept choices are packed: expert ``e``'s run starts where
    ``e - 1``'s ends, the runs together are as long as the choices kept, and the rest of the
    ``N = B * min(T * k, E * C)`` rows is unused (``jax.lax.ragged_dot`` over ``group_sizes``).

    Args:
        r: the routing of ``(B, T)`` tokens; capacity: ``C``, the slots of an unpadded row.
    """
    b, t, k = r.slot.shape
    kept = r.slot >= 0
    if padded:
        n_rows = n_experts * b * capacity
        row = (r.expert * b + jnp.arange(b)[:, None, None]) * capacity + r.slot
        group_sizes = None
    else:
        n_rows = b * min(t * k, n_experts * capacity)
        per_sequence = jnp.einsum(  # (B, E): kept choices of each sequence and expert
            "btke,btk->be", jax.nn.one_hot(r.expert, n_experts, dtype=jnp.int32), kept
        )
        group_sizes = per_sequence.sum(0)
        group_start = jnp.cumsum(group_sizes) - group_sizes  # (E,)
        sequence_start = jnp.cumsum(per_sequence, axis=0) - per_sequence  # (B, E)
        start = group_start[None, :] + sequence_start  # (B, E): row of slot 0
        row = jnp.take_along_axis(start[:, None, :], r.expert.reshape(b, 1, -1), axis=2)
        row = row.reshape(b, t, k) + r.slot
    return ExpertRows(jnp.where(kept, row, n_rows), group_sizes, n_rows)


def gather_rows(x: Array, rows: ExpertRows) -> Array:
    """The experts' input rows: ``(B, T, D)`` -> ``(N, D)``, zero where no choice lands.

    A gather, and so is its gradient (:func:`_take_rows`): no one-hot dispatch tensor and no
    scatter.
    """
    b, t, k = rows.row.shape
    token = jnp.broadcast_to(jnp.arange(b * t).reshape(b, t, 1), (b, t, k))
    source = jnp.full((rows.n_rows,), b * t).at[rows.row.ravel()].set(token.ravel(), mode="drop")
    return _take_rows(x.reshape(b * t, -1), source, rows.row.reshape(b * t, k))


def combine_rows(y: Array, rows: ExpertRows, weight: Array) -> Array:
    """Each token's kept choices' outputs weighted and summed: ``(N, D)`` -> ``(B, T, D)``.

    Args:
        y: the experts' output rows; weight: ``(B, T, k)`` the choices' router probabilities.
    """
    b, t, k = rows.row.shape
    choice = jnp.arange(b * t * k)
    source = jnp.full((rows.n_rows,), b * t * k).at[rows.row.ravel()].set(choice, mode="drop")
    picked = _take_rows(y, rows.row.ravel(), source[:, None]).reshape(b, t, k, -1)
    return jnp.einsum("btkd,btk->btd", picked, weight.astype(y.dtype))


@jax.custom_vjp
def _take_rows(x: Array, index: Array, readers: Array) -> Array:
    """``x[index]``, zero rows where ``index`` is out of range, with a gather for gradient.

    Args:
        x: ``(M, D)``; index: ``(N,)`` int.
        readers: ``(M, r)`` int: the positions of ``index`` that read each row of ``x`` (out
            of range for fewer than ``r``), so the gradient of ``x`` is the sum of the
            gradient's rows at ``readers`` (the transposed gather, without a scatter-add).
    """
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def _take_rows_forward(x: Array, index: Array, readers: Array):
    return _take_rows(x, index, readers), readers


def _take_rows_backward(readers: Array, grad: Array):
    read = jnp.take(grad, readers, axis=0, mode="fill", fill_value=0)  # (M, r, D)
    return read.sum(1), None, None


_take_rows.defvjp(_take_rows_forward, _take_rows_backward)


def ragged_expert_linear(p: ExpertLinear, x: Array, group_sizes: Array) -> Array:
    """Rows grouped by expert (``group_sizes``, in expert order) through their expert's layer:
    ``(N, in)`` -> ``(N, out)``; a grouped matmul (``jax.lax.ragged_dot``)."""
    y = jax.lax.ragged_dot(x, p.weight.astype(x.dtype), group_sizes)
    if p.bias is None:
        return y
    n_experts = p.weight.shape[0]
    expert = jnp.repeat(jnp.arange(n_experts), group_sizes, total_repeat_length=x.shape[0])
    return add_bias(y, p.bias[expert])


def grouped_experts(p: Experts, x: Array, group_sizes: Array | None, *, activation: str) -> Array:
    """:func:`experts` on rows grouped by expert (:func:`expert_rows`): ``(N, D)`` ->
    ``(N, D)``; ``group_sizes`` ``(E,)``, or None for E equal groups."""
    if group_sizes is None:  # padded: E equal groups, one batched matmul per layer
        n_experts = p.up.weight.shape[0]
        y = experts(p, x.reshape(1, n_experts, -1, x.shape[-1]), activation=activation)
        return y.reshape(x.shape)
    layer = functools.partial(ragged_expert_linear, group_sizes=group_sizes)
    return experts(p, x, activation=activation, layer=layer)


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

    While a sharded step is traced (``jaxpt.sharding.activation_sharding``) each device routes
    and dispatches its own sequences (:func:`sharded_route_and_dispatch`).

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
    batch = activation_sharding_of(x.shape, ("batch", None, None))
    run = functools.partial(route_and_dispatch, spec=spec, activation=activation)
    if batch is not None:
        run = functools.partial(sharded_route_and_dispatch, batch=batch, run=run)
    y, expert = run(p.experts, x, probs, valid)
    return y, router_losses(logits, probs, expert, valid)


def route_and_dispatch(
    p: Experts,
    x: Array,
    probs: Array,
    valid: Array,
    *,
    spec: MoESpec,
    activation: str,
    run_experts=grouped_experts,
) -> tuple[Array, Array]:
    """:func:`route` the tokens, gather them into expert rows (:func:`expert_rows`), run the
    experts (``run_experts``, :func:`grouped_experts`'s signature) and combine.

    Args:
        x: ``(B, T, D)``; probs: ``(B, T, E)`` router probabilities; valid: ``(B, T)`` bool.
    Returns:
        ``(B, T, D)`` and the chosen experts ``(B, T, k)``.
    """
    r = route(
        probs,
        valid,
        top_k=spec.top_k,
        capacity=sequence_capacity(spec, valid),
        expert_weight_priority=spec.expert_weight_priority,
    )
    capacity = expert_capacity(spec, x.shape[1])  # slots: the capacity of an unpadded row
    rows = expert_rows(r, spec.n_experts, capacity, padded=spec.grouped_matmul == "padded")
    y = run_experts(p, gather_rows(x, rows), rows.group_sizes, activation=activation)
    return combine_rows(y, rows, r.weight), r.expert


# ---------------------------------------------------------------- expert parallelism


def sharded_route_and_dispatch(
    p: Experts, x: Array, probs: Array, valid: Array, *, batch: NamedSharding, run
) -> tuple[Array, ...]:
    """``run`` (:func:`route_and_dispatch` or :func:`soft_dispatch`) on each device's own
    sequences, in ``shard_map``; its outputs ``(y, ...)`` are split like the batch.

    Routing is per sequence, so each device routes its sequences alone. Where the experts are
    split over mesh axes that also split the batch (``mesh.expert``, by the ``"expert"`` rule),
    the expert rows travel to their experts' devices and back with two all-to-alls
    (:func:`expert_parallel_experts`); otherwise each device runs every expert, their weights
    gathered at the ``shard_map`` boundary. Each expert's hidden width stays split where the
    ``"mlp"`` rule splits it (tensor parallelism, :func:`_tensor_parallel`).

    Args:
        x: ``(B, T, D)``; probs: ``(B, T, ...)``, what ``run`` routes by (top-k: router
            probabilities, Soft MoE: slot logits); valid: ``(B, T)`` bool.
        batch: the sharding of ``(B, T, D)`` activations (``activation_sharding_of``).
    """
    batch_axes = _axes_of(batch.spec[0])
    if not batch_axes:
        return run(p, x, probs, valid)
    weight_spec = activation_sharding_of(p.up.weight.shape, ("expert", None, "mlp")).spec
    expert_axes = expert_parallel_axes(weight_spec[0], batch_axes)
    if expert_axes:
        groups = math.prod(batch.mesh.shape[a] for a in expert_axes)
        run_experts = functools.partial(expert_parallel_experts, axes=expert_axes, n_groups=groups)
        run = functools.partial(run, run_experts=run_experts)
    mlp_axes = tuple(a for a in _axes_of(weight_spec[2]) if a not in batch_axes)
    rows = P(batch.spec[0])  # arrays (B, ...) split like the batch
    return jax.shard_map(
        functools.partial(_tensor_parallel, run=run, mlp_axes=mlp_axes),
        mesh=batch.mesh,
        in_specs=(_expert_specs(p, expert_axes, mlp_axes), rows, rows, rows),
        out_specs=rows,
    )(p, x, probs, valid)


def expert_parallel_axes(expert_entry, batch_axes: tuple[str, ...]) -> tuple[str, ...]:
    """The mesh axes that send expert rows to other devices: those splitting the experts
    (``expert_entry``, the PartitionSpec entry of their ``"expert"`` dimension) when every one
    of them also splits the batch (the tokens), else none."""
    expert_axes = _axes_of(expert_entry)
    return expert_axes if set(expert_axes) <= set(batch_axes) else ()


def check_grouped_matmul(grouped_matmul: str, expert_axes: tuple[str, ...]) -> None:
    """Raises ConfigError where ragged experts (``grouped_matmul``) would be split over the
    mesh ``expert_axes`` (:func:`expert_parallel_axes`): the all-to-alls move padded rows."""
    if grouped_matmul == "ragged" and expert_axes:
        raise ConfigError(
            "model.moe_matmul='ragged' cannot split the experts over the mesh (mesh.expert > 1); "
            "use model.moe_matmul='padded'."
        )


def expert_parallel_experts(
    p: Experts,
    x: Array,
    group_sizes: Array | None,
    *,
    activation: str,
    axes: tuple[str, ...],
    n_groups: int,
) -> Array:
    """:func:`grouped_experts` inside ``shard_map`` with the experts split into ``n_groups``
    groups of ``E / n_groups`` over the mesh ``axes`` (``p``: this device's group).

    ``x`` is this device's padded expert rows ``(E B C, D)`` (its own sequences); one
    all-to-all turns them into its experts' rows from every device, ``(E / n_groups,
    n_groups B C, D)``, and after the experts a second one brings the outputs back. Both move
    fixed-size buffers: the padded layout (``jax.lax.ragged_all_to_all`` would move the
    ragged one's).
    """
    check_grouped_matmul("padded" if group_sizes is None else "ragged", axes)
    local_experts, d = p.up.weight.shape[0], x.shape[-1]
    to_group = x.reshape(n_groups, local_experts, -1, d)  # by destination group
    from_group = jax.lax.all_to_all(to_group, axes, 0, 0)  # by source device
    mine = from_group.transpose(1, 0, 2, 3).reshape(1, local_experts, -1, d)
    y = experts(p, mine, activation=activation).reshape(local_experts, n_groups, -1, d)
    return jax.lax.all_to_all(y.transpose(1, 0, 2, 3), axes, 0, 0).reshape(x.shape)


def _axes_of(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _expert_specs(p: Experts, expert_axes: tuple[str, ...], mlp_axes: tuple[str, ...]) -> Experts:
    """PartitionSpecs of the experts inside ``shard_map``: E split over ``expert_axes``, F
    over ``mlp_axes``, D whole."""
    e, f = expert_axes or None, mlp_axes or None

    def specs(layer: ExpertLinear, d_in, d_out) -> ExpertLinear:
        bias = None if layer.bias is None else P(e, d_out)
        return ExpertLinear(P(e, d_in, d_out), bias, layer.axes)

    gate = None if p.gate is None else specs(p.gate, None, f)
    return Experts(up=specs(p.up, None, f), gate=gate, down=specs(p.down, f, None))


def _tensor_parallel(p: Experts, *args, run, mlp_axes: tuple[str, ...]) -> tuple[Array, ...]:
    """``run(p, *args)`` with each device holding a slice of every expert's hidden width over
    ``mlp_axes``: the partial outputs ``y`` (the first) are summed (``psum``), the
    down-projection's bias added on one device of each group."""
    if not mlp_axes:
        return run(p, *args)
    if p.down.bias is not None:
        first = jax.lax.axis_index(mlp_axes) == 0
        down = dataclasses.replace(p.down, bias=jnp.where(first, p.down.bias, 0))
        p = dataclasses.replace(p, down=down)
    y, *others = run(p, *args)
    return jax.lax.psum(y, mlp_axes), *others


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
    phi, experts = _router_and_experts(
        key,
        d_model,
        d_hidden,
        n_experts,
        n_logits=n_experts * slots,
        router_bias=False,
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

    While a sharded step is traced each device computes its own sequences' slots, and with
    the experts split over ``mesh.expert`` the slots travel to their experts' devices and back
    as top-k routing's rows do (:func:`sharded_route_and_dispatch`).
    """
    b, t, _ = x.shape
    valid = jnp.ones((b, t), bool) if mask is None else mask
    n_experts = p.experts.up.weight.shape[0]  # (E, D, F)
    logits = linear(p.phi, x.astype(jnp.float32)).reshape(b, t, n_experts, -1)
    run = functools.partial(soft_dispatch, activation=activation)
    batch = activation_sharding_of(x.shape, ("batch", None, None))
    if batch is not None:
        run = functools.partial(sharded_route_and_dispatch, batch=batch, run=run)
    return run(p.experts, x, logits, valid)[0]


def soft_dispatch(
    p: Experts,
    x: Array,
    logits: Array,
    valid: Array,
    *,
    activation: str,
    run_experts=grouped_experts,
) -> tuple[Array]:
    """Soft MoE's slots through the experts (``run_experts``, :func:`grouped_experts`'s
    signature: the slots are E equal groups of rows) and back to the tokens.

    Args:
        x: ``(B, T, D)``; logits: ``(B, T, E, C)`` float32 slot logits; valid: ``(B, T)`` bool.
    Returns:
        ``((B, T, D),)``, zero at padding.
    """
    dispatch, combine = soft_moe_weights(logits, valid)  # (B, T, E, C)
    slots = jnp.einsum("btec,btd->ebcd", dispatch.astype(x.dtype), x)  # (E, B, C, D)
    rows = run_experts(p, slots.reshape(-1, x.shape[-1]), None, activation=activation)
    y = jnp.einsum("btec,ebcd->btd", combine.astype(x.dtype), rows.reshape(slots.shape))
    return (jnp.where(valid[..., None], y, 0),)
