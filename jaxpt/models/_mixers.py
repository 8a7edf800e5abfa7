"""The feed-forward kinds a decoder layer can use (``ModelConfig.mixer``): how each is built
and applied from the model config, which config fields it needs, and whether it is causal and
cacheable."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax.numpy as jnp
from jax import Array

from jaxpt import nn
from jaxpt.models._checks import require, require_choice, require_positive_int

if TYPE_CHECKING:
    from jaxpt.models._config import ModelConfig

AUX_KEYS = ("load_balance_loss", "z_loss")


def zero_aux() -> dict[str, Array]:
    """The auxiliary losses of a layer that has none."""
    return {k: jnp.zeros((), jnp.float32) for k in AUX_KEYS}


class Mixer(NamedTuple):
    """How one kind of feed-forward layer is built, applied and configured.

    ``init(key, cfg) -> params``; ``apply(params, x, cfg, *, mask, key) -> (y, aux)`` with
    ``aux`` keyed by ``AUX_KEYS`` (``key``: the layer's training randomness, or None);
    ``needs``: the config fields (None in a dense model) it reads; ``validate(cfg)`` raises
    ConfigError for the values it reads; ``causal(cfg)`` says whether the output at ``t`` is
    independent of the tokens after ``t``; ``cacheable(cfg)`` says whether it also never changes
    as the sequence grows, so that the keys and values of earlier tokens can be cached while
    generating; ``experts_per_token(cfg)`` is how many experts' worth of the layer's
    ``experts`` params one token runs through (None: a dense layer); ``mixing_flops(cfg)`` is
    the training FLOPs per token of its matmuls whose second operand is activations, not
    params (Soft MoE's dispatch and combine), which ``6 N`` does not count.
    """

    init: Callable
    apply: Callable
    needs: tuple[str, ...] = ()
    validate: Callable = lambda cfg: None
    causal: Callable = lambda cfg: True
    cacheable: Callable = lambda cfg: True
    experts_per_token: Callable = lambda cfg: None
    mixing_flops: Callable = lambda cfg: 0


def _dense(init_fn: Callable, apply_fn: Callable) -> Mixer:
    """An MLP-like kind: ``n_embed -> n_mlp_hidden -> n_embed`` with ``activation``."""

    def init(key: Array, cfg: ModelConfig):
        return init_fn(
            key,
            cfg.n_embed,
            cfg.n_mlp_hidden,
            bias=cfg.mlp_bias,
            std=cfg.init_stddev,
            out_std=cfg.residual_out_std,
            dtype=cfg.param_dtype,
        )

    def apply(p, x: Array, cfg: ModelConfig, *, mask: Array | None, key: Array | None = None):
        del mask, key
        return apply_fn(p, x, activation=cfg.activation), zero_aux()

    return Mixer(init, apply)


_EXPERT_FIELDS = ("n_experts", "moe_expert", "moe_bias")
_ROUTER_FIELDS = ("top_k", "load_factor", "expert_weight_priority", "moe_router_bias")


def _experts(cfg: ModelConfig) -> dict:
    """``nn.init_moe`` / ``nn.init_soft_moe``'s expert arguments from ``cfg``."""
    return dict(
        gated=cfg.moe_expert == "glu",
        bias=cfg.moe_bias,
        std=cfg.init_stddev,
        out_std=cfg.residual_out_std,
        dtype=cfg.param_dtype,
    )


def _init_moe(key: Array, cfg: ModelConfig) -> nn.MoE:
    return nn.init_moe(
        key,
        cfg.n_embed,
        cfg.n_mlp_hidden,
        cfg.n_experts,
        router_bias=cfg.moe_router_bias,
        **_experts(cfg),
    )


def _moe(p: nn.MoE, x: Array, cfg: ModelConfig, *, mask: Array | None, key: Array | None = None):
    return nn.moe(p, x, cfg.moe_spec, activation=cfg.activation, mask=mask, key=key)


def _init_soft_moe(key: Array, cfg: ModelConfig) -> nn.SoftMoE:
    return nn.init_soft_moe(
        key,
        cfg.n_embed,
        cfg.n_mlp_hidden,
        cfg.n_experts,
        slots=_soft_moe_slots(cfg),
        **_experts(cfg),
    )


def _soft_moe_slots(cfg: ModelConfig) -> int:
    """Slots per expert: all experts' slots together about fill a sequence."""
    return cfg.block_size // cfg.n_experts


def _soft_moe(
    p: nn.SoftMoE, x: Array, cfg: ModelConfig, *, mask: Array | None, key: Array | None = None
):
    del key  # Soft MoE has no router noise
    return nn.soft_moe(p, x, activation=cfg.activation, mask=mask), zero_aux()


def _validate_experts(cfg: ModelConfig) -> None:
    require_positive_int("n_experts", cfg.n_experts)
    require_choice("moe_expert", cfg.moe_expert, ("glu", "mlp"))


def _validate_moe(cfg: ModelConfig) -> None:
    _validate_experts(cfg)
    require(
        1 <= cfg.top_k <= cfg.n_experts,
        f"model.top_k={cfg.top_k!r} must be an integer from 1 to model.n_experts={cfg.n_experts}.",
    )
    require(
        math.isfinite(cfg.load_factor) and cfg.load_factor > 0,
        f"model.load_factor={cfg.load_factor!r} must be positive and finite: each expert holds "
        "ceil(load_factor * top_k * max(1, T / n_experts)) tokens per sequence.",
    )
    require(
        nn.expert_capacity(cfg.moe_spec, 1) >= 1,
        f"model.load_factor={cfg.load_factor!r} gives each expert 0 slots, so every token is "
        f"dropped: set model.load_factor to at least {_least_load_factor(cfg.moe_spec)!r}.",
    )


def _least_load_factor(spec: nn.MoESpec) -> float:
    """The least ``load_factor`` that gives each expert one slot at T = 1 (the fewest slots)."""
    one_slot = lambda lf: nn.expert_capacity(dataclasses.replace(spec, load_factor=lf), 1) >= 1
    lf = 5e-10 / spec.top_k  # a few floats from it: expert_capacity rounds at 9 decimals
    while not one_slot(lf):
        lf = math.nextafter(lf, math.inf)
    while one_slot(math.nextafter(lf, 0)):
        lf = math.nextafter(lf, 0)
    return lf


def _validate_soft_moe(cfg: ModelConfig) -> None:
    _validate_experts(cfg)
    require(
        cfg.block_size >= cfg.n_experts,
        f"model.block_size={cfg.block_size} is smaller than model.n_experts={cfg.n_experts}: "
        "Soft MoE gives each expert block_size // n_experts slots, at least one.",
    )


def _never_drops(cfg: ModelConfig) -> bool:
    """Whether every top-k choice always finds a slot: capacity >= T for every T."""
    return cfg.load_factor * cfg.top_k >= cfg.n_experts


MIXERS: dict[str, Mixer] = {
    "mlp": _dense(nn.init_mlp, nn.mlp),
    "glu": _dense(nn.init_glu, nn.glu),
    # Top-k routing is causal only in token order; see jaxpt/nn/_moe.py. Its capacity grows
    # with T, so a token dropped at length T may be kept at T + 1: no cache unless nothing
    # can be dropped.
    "moe": Mixer(
        _init_moe,
        _moe,
        needs=_EXPERT_FIELDS + _ROUTER_FIELDS,
        validate=_validate_moe,
        causal=lambda cfg: not cfg.expert_weight_priority or _never_drops(cfg),
        cacheable=_never_drops,
        experts_per_token=lambda cfg: cfg.top_k,
    ),
    "soft_moe": Mixer(
        _init_soft_moe,
        _soft_moe,
        needs=_EXPERT_FIELDS,
        validate=_validate_soft_moe,
        causal=lambda cfg: False,
        cacheable=lambda cfg: False,
        # every slot runs one expert: E * slots expert passes per sequence of block_size tokens
        experts_per_token=lambda cfg: cfg.n_experts * _soft_moe_slots(cfg) / cfg.block_size,
        # dispatch (slots from tokens) and combine (tokens from slots): 2 S D forward FLOPs
        # each per token over the S = E * slots slots, three times that with the backward
        mixing_flops=lambda cfg: 12 * cfg.n_experts * _soft_moe_slots(cfg) * cfg.n_embed,
    ),
}
