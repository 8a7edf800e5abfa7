"""Bigram language model: the next-token logits are a row of a (V, V) table."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jax import Array

from jaxpt import nn
from jaxpt.models._decoder import zero_aux


class Bigram(eqx.Module):
    """``table[i, j]`` is the logit of token ``j`` following token ``i``."""

    table: nn.Embedding  # (V, V)


def init(key: Array, cfg) -> Bigram:
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
    params: Bigram, tokens: Array, cfg, *, mask: Array | None = None, positions: Array | None = None
) -> tuple[Array, dict[str, Array]]:
    """``(B, T)`` tokens -> float32 ``(B, T, V)`` logits and zero auxiliary losses.

    ``mask`` and ``positions`` are accepted for a uniform model signature; a bigram model
    looks at one token, so neither changes its output.
    """
    del mask, positions
    return nn.embed(params.table, tokens, jnp.float32), zero_aux()
