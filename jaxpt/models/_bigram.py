"""Bigram language model: the next-token logits are a row of a (V, V) table."""

from __future__ import annotations

from typing import TYPE_CHECKING

import equinox as eqx
import jax.numpy as jnp
from jax import Array

from jaxpt import nn
from jaxpt.models._mixers import zero_aux

if TYPE_CHECKING:
    from jaxpt.models._config import BigramConfig


class Bigram(eqx.Module):
    """``table[i, j]`` is the logit of token ``j`` following token ``i``."""

    table: nn.Embedding  # (V, V)


def init(key: Array, cfg: BigramConfig) -> Bigram:
    """A table of N(0, init_stddev^2) logits."""
    return Bigram(
        nn.init_embedding(
            key,
            cfg.vocab_size,
            cfg.vocab_size,
            axes=("vocab", None),
            std=cfg.init_stddev,
            dtype=cfg.param_dtype,
        )
    )


def apply(
    params: Bigram,
    tokens: Array,
    cfg: BigramConfig,
    *,
    mask: Array | None = None,
    positions: Array | None = None,
    key: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """``(B, T)`` tokens -> float32 ``(B, T, V)`` logits and zero auxiliary losses.

    ``mask``, ``positions`` and ``key`` are accepted for a uniform model signature; a bigram
    model looks at one token and has no dropout, so none changes its output.
    """
    del mask, positions, key
    return nn.embed(params.table, tokens, jnp.float32), zero_aux()


def init_cache(batch_size: int, length: int, cfg: BigramConfig) -> tuple:
    """Nothing to cache: the next token depends on the current one alone."""
    del batch_size, length, cfg
    return ()


def prepare_decoding(params: Bigram, cfg: BigramConfig) -> Bigram:
    """The table as it is: a step reads one row."""
    del cfg
    return params


def decode(
    params: Bigram,
    tokens: Array,
    cfg: BigramConfig,
    *,
    at: Array | None,
    mask: Array | None = None,
    positions: Array | None = None,
    cache: tuple | None = None,
) -> tuple[Array, tuple | None]:
    """float32 ``(B, V)`` logits after ``tokens[b, at[b]]`` (``at=None``: ``(B, T, V)``
    after every token); ``cache`` passes through."""
    del cfg, mask, positions
    current = tokens if at is None else jnp.take_along_axis(tokens, at[:, None], axis=1)[:, 0]
    return nn.embed(params.table, current, jnp.float32), cache
