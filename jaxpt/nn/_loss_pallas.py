"""Next-token cross-entropy as Pallas (Triton) kernels: one read of the logits per pass.

XLA's forward reads the logits twice (a max pass, then a sum-exp pass); here each program
walks its rows' vocabulary in chunks once, keeping in every lane of its tile a running max and
a sum of exponentials rescaled to it (online softmax, Milakov & Gimelshein, 2018) and the
target's logit, and reduces the lanes once at the end (no reduction inside the loop). It
writes the nll and the logsumexp of each row; the backward reads the logits once more and
writes ``softmax - one_hot`` times the incoming gradient in the logits' dtype.

Tiles are ``block_rows`` x ``block_cols`` (``CHUNK`` columns, or fewer for a small
vocabulary; powers of two, the columns past V masked), so any V works.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import Array
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpt.nn._axes import activation_sharding_of
from jaxpt.nn._pallas import block_indices, kernel_call, load_tile, map_batch_shards

# The fastest of bench/kernels.py --sweep=loss on an H200 (GPT-2's 16 x 1024 x 50304 bf16
# logits: forward 0.82 ms, with the backward 1.70, against XLA's 1.15 and 2.29; larger tiles
# were slower, down to 1.32 and 2.19 at 4 x 2048 elements and 8 warps).
CHUNK = 1024  # vocabulary columns a program reads at a time
TILE = 1024  # elements per tile: block_rows x block_cols (one row)
NUM_WARPS = 4
MAX_ELEMENTS = 2**31 - 1  # Triton indexes the logits with int32 offsets


def supported(logits: Array) -> bool:
    """Whether the kernel takes ``logits`` ``(B, ..., V)``: each device's rows int32-indexable,
    and, while a sharded step is traced, the vocabulary whole on every device (no tensor
    parallelism)."""
    names = ("batch",) + (None,) * (logits.ndim - 2) + ("vocab",)
    sharding = activation_sharding_of(logits.shape, names)
    if sharding is None:
        return logits.size <= MAX_ELEMENTS
    vocab_split = len(sharding.spec) == logits.ndim and sharding.spec[-1] is not None
    return math.prod(sharding.shard_shape(logits.shape)) <= MAX_ELEMENTS and not vocab_split


@jax.custom_vjp
def token_nll(logits: Array, targets: Array) -> Array:
    """``logsumexp(logits) - logits[target]`` per position, as ``nn.token_nll``.

    Args:
        logits: ``(B, ..., V)``, any float dtype; targets: ``(B, ...)`` int in ``[0, V)``.
    Returns:
        ``(B, ...)`` float32; the gradient ``softmax - one_hot`` comes in the logits' dtype.
    """
    return _nll_fwd(logits, targets)[0]


@jax.named_scope("cross_entropy")
def _nll_fwd(logits: Array, targets: Array):
    nll, lse = map_batch_shards(
        _forward, (logits, targets), batched=(True, True), out_batched=(True, True)
    )
    return nll, (logits, targets, lse)


@jax.named_scope("cross_entropy")
def _nll_bwd(residuals, grad: Array):
    logits, targets, lse = residuals
    (dlogits,) = map_batch_shards(
        _backward, (logits, targets, lse, grad), batched=(True,) * 4, out_batched=(True,)
    )
    return dlogits, None


token_nll.defvjp(_nll_fwd, _nll_bwd)


def _tiling(v: int) -> tuple[int, int]:
    """``(block_rows, block_cols)`` for rows of width v."""
    block_cols = min(CHUNK, pl.next_power_of_2(v))
    return max(1, TILE // block_cols), block_cols


def _forward(logits: Array, targets: Array) -> tuple[Array, Array]:
    """Local rows: logits ``(B, ..., V)``, targets ``(B, ...)`` -> nll and logsumexp
    ``(B, ...)`` float32."""
    shape, v = logits.shape, logits.shape[-1]
    n = math.prod(shape[:-1])
    block_rows, block_cols = _tiling(v)
    row_stat = jax.ShapeDtypeStruct((n,), jnp.float32)
    nll, lse = kernel_call(
        _forward_kernel,
        grid=(pl.cdiv(n, block_rows),),
        out_shape=(row_stat, row_stat),
        name="cross_entropy_forward",
        num_warps=NUM_WARPS,
        n=n,
        v=v,
        block_rows=block_rows,
        block_cols=block_cols,
    )(logits.reshape(n, v), targets.reshape(n))
    return nll.reshape(shape[:-1]), lse.reshape(shape[:-1])


def _forward_kernel(logits_ref, targets_ref, nll_ref, lse_ref, *, n, v, block_rows, block_cols):
    rows, row_ok = block_indices(pl.program_id(0), block_rows, n)
    targets = plgpu.load(targets_ref.at[rows], mask=row_ok, other=0)

    def chunk_step(chunk, carry):
        peak, total, target_logit = carry  # (block_rows, block_cols) each: per lane
        cols, col_ok = block_indices(chunk, block_cols, v)
        x = load_tile(logits_ref, rows, cols, row_ok[:, None] & col_ok[None, :])
        # One exponential per logit: exp(peak - x) where x raises the peak, else exp(x - peak).
        scaled = jnp.exp(-jnp.abs(x - peak))
        raised = jnp.where(x > peak, total * scaled + 1.0, total + scaled)
        inside = col_ok[None, :]
        total = jnp.where(inside, raised, total)
        peak = jnp.where(inside, jnp.maximum(peak, x), peak)
        target_logit += jnp.where(cols[None, :] == targets[:, None], x, 0.0)
        return peak, total, target_logit

    tile = (block_rows, block_cols)
    start = (jnp.full(tile, -jnp.inf, jnp.float32), jnp.zeros(tile), jnp.zeros(tile))
    peak, total, target_logit = jax.lax.fori_loop(0, pl.cdiv(v, block_cols), chunk_step, start)
    row_peak = peak.max(1)  # lanes that saw no column keep (-inf, 0) and add nothing
    lse = row_peak + jnp.log((total * jnp.exp(peak - row_peak[:, None])).sum(1))
    target_logit = target_logit.sum(1)
    plgpu.store(nll_ref.at[rows], lse - target_logit, mask=row_ok)
    plgpu.store(lse_ref.at[rows], lse, mask=row_ok)


def _backward(logits: Array, targets: Array, lse: Array, grad: Array) -> tuple[Array]:
    """Local rows: logits ``(B, ..., V)``; targets, lse, grad ``(B, ...)`` -> dlogits
    ``(B, ..., V)`` in the logits' dtype."""
    shape, v = logits.shape, logits.shape[-1]
    n = math.prod(shape[:-1])
    block_rows, block_cols = _tiling(v)
    dlogits = kernel_call(
        _backward_kernel,
        grid=(pl.cdiv(n, block_rows), pl.cdiv(v, block_cols)),
        out_shape=jax.ShapeDtypeStruct((n, v), logits.dtype),
        name="cross_entropy_backward",
        num_warps=NUM_WARPS,
        n=n,
        v=v,
        block_rows=block_rows,
        block_cols=block_cols,
    )(logits.reshape(n, v), targets.reshape(n), lse.reshape(n), grad.reshape(n))
    return (dlogits.reshape(shape),)


def _backward_kernel(
    logits_ref, targets_ref, lse_ref, grad_ref, dlogits_ref, *, n, v, block_rows, block_cols
):
    rows, row_ok = block_indices(pl.program_id(0), block_rows, n)
    cols, col_ok = block_indices(pl.program_id(1), block_cols, v)
    mask = row_ok[:, None] & col_ok[None, :]
    x = load_tile(logits_ref, rows, cols, mask)
    targets, lse, grad = (
        plgpu.load(ref.at[rows], mask=row_ok, other=0) for ref in (targets_ref, lse_ref, grad_ref)
    )
    probs = jnp.exp(x - lse[:, None])
    dlogits = jnp.where(cols[None, :] == targets[:, None], probs - 1.0, probs) * grad[:, None]
    plgpu.store(
        dlogits_ref.at[rows[:, None], cols[None, :]], dlogits.astype(dlogits_ref.dtype), mask=mask
    )
