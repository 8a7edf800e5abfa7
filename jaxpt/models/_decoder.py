"""One configurable decoder-only transformer behind every GPT-family preset.

Pre-norm blocks as in GPT-2 (Radford et al., 2019; HF ``modeling_gpt2.py``) and Llama
(Touvron et al., 2023; HF ``modeling_llama.py``): ``x + attn(norm(x))``, then
``x + mixer(norm(x))``. Config fields choose positions (learned | rope | none), the mixer
pattern (mlp | glu | moe | soft_moe), heads (MHA or GQA), norm and init. Layers are stacked
on a leading axis per position in the mixer pattern and run with ``lax.scan`` over the pattern
repeats, so compile time does not grow with depth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from jaxpt import nn
from jaxpt.models._config import _choice, _require, check_range, mixer_pattern

AUX_KEYS = ("load_balance_loss", "z_loss")


def zero_aux() -> dict[str, Array]:
    """The auxiliary losses of a layer that has none."""
    return {k: jnp.zeros((), jnp.float32) for k in AUX_KEYS}


class Mixer(NamedTuple):
    """How one kind of feed-forward layer is built, applied and configured.

    ``init(key, cfg) -> params``; ``apply(params, x, cfg, *, mask) -> (y, aux)`` with ``aux``
    keyed by ``AUX_KEYS``; ``validate(cfg)`` raises ConfigError for the fields it reads;
    ``causal(cfg)`` says whether the output at ``t`` is independent of the tokens after ``t``;
    ``cacheable(cfg)`` says whether it also never changes as the sequence grows, so that the
    keys and values of earlier tokens can be cached while generating.
    """

    init: Callable
    apply: Callable
    validate: Callable = lambda cfg: None
    causal: Callable = lambda cfg: True
    cacheable: Callable = lambda cfg: True


def _dense(apply_fn: Callable) -> Callable:
    return lambda p, x, cfg, *, mask: (apply_fn(p, x, cfg), zero_aux())


def _soft_moe(p, x: Array, cfg, *, mask: Array | None) -> tuple[Array, dict[str, Array]]:
    return nn.soft_moe(p, x, cfg, mask=mask), zero_aux()


def _validate_experts(cfg, kind: str, fields: tuple[str, ...]) -> None:
    for field in ("n_experts", "moe_expert", "moe_bias", *fields):
        _require(
            field in cfg,
            f"model.mixer={cfg.mixer!r} uses {kind!r}, which needs model.{field}; start from "
            "a MoE preset (tiny_moe, tiny_moe_2, tiny_moe_3).",
        )
    check_range("model.n_experts", cfg.n_experts, at_least=1, integer=True)
    _choice(cfg, "moe_expert", ("glu", "mlp"))


def _validate_moe(cfg) -> None:
    _validate_experts(
        cfg, "moe", ("top_k", "load_factor", "expert_weight_priority", "moe_router_bias")
    )
    _require(
        isinstance(cfg.top_k, int) and 1 <= cfg.top_k <= cfg.n_experts,
        f"model.top_k={cfg.top_k!r} must be an integer from 1 to model.n_experts={cfg.n_experts}.",
    )
    _require(
        math.isfinite(cfg.load_factor) and cfg.load_factor > 0,
        f"model.load_factor={cfg.load_factor!r} must be positive and finite: each expert holds "
        "ceil(load_factor * top_k * max(1, T / n_experts)) tokens per sequence.",
    )


def _validate_soft_moe(cfg) -> None:
    _validate_experts(cfg, "soft_moe", ())
    _require(
        cfg.block_size >= cfg.n_experts,
        f"model.block_size={cfg.block_size} is smaller than model.n_experts={cfg.n_experts}: "
        "Soft MoE gives each expert block_size // n_experts slots, at least one.",
    )


def _never_drops(cfg) -> bool:
    """Whether every top-k choice always finds a slot: capacity >= T for every T."""
    return cfg.load_factor * cfg.top_k >= cfg.n_experts


MIXERS: dict[str, Mixer] = {
    "mlp": Mixer(nn.init_mlp, _dense(nn.mlp)),
    "glu": Mixer(nn.init_glu, _dense(nn.glu)),
    # Top-k routing is causal only in token order; see jaxpt/nn/_moe.py. Its capacity grows
    # with T, so a token dropped at length T may be kept at T + 1: no cache unless nothing
    # can be dropped.
    "moe": Mixer(
        nn.init_moe,
        nn.moe,
        _validate_moe,
        causal=lambda cfg: not cfg.expert_weight_priority or _never_drops(cfg),
        cacheable=_never_drops,
    ),
    "soft_moe": Mixer(
        nn.init_soft_moe,
        _soft_moe,
        _validate_soft_moe,
        causal=lambda cfg: False,
        cacheable=lambda cfg: False,
    ),
}


def is_causal(cfg) -> bool:
    """Whether logits at ``t`` never depend on later tokens (false for some MoE configs)."""
    return all(MIXERS[kind].causal(cfg) for kind in mixer_pattern(cfg))


def is_cacheable(cfg) -> bool:
    """Whether every layer's output at ``t`` is fixed once tokens ``<= t`` are (KV cache)."""
    return all(MIXERS[kind].cacheable(cfg) for kind in mixer_pattern(cfg))


