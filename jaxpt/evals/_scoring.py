"""The log-likelihood of continuations: the scorer under HellaSwag and the harness adapter.

Each request is a pair of token lists, a context and a continuation; its score is the summed
cross-entropy of the continuation's tokens given everything before them. Requests are sorted
by length and run in batches of ``batch_size`` rows, each row padded on the right to its
batch's length bucket (a multiple of ``LENGTH_BUCKET``, so a whole evaluation compiles a few
shapes) under an attention padding mask, so padding changes no score. The logits are
float32, whatever the model's ``logits_dtype``. Over a mesh, rows are split like a training
batch (``sharding.batch_sharding``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxpt import models, nn, sharding
from jaxpt.errors import ConfigError, check_range

LENGTH_BUCKET = 32  # padded input lengths are multiples of this (or the model's max_length)


class Scores(NamedTuple):
    """One entry per request, in the order given."""

    nll: np.ndarray  # (N,) float64: summed cross-entropy of the continuation's tokens, nats
    n_tokens: np.ndarray  # (N,) int: continuation tokens scored
    greedy: np.ndarray  # (N,) bool: each scored token is the model's most likely one


def window(
    context: Sequence[int], continuation: Sequence[int], max_length: int | None
) -> tuple[list[int], int]:
    """The tokens a request runs on and the index of the first scored one.

    Beyond the model's ``max_length`` inputs, the oldest tokens are dropped (the
    lm-evaluation-harness rule): the last ``max_length + 1`` tokens are kept and the
    continuation's tokens among them are scored.
    """
    tokens = [*context, *continuation]
    if not context:
        raise ConfigError("a scored continuation needs at least one context token before it.")
    if max_length is not None and len(tokens) > max_length + 1:
        tokens = tokens[-(max_length + 1) :]
    return tokens, max(len(tokens) - len(continuation), 1)


def score(
    params,
    cfg: models.ModelConfig | models.BigramConfig,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int,
    mesh: Mesh | None = None,
    rules=None,
) -> Scores:
    """Scores each ``(context, continuation)`` token pair (see ``window``).

    Args:
        params: the model's params (sharded over ``mesh`` where given).
        cfg: the model's config.
        requests: token-id pairs; the context holds at least one token.
        batch_size: rows per jitted call; over a mesh, a multiple of the devices that split
            the batch (``mesh``'s ``rules["batch"]`` axes) as a training micro-batch is.
        mesh, rules: the run's mesh and ``config.mesh.rules``; None runs on the default
            device.
    """
    check_range("batch_size", batch_size, at_least=1, integer=True)
    cfg = _float32_logits(cfg)
    windows = [window(c, t, cfg.max_length) for c, t in requests]
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    nll, n_tokens = np.zeros(len(windows)), np.zeros(len(windows), np.int64)
    greedy = np.zeros(len(windows), bool)
    place = _placement(mesh, rules, batch_size)
    in_mesh = (
        contextlib.nullcontext() if mesh is None else sharding.activation_sharding(mesh, rules)
    )
    with in_mesh:  # the activations' shardings, where the rows are traced
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            tokens, starts, lengths = _pad([windows[i] for i in rows], batch_size, cfg.max_length)
            out = _score_rows(params, *(place(a) for a in (tokens, starts, lengths)), cfg=cfg)
            sums, counts, hits = (multihost_utils.process_allgather(x, tiled=True) for x in out)
            nll[rows], n_tokens[rows], greedy[rows] = (x[: len(rows)] for x in (sums, counts, hits))
    return Scores(nll, n_tokens, greedy)


def _float32_logits(cfg: models.ModelConfig | models.BigramConfig):
    """``cfg`` reading out float32 logits: a bfloat16 ``logits_dtype`` (the presets', for
    training's memory) rounds GPT-2's logits, about 100 in magnitude, by up to 0.25, and every
    scored token's loss with them. A bigram's logits are float32 already."""
    if isinstance(cfg, models.ModelConfig):
        return dataclasses.replace(cfg, logits_dtype="float32")
    return cfg


def _placement(mesh: Mesh | None, rules, batch_size: int):
    """How a batch's host arrays reach the devices: split over the mesh's batch axes."""
    if mesh is None:
        return jnp.asarray
    shards = sharding.batch_shards(mesh, rules)
    if batch_size % shards:
        raise ConfigError(
            f"an evaluation batch of {batch_size} rows does not divide over the {shards} "
            f"devices of the batch mesh axes; make it a multiple of {shards}."
        )

    def place(host: np.ndarray) -> Array:  # every process holds the whole batch
        where = sharding.batch_sharding(mesh, rules, host.ndim)
        return jax.make_array_from_callback(host.shape, where, lambda index: host[index])

    return place


def _pad(
    windows: list[tuple[list[int], int]], batch_size: int, max_length: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(batch_size, T + 1)`` int32 tokens, right-padded with 0, T the longest input bucketed
    up to a multiple of ``LENGTH_BUCKET`` (at most ``max_length``); the ``(batch_size,)``
    first scored index and length of each row. Rows past the requests hold one token and
    score nothing."""
    longest = max(len(tokens) for tokens, _ in windows) - 1
    t = -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET
    if max_length is not None:
        t = min(t, max_length)
    tokens = np.zeros((batch_size, t + 1), np.int32)
    starts, lengths = np.ones(batch_size, np.int32), np.ones(batch_size, np.int32)
    for row, (ids, first) in enumerate(windows):
        tokens[row, : len(ids)] = ids
        starts[row], lengths[row] = first, len(ids)
    return tokens, starts, lengths


@functools.partial(jax.jit, static_argnames="cfg")
def _score_rows(params, tokens: Array, starts: Array, lengths: Array, *, cfg):
    """Per row of ``(R, T + 1)`` tokens: the summed cross-entropy of the targets at token
    indices ``starts .. lengths - 1``, their count, and whether each was the argmax."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    index = jnp.arange(inputs.shape[1])[None, :]  # (1, T): input i predicts token i + 1
    real = index < (lengths - 1)[:, None]  # (R, T) inputs whose target is a real token
    scored = real & (index + 1 >= starts[:, None])
    logits, _ = models.get(cfg.name).apply(params, inputs, cfg, mask=real)
    nll = nn.token_nll(logits, targets)  # (R, T) float32
    hit = jnp.argmax(logits, axis=-1) == targets
    return (
        jnp.where(scored, nll, 0.0).sum(axis=1),
        scored.sum(axis=1),
        jnp.all(hit | ~scored, axis=1),
    )
