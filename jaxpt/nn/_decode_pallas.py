"""One decoding step's attention as one Pallas (Triton) kernel per layer.

A new token per sequence attends to its cached keys and values: XLA runs the scores, the
softmax and the weighted sum of the values as several small kernels, and at batch 1 a token's
time is mostly such kernels' launches and minimum run times. Here one program per (sequence,
query head) walks the layer's cache in blocks of ``BLOCK_S`` positions once, keeping an online
softmax (Milakov & Gimelshein, 2018) in float32; positions after the token's own (the cache's
unfilled tail included) are masked. Query head ``h`` reads key/value head ``h // (H // K)``.
The stacked cache is read in place: the kernel indexes the layer's entry itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import Array
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpt.nn._axes import activation_sharding_of
from jaxpt.nn._pallas import block_indices, kernel_call, load_tile

BLOCK_S = 64  # cache positions a program reads at a time
NUM_WARPS = 4
MAX_ELEMENTS = 2**31 - 1  # Triton indexes the cache with int32 offsets
# ``kernels="auto"`` runs the kernel from this many programs (sequences x query heads) up.
# GPT-2 shape, bf16, 32 + 256 tokens on an H200 (2026-11-28), new tokens/s, XLA -> kernel:
# batch 1 (12 programs) 1,542 -> 1,409, 4: 6,158 -> 6,047, 8 (96): 11,569 -> 11,977,
# 16: 21,754 -> 22,804, 32: 36,108 -> 41,867 (bench/generate.py --kernels).
MIN_PROGRAMS = 96


def supported(q: Array, cache_k: Array) -> bool:
    """Whether the kernel takes one new token's queries ``(B, 1, H, Dh)`` over the stacked
    cache ``(L, B, S, K, Dh)``: int32-indexable, and not while a sharded step is traced."""
    unsharded = activation_sharding_of(q.shape, ("batch", None, "q_heads", None)) is None
    return q.shape[1] == 1 and unsharded and cache_k.size <= MAX_ELEMENTS


@jax.named_scope("attention")
def decode_attention(
    q: Array, cache_k: Array, cache_v: Array, layer: Array | int, positions: Array
) -> Array:
    """Softmax attention of each sequence's new token over its cache entry ``layer``.

    Args:
        q: ``(B, 1, H, Dh)`` queries of the new tokens.
        cache_k, cache_v: ``(L, B, S, K, Dh)`` stacked caches, the new keys/values written.
        layer: the entry to read (an int or an int scalar array).
        positions: ``(B, 1)`` int, the new tokens' positions: each reads positions 0..its own.
    Returns:
        ``(B, 1, H, Dh)`` in q's dtype, scaled by ``1 / sqrt(Dh)`` as ``attend``.
    """
    n_layers, batch, seq, n_kv, head_dim = cache_k.shape
    n_head = q.shape[2]
    rows = (n_layers * batch * seq * n_kv, head_dim)
    out = kernel_call(
        _kernel,
        grid=(batch, n_head),
        out_shape=jax.ShapeDtypeStruct((batch * n_head, head_dim), q.dtype),
        name="decode_attention",
        num_warps=NUM_WARPS,
        batch=batch,
        seq=seq,
        n_head=n_head,
        n_kv=n_kv,
        head_dim=head_dim,
        block_d=pl.next_power_of_2(head_dim),
    )(
        q.reshape(batch * n_head, head_dim),
        cache_k.reshape(rows),
        cache_v.reshape(rows),
        positions.reshape(batch).astype(jnp.int32),
        jnp.asarray(layer, jnp.int32).reshape(1),
    )
    return out.reshape(q.shape)


def _kernel(
    q_ref,
    k_ref,
    v_ref,
    positions_ref,
    layer_ref,
    out_ref,
    *,
    batch: int,
    seq: int,
    n_head: int,
    n_kv: int,
    head_dim: int,
    block_d: int,
):
    b, h = pl.program_id(0), pl.program_id(1)
    kv_head = h // (n_head // n_kv)
    cols, col_ok = block_indices(0, block_d, head_dim)
    query_row = (b * n_head + h) + jnp.zeros((1,), jnp.int32)
    q = load_tile(q_ref, query_row, cols, col_ok[None, :]) / math.sqrt(head_dim)  # (1, Dp)
    position = plgpu.load(positions_ref.at[b + jnp.zeros((1,), jnp.int32)])  # (1,)
    first_row = (layer_ref[0] * batch + b) * seq  # the sequence's position 0 in the entry

    def block_step(block, carry):
        peak, total, acc = carry  # running max and sum of exponentials (1,), (1, Dp) sums
        s, s_ok = block_indices(block, BLOCK_S, seq)
        valid = s_ok & (s <= position)
        rows = (first_row + s) * n_kv + kv_head
        tile_ok = valid[:, None] & col_ok[None, :]
        k = load_tile(k_ref, rows, cols, tile_ok)  # (BLOCK_S, Dp)
        scores = jnp.where(valid, jnp.sum(k * q, axis=1), -jnp.inf)  # (BLOCK_S,)
        new_peak = jnp.maximum(peak, jnp.max(scores, axis=0, keepdims=True))
        weights = jnp.exp(scores - new_peak)  # 0 where masked
        rescale = jnp.exp(peak - new_peak)  # 0 on the first block (peak -inf)
        v = load_tile(v_ref, rows, cols, tile_ok)
        acc = acc * rescale[:, None] + jnp.sum(weights[:, None] * v, axis=0, keepdims=True)
        return new_peak, total * rescale + jnp.sum(weights, axis=0, keepdims=True), acc

    start = (jnp.full((1,), -jnp.inf, jnp.float32), jnp.zeros((1,)), jnp.zeros((1, block_d)))
    # position 0 is always valid, so the first block sets a finite peak and total > 0
    _, total, acc = jax.lax.fori_loop(0, pl.cdiv(seq, BLOCK_S), block_step, start)
    out = (acc / total[:, None]).astype(out_ref.dtype)
    plgpu.store(out_ref.at[query_row[:, None], cols[None, :]], out, mask=col_ok[None, :])