class Block(eqx.Module):
    """One pre-norm transformer layer."""

    ln_1: nn.LayerNorm | nn.RMSNorm
    attn: nn.Attention
    ln_2: nn.LayerNorm | nn.RMSNorm
    mixer: eqx.Module


class Decoder(eqx.Module):
    """All params of a decoder. ``blocks[i]`` holds pattern position ``i`` of every repeat."""

    wte: nn.Embedding  # (V, D)
    wpe: nn.Embedding | None  # (block_size, D), learned positions only
    blocks: tuple[Block, ...]  # arrays (L // len(pattern), ...)
    ln_f: nn.LayerNorm | nn.RMSNorm
    lm_head: nn.Embedding | None  # (V, D), untied read-out only


def init_block(key: Array, cfg, kind: str) -> Block:
    """One layer whose feed-forward part is ``MIXERS[kind]``."""
    k_attn, k_mixer = jax.random.split(key)
    init_norm = nn.NORMS[cfg.norm][0]
    return Block(
        ln_1=init_norm(cfg.n_embed, cfg.param_dtype),
        attn=nn.init_attention(k_attn, cfg),
        ln_2=init_norm(cfg.n_embed, cfg.param_dtype),
        mixer=MIXERS[kind].init(k_mixer, cfg),
    )


def init(key: Array, cfg) -> Decoder:
    """Params for the model config ``cfg``, in ``cfg.param_dtype``."""
    k_wte, k_wpe, k_blocks, k_head = jax.random.split(key, 4)
    pattern = mixer_pattern(cfg)
    repeats = cfg.n_layer // len(pattern)
    block_keys = jax.random.split(k_blocks, len(pattern))
    table = dict(std=cfg.init_stddev, dtype=cfg.param_dtype)
    return Decoder(
        wte=nn.init_embedding(k_wte, cfg.vocab_size, cfg.n_embed, axes=("vocab", "embed"), **table),
        wpe=nn.init_embedding(k_wpe, cfg.block_size, cfg.n_embed, axes=(None, "embed"), **table)
        if cfg.position == "learned"
        else None,
        blocks=tuple(
            nn.stack_layers(lambda k, kind=kind: init_block(k, cfg, kind), key, repeats)
            for kind, key in zip(pattern, block_keys, strict=True)
        ),
        ln_f=nn.NORMS[cfg.norm][0](cfg.n_embed, cfg.param_dtype),
        lm_head=None
        if cfg.tie_embeddings
        else nn.init_embedding(
            k_head, cfg.vocab_size, cfg.n_embed, axes=("vocab", "embed"), **table
        ),
    )


def block(
    p: Block,
    x: Array,
    cfg,
    kind: str,
    *,
    positions: Array,
    mask: Array | None,
    cache: nn.KVCache | None = None,
    layer: Array | int = 0,
):
    """``(B, T, D)`` -> ``(B, T, D)``, the layer's auxiliary losses and its updated cache.

    With a ``cache`` (stacked over layers) the attention reads and extends its entry
    ``layer`` (see ``nn.cached_attention``).
    """
    norm = nn.NORMS[cfg.norm][1]
    h = norm(p.ln_1, x, cfg.ln_epsilon)
    if cache is None:
        y = nn.attention(p.attn, h, cfg, positions=positions, mask=mask)
    else:
        y, cache = nn.cached_attention(p.attn, h, cfg, cache, positions=positions, layer=layer)
    x = x + y
    y, aux = MIXERS[kind].apply(p.mixer, norm(p.ln_2, x, cfg.ln_epsilon), cfg, mask=mask)
    return x + y, aux, cache


