"""Dense layer and token/position embeddings."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from jaxpt.nn._axes import HasAxes, activation_sharding_of, constrain


def normal_or_zeros(key: Array, shape: tuple[int, ...], std: float, dtype) -> Array:
    """N(0, std^2) samples, or zeros when ``std == 0`` (zero-initialised projections)."""
    if std == 0.0:
        return jnp.zeros(shape, dtype)
    return std * jax.random.normal(key, shape, dtype)


class Linear(HasAxes):
    """``y = x @ weight + bias``; ``weight`` is stored ``(in, out)``."""

    weight: Array  # (in, out)
    bias: Array | None  # (out,)
    axes: tuple[str | None, str | None] = eqx.field(static=True)  # logical names of (in, out)

    def param_axes(self):
        return {"weight": self.axes, "bias": self.axes[1:]}


def init_linear(
    key: Array,
    d_in: int,
    d_out: int,
    *,
    axes: tuple[str | None, str | None],
    bias: bool,
    std: float,
    dtype,
) -> Linear:
    """A ``d_in -> d_out`` layer with N(0, std^2) weights and zero bias."""
    weight = normal_or_zeros(key, (d_in, d_out), std, dtype)
    return Linear(weight, jnp.zeros((d_out,), dtype) if bias else None, axes)


def linear(p: Linear, x: Array) -> Array:
    """Applies ``p`` in the dtype of ``x``. ``x``: ``(..., in)`` -> ``(..., out)``."""
    return add_bias(x @ p.weight.astype(x.dtype), p.bias)


def add_bias(y: Array, bias: Array | None) -> Array:
    """``y + bias`` (broadcast over y's leading axes) added in float32 and rounded once to
    y's dtype; ``y`` itself without a bias. Its gradient, the sum of y's cotangent over every
    row, then accumulates in float32: the gradient of a bfloat16 add would sum 16K rows of a
    step in bfloat16."""
    if bias is None:
        return y
    bias = jax.lax.broadcast_to_rank(bias.astype(jnp.float32), y.ndim)
    return (y.astype(jnp.float32) + bias).astype(y.dtype)


def stacked_linear(layers: tuple[Linear, ...], x: Array) -> tuple[Array, ...]:
    """``linear(layer, x)`` for each of ``S`` layers of one shape, as one matmul of ``x``
    ``(..., D)`` with their weights stacked ``(D, S, F)`` (GPT-2's fused ``c_attn``): one
    GEMM S times as wide instead of S (q/k/v: a 2.7% faster GPT-2 step on an H200). Stacked
    on a new axis, not concatenated, so each weight's sharding carries over unchanged; the
    middle axis is the matmul's own layout (rows of ``S x F``), so the stack is read in place,
    never transposed. In a decoding loop XLA:CPU builds the loop-invariant stack once a call;
    XLA:GPU builds it every step (a concatenate a layer)."""
    weight = jnp.stack([layer.weight for layer in layers], axis=1).astype(x.dtype)
    y = jnp.einsum("...d,dsf->...sf", x, weight)  # (..., S, F)
    bias = None if layers[0].bias is None else jnp.stack([layer.bias for layer in layers])
    y = add_bias(y, bias)
    return tuple(y[..., i, :] for i in range(len(layers)))


class Embedding(HasAxes):
    """A lookup table ``(rows, D)``: token embeddings (rows = V) or learned positions."""

    weight: Array  # (rows, D)
    axes: tuple[str, str] = eqx.field(static=True)

    def param_axes(self):
        return {"weight": self.axes}


def init_embedding(key: Array, rows: int, d: int, *, axes, std: float, dtype) -> Embedding:
    """An embedding table with N(0, std^2) entries."""
    return Embedding(normal_or_zeros(key, (rows, d), std, dtype), axes)


class ReadOut(HasAxes):
    """An untied read-out with a bias (the original Charformer's ``lm_head``): logits
    ``x @ weight.T + bias``, the table laid out like the token embedding."""

    weight: Array  # (V, D)
    bias: Array  # (V,)
    axes: tuple[str, str] = eqx.field(static=True)

    def param_axes(self):
        return {"weight": self.axes, "bias": self.axes[:1]}


def init_read_out(key: Array, rows: int, d: int, *, axes, std: float, dtype) -> ReadOut:
    """A read-out with N(0, std^2) weights and a zero bias."""
    return ReadOut(normal_or_zeros(key, (rows, d), std, dtype), jnp.zeros((rows,), dtype), axes)


@jax.named_scope("embed")
def embed(p: Embedding, ids: Array, dtype) -> Array:
    """Rows ``ids`` of the table in ``dtype``. ``ids``: ``(B, ...)`` int -> ``(B, ..., D)``.

    The table's gradient leaves in ``dtype``, as a matmul's weight gradient does: each device
    of a sharded step adds up its own sequences' row gradients in float32 and rounds that sum
    to ``dtype``, and only then are the devices' sums added, so data parallelism reduces the
    ``(V, D)`` gradient in ``dtype``'s bytes (half of float32's in bfloat16).

    In a sharded step the table is gathered first (``gathered_table``), so each device looks
    up its own sequences' rows. Left to itself, XLA's SPMD partitioner looked the rows up with
    the width split and could then not move them to the batch's split: under ``data x fsdp x
    tensor`` it replicated them ("involuntary full rematerialization").
    """
    return _rows(gathered_table(p), ids, jnp.dtype(dtype))


def gathered_table(p: Embedding | ReadOut) -> Array:
    """The ``(rows, D)`` table pinned as a layer uses it: its width whole and its rows split
    only over what the batch's split leaves (tensor), as FSDP gathers a weight for its matmul.
    Left to itself, XLA's partitioner kept an FSDP split of the rows and gathered every
    device's activations instead, the whole batch's on each device."""
    return constrain(p.weight, (p.axes[0], None))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rows(table: Array, ids: Array, dtype) -> Array:
    return jnp.take(table, ids, axis=0).astype(dtype)


def _rows_fwd(table: Array, ids: Array, dtype):
    return _rows(table, ids, dtype), (table, ids)


def _rows_bwd(dtype, residuals, grad: Array):
    """``grad``: ``(B, ..., D)`` -> the table's ``(V, D)``: S per-shard float32 sums ``(S, V,
    D)``, one on each of the S devices that split the batch, rounded, then added in ``dtype``."""
    table, ids = residuals
    shards = _batch_shards(ids)
    ids = constrain(ids.reshape(shards, -1), ("batch", None))  # (S, N / S)
    grad = constrain(grad.reshape(shards, -1, grad.shape[-1]), ("batch", None, None))
    # pinned before and after the scatter: each device fills its own (V, D), nothing moves
    sums = constrain(jnp.zeros((shards, *table.shape), jnp.float32), ("batch", None, None))
    sums = jax.vmap(lambda s, i, g: s.at[i].add(g.astype(jnp.float32)))(sums, ids, grad)
    sums = constrain(sums, ("batch", None, None)).astype(dtype)  # (S, V, D)
    total = jax.lax.reduce(sums, jnp.zeros((), dtype), jax.lax.add, (0,))  # added in dtype
    return total.astype(table.dtype), None


_rows.defvjp(_rows_fwd, _rows_bwd)


def _batch_shards(ids: Array) -> int:
    """How many pieces the sharded step being traced splits ``ids``' leading (batch) axis
    into; 1 when none is."""
    sharding = activation_sharding_of(ids.shape, ("batch",) + (None,) * (ids.ndim - 1))
    return 1 if sharding is None else ids.shape[0] // sharding.shard_shape(ids.shape)[0]


@jax.named_scope("unembed")
def unembed(p: Embedding | ReadOut, x: Array, dtype=jnp.float32) -> Array:
    """Read-out through a ``(V, D)`` table: logits ``x @ weight.T``, accumulated in float32.

    ``x``: ``(..., D)`` in the compute dtype -> ``(..., V)`` in ``dtype`` (float32 by default;
    bfloat16 halves the bytes of the largest activation, as autocast does). The backward
    matmuls run in the compute dtype (the logits' cotangent is cast to it first), as under
    mixed-precision autocast: in bfloat16 they are the largest matmuls of a GPT-2 step. The
    table's gradient leaves its matmul in the compute dtype too (accumulated in float32), as
    every layer's weight gradient does, so a sharded step reduces it in those bytes.
    """
    return _logits(x, gathered_table(p).astype(x.dtype), jnp.dtype(dtype))


def read_out(p: ReadOut, x: Array, dtype=jnp.float32) -> Array:
    """``unembed`` plus the read-out's bias: ``(..., D)`` -> ``(..., V)`` in ``dtype``."""
    return add_bias(unembed(p, x, dtype), p.bias)


@jax.custom_vjp
def weight_gradients_first(params, x: Array):
    """``(params, x)`` unchanged; in the backward, ``x``'s gradient waits for ``params``'
    (both pass one optimization barrier).

    Before the read-out: its table's gradient is then computed before the layers below run
    their backward. Left free, XLA:GPU computes every weight gradient after all the
    activation gradients, so under data parallelism the table's ``(V, D)`` all-reduce (154 MB
    for GPT-2, float32 then) ran in the step's last milliseconds; with the barrier it overlaps
    the layers' backward (``data=4`` on 4 x H200: 1,901,000 to 1,908,000 tokens/s against
    1,872,000 to 1,906,000). The same barrier at every layer was slower (1,781,000 to
    1,848,000): each layer's all-reduce then ran alone while the GPU waited for it.
    """
    return params, x


def _weight_gradients_first_fwd(params, x: Array):
    return (params, x), None


def _weight_gradients_first_bwd(_, grads):
    return jax.lax.optimization_barrier(grads)


weight_gradients_first.defvjp(_weight_gradients_first_fwd, _weight_gradients_first_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _logits(x: Array, weight: Array, dtype) -> Array:
    return jnp.einsum("...d,vd->...v", x, weight, preferred_element_type=dtype)


def _logits_fwd(x: Array, weight: Array, dtype):
    return _logits(x, weight, dtype), (x, weight)


def _logits_bwd(dtype, residuals, grad: Array):
    x, weight = residuals
    grad = grad.astype(x.dtype)  # (..., V)
    dx = jnp.einsum("...v,vd->...d", grad, weight)
    dw = jnp.einsum("...v,...d->vd", grad, x)  # accumulated in float32, returned in x's dtype
    return dx, dw.astype(weight.dtype)


_logits.defvjp(_logits_fwd, _logits_bwd)