def init_cache(cfg, batch_size: int, length: int) -> tuple[nn.KVCache, ...] | None:
    """An empty KV cache for ``length`` positions, stacked like ``Decoder.blocks``.

    None when the config cannot be cached (MoE that can drop tokens, Soft MoE): an earlier
    token's output there changes as the sequence grows; see ``is_cacheable``.
    """
    if not is_cacheable(cfg):
        return None
    pattern = mixer_pattern(cfg)
    layers = cfg.n_layer // len(pattern)
    return tuple(nn.init_kv_cache(cfg, batch_size, length, layers=layers) for _ in pattern)


def features(
    params: Decoder,
    tokens: Array,
    cfg,
    *,
    mask: Array | None = None,
    positions: Array | None = None,
    cache: tuple[nn.KVCache, ...] | None = None,
):
    """The final normalised hidden states: ``(B, T, D)``, summed aux losses, updated cache."""
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    dtype = jnp.dtype(cfg.dtype)
    x = nn.embed(params.wte, tokens, dtype)  # (B, T, D)
    if params.wpe is not None:
        x = x + nn.embed(params.wpe, positions, dtype)
    pattern = mixer_pattern(cfg)

    caches = (None,) * len(pattern) if cache is None else cache
    repeats = cfg.n_layer // len(pattern)

    # The caches ride in the carry, whole, and each layer writes its rows in place: as scanned
    # inputs/outputs they would be copied every step.
    def repeat(carry, layer):  # one repeat of the pattern
        x, caches = carry
        blocks, index = layer
        auxes, new_caches = [], []
        for kind, p, c in zip(pattern, blocks, caches, strict=True):
            x, aux, c = block(p, x, cfg, kind, positions=positions, mask=mask, cache=c, layer=index)
            auxes.append(aux)
            new_caches.append(c)
        return (x, tuple(new_caches)), jax.tree.map(lambda *a: sum(a), *auxes)

    repeat = nn.remat(repeat, cfg.remat_policy)
    (x, caches), aux = nn.scan_layers(
        repeat, (x, caches), (params.blocks, jnp.arange(repeats)), scan=cfg.scan_layers
    )
    x = nn.NORMS[cfg.norm][1](params.ln_f, x, cfg.ln_epsilon)
    return x, jax.tree.map(lambda a: a.sum(0), aux), None if cache is None else caches


def _read_out(params: Decoder, x: Array, cfg) -> Array:
    table = params.wte if params.lm_head is None else params.lm_head
    return nn.unembed(table, x, jnp.dtype(cfg.logits_dtype))


def apply(
    params: Decoder,
    tokens: Array,
    cfg,
    *,
    mask: Array | None = None,
    positions: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Next-token logits.

    Args:
        tokens: ``(B, T)`` int token ids, ``T <= block_size`` with learned positions.
        mask: optional ``(B, T)`` bool padding mask, True for real tokens.
        positions: optional ``(B, T)`` int positions; default ``0..T-1`` in every row.
    Returns:
        ``(logits, aux)``: ``(B, T, V)`` in ``logits_dtype`` (float32 unless configured)
        and the auxiliary losses summed over layers
        (``AUX_KEYS``; zero for dense models).
    """
    x, aux, _ = features(params, tokens, cfg, mask=mask, positions=positions)
    return _read_out(params, x, cfg), aux


def decode(
    params: Decoder,
    tokens: Array,
    cfg,
    *,
    at: Array,
    mask: Array | None = None,
    positions: Array | None = None,
    cache: tuple[nn.KVCache, ...] | None = None,
) -> tuple[Array, tuple[nn.KVCache, ...] | None]:
    """The next-token logits at one position of each row, for generation.

    Args:
        tokens, mask, positions: as in ``apply``.
        at: ``(B,)`` int, the index into T whose logits to return.
        cache: from ``init_cache``; extended with the keys/values of ``tokens``.
    Returns:
        float32 ``(B, V)`` logits and the updated cache.
    """
    x, _, cache = features(params, tokens, cfg, mask=mask, positions=positions, cache=cache)
    x = jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0]  # (B, D)
    return _read_out(params, x, cfg), cache
