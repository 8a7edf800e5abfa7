"""One configurable decoder-only transformer behind every GPT-family preset.

Pre-norm blocks as in GPT-2 (Radford et al., 2019; HF ``modeling_gpt2.py``) and Llama
(Touvron et al., 2023; HF ``modeling_llama.py``): ``x + attn(norm(x))``, then
``x + mixer(norm(x))``. Config fields choose positions (learned | rope | none), the mixer
pattern (mlp | glu | moe | soft_moe), heads (MHA or GQA), norm and init. Layers are stacked
on a leading axis per position in the mixer pattern and run with ``lax.scan`` over the pattern
repeats, so compile time does not grow with depth.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from jaxpt import nn
from jaxpt.errors import DataError
from jaxpt.models._mixers import MIXERS

if TYPE_CHECKING:
    from jaxpt.models._config import ModelConfig

# Logical axes of the residual stream (B, T, D) at every block boundary: split by batch, each
# device holding whole rows (tensor parallel layers gather and reduce inside the block).
RESIDUAL_AXES = ("batch", None, None)


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
    lm_head: nn.Embedding | nn.ReadOut | None  # (V, D), untied read-out only; with lm_head_bias
    # a ReadOut that adds a (V,) bias


def init_block(key: Array, cfg: ModelConfig, kind: str) -> Block:
    """One layer whose feed-forward part is ``MIXERS[kind]``."""
    k_attn, k_mixer = jax.random.split(key)
    init_norm = nn.NORMS[cfg.norm].init
    return Block(
        ln_1=init_norm(cfg.n_embed, cfg.param_dtype),
        attn=nn.init_attention(
            k_attn,
            cfg.n_embed,
            cfg.attention_spec,
            bias=cfg.attention_bias,
            std=cfg.init_stddev,
            out_std=cfg.residual_out_std,
            dtype=cfg.param_dtype,
        ),
        ln_2=init_norm(cfg.n_embed, cfg.param_dtype),
        mixer=MIXERS[kind].init(k_mixer, cfg),
    )


def init(key: Array, cfg: ModelConfig) -> Decoder:
    """Params for the model config ``cfg``, in ``cfg.param_dtype``."""
    k_wte, k_wpe, k_blocks, k_head = jax.random.split(key, 4)
    pattern = cfg.mixer_pattern
    block_keys = jax.random.split(k_blocks, len(pattern))
    table = dict(std=cfg.init_stddev, dtype=cfg.param_dtype)
    return Decoder(
        wte=nn.init_embedding(k_wte, cfg.vocab_size, cfg.n_embed, axes=("vocab", "embed"), **table),
        wpe=nn.init_embedding(k_wpe, cfg.block_size, cfg.n_embed, axes=(None, "embed"), **table)
        if cfg.position == "learned"
        else None,
        blocks=tuple(
            nn.stack_layers(lambda k, kind=kind: init_block(k, cfg, kind), key, cfg.repeats)
            for kind, key in zip(pattern, block_keys, strict=True)
        ),
        ln_f=nn.NORMS[cfg.norm].init(cfg.n_embed, cfg.param_dtype),
        lm_head=_init_read_out(k_head, cfg),
    )


def _init_read_out(key: Array, cfg: ModelConfig) -> nn.Embedding | nn.ReadOut | None:
    """The untied read-out table (None when tied), N(0, init_stddev^2), with a zero bias if
    ``cfg.lm_head_bias``."""
    if cfg.tie_embeddings:
        return None
    init = nn.init_read_out if cfg.lm_head_bias else nn.init_embedding
    table = dict(axes=("vocab", "embed"), std=cfg.init_stddev, dtype=cfg.param_dtype)
    return init(key, cfg.vocab_size, cfg.n_embed, **table)


@jax.named_scope("block")
def block(
    p: Block,
    x: Array,
    cfg: ModelConfig,
    kind: str,
    *,
    positions: Array,
    mask: Array | None,
    cache: nn.KVCache | None = None,
    layer: Array | int = 0,
    key: Array | None = None,
) -> tuple[Array, dict[str, Array], nn.KVCache | None]:
    """``(B, T, D)`` -> ``(B, T, D)``, the layer's auxiliary losses and its updated cache.

    ``kind`` names the layer's mixer (``MIXERS``). With a ``cache`` (stacked over layers) the
    attention reads and extends its entry ``layer`` (see ``nn.cached_attention``). With a
    ``key`` (training) attention probabilities and both residual writes are dropped at
    ``cfg.dropout`` and the mixer draws its router noise.
    """
    k_attn, k_attn_out, k_mixer, k_mixer_out = _split(key, 4)
    norm = nn.NORMS[cfg.norm].apply
    h = norm(p.ln_1, x, cfg.ln_epsilon, kernels=cfg.kernels)
    if cache is None:
        y = nn.attention(p.attn, h, cfg.attention_spec, positions=positions, mask=mask, key=k_attn)
    else:
        y, cache = nn.cached_attention(
            p.attn,
            h,
            cfg.attention_spec,
            cache=cache,
            positions=positions,
            layer=layer,
            kernels=cfg.kernels,
        )
    x = x + nn.dropout(y, cfg.dropout, k_attn_out)
    h = norm(p.ln_2, x, cfg.ln_epsilon, kernels=cfg.kernels)
    y, aux = MIXERS[kind].apply(p.mixer, h, cfg, mask=mask, key=k_mixer)
    return x + nn.dropout(y, cfg.dropout, k_mixer_out), aux, cache


def _split(key: Array | None, n: int) -> tuple[Array | None, ...]:
    """``n`` keys from ``key``, or ``n`` Nones without one (no randomness)."""
    return (None,) * n if key is None else tuple(jax.random.split(key, n))


def init_cache(batch_size: int, length: int, cfg: ModelConfig) -> tuple[nn.KVCache, ...] | None:
    """An empty KV cache for ``length`` positions, stacked like ``Decoder.blocks``.

    None when the config cannot be cached (MoE that can drop tokens, Soft MoE): an earlier
    token's output there changes as the sequence grows; see ``ModelConfig.is_cacheable``.
    """
    if not cfg.is_cacheable:
        return None
    spec = cfg.attention_spec
    return tuple(
        nn.init_kv_cache(batch_size, length, spec, layers=cfg.repeats, dtype=cfg.dtype)
        for _ in cfg.mixer_pattern
    )


def features(
    params: Decoder,
    tokens: Array,
    cfg: ModelConfig,
    *,
    mask: Array | None = None,
    positions: Array | None = None,
    cache: tuple[nn.KVCache, ...] | None = None,
    key: Array | None = None,
):
    """The final normalised hidden states: ``(B, T, D)``, summed aux losses, updated cache.

    ``key`` (training) turns on dropout and router noise: the embedding's own key, and one
    per layer (the pattern repeat's key folded with the position in the pattern).
    """
    b, t = tokens.shape
    real = "one per token, True for real ones (e.g. an int 0/1 mask's .astype(bool))"
    _check_like_tokens("mask", mask, tokens.shape, jnp.bool_, "bool", real)
    where = "each token's position in its sequence"
    _check_like_tokens("positions", positions, tokens.shape, jnp.integer, "integer", where)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    x = _embed(params, tokens, positions, cfg)  # (B, T, D)
    k_embed, k_layers = _split(key, 2)
    x = nn.constrain(nn.dropout(x, cfg.dropout, k_embed), RESIDUAL_AXES)
    repeat_keys = None if key is None else jax.random.split(k_layers, cfg.repeats)
    caches = (None,) * len(cfg.mixer_pattern) if cache is None else cache
    repeat = functools.partial(_repeat, cfg=cfg, positions=positions, mask=mask)
    repeat = nn.remat(repeat, cfg.remat_policy)
    (x, caches), aux = nn.scan_layers(
        repeat,
        (x, caches),
        (params.blocks, jnp.arange(cfg.repeats), repeat_keys),
        scan=cfg.scan_layers,
    )
    x = nn.NORMS[cfg.norm].apply(params.ln_f, x, cfg.ln_epsilon, kernels=cfg.kernels)
    return x, jax.tree.map(lambda a: a.sum(0), aux), None if cache is None else caches


def _check_like_tokens(name: str, a: Array | None, shape: tuple, kind, what: str, meaning: str):
    """A DataError when traced unless ``a`` is None or an array of the tokens' ``shape`` and
    of ``kind`` (a jnp dtype or abstract type such as ``jnp.integer``, named ``what``)."""
    if a is None or (a.shape == shape and jnp.issubdtype(a.dtype, kind)):
        return
    got = a.dtype if a.shape == shape else a.shape
    raise DataError(f"{name} must be a {shape} {what} array, not {got}: {meaning}.")


def _embed(params: Decoder, tokens: Array, positions: Array, cfg: ModelConfig) -> Array:
    """Token embeddings, plus learned position embeddings where the model has them:
    ``(B, T, D)`` in ``cfg.dtype``.

    With learned positions, ``T`` beyond the table (``block_size`` rows) is a DataError when
    traced: the lookup past the table's end would fill the embeddings, and every logit, with
    NaN.
    """
    dtype = jnp.dtype(cfg.dtype)
    x = nn.embed(params.wte, tokens, dtype)
    if params.wpe is not None:
        if tokens.shape[1] > params.wpe.weight.shape[0]:
            raise DataError(
                f"{tokens.shape[1]} tokens per sequence exceed model.block_size="
                f"{params.wpe.weight.shape[0]}, the length of the learned position table: "
                "pass at most block_size tokens, or use a model with a larger block_size."
            )
        x = x + nn.embed(params.wpe, positions, dtype)
    return x


def _repeat(carry, layer, *, cfg: ModelConfig, positions: Array, mask: Array | None):
    """One repeat of the mixer pattern, a block of each kind in turn: the ``scan_layers`` body
    over ``((x, caches), (blocks, repeat index, repeat key))``.

    The caches ride in the carry, whole, and each layer writes its rows in place: as scanned
    inputs/outputs they would be copied every step.
    """
    x, caches = carry
    blocks, index, repeat_key = layer
    auxes, new_caches = [], []
    for i, (kind, p, c) in enumerate(zip(cfg.mixer_pattern, blocks, caches, strict=True)):
        k = None if repeat_key is None else jax.random.fold_in(repeat_key, i)
        x, aux, c = block(
            p, x, cfg, kind, positions=positions, mask=mask, cache=c, layer=index, key=k
        )
        x = nn.constrain(x, RESIDUAL_AXES)
        auxes.append(aux)
        new_caches.append(c)
    return (x, tuple(new_caches)), jax.tree.map(lambda *a: sum(a), *auxes)


def _read_out(params: Decoder, x: Array, cfg: ModelConfig) -> Array:
    dtype = jnp.dtype(cfg.logits_dtype)
    if cfg.lm_head_bias:
        return nn.read_out(params.lm_head, x, dtype)
    table = params.wte if params.lm_head is None else params.lm_head
    table, x = nn.weight_gradients_first(table, x)
    return nn.unembed(table, x, dtype)


def apply(
    params: Decoder,
    tokens: Array,
    cfg: ModelConfig,
    *,
    mask: Array | None = None,
    positions: Array | None = None,
    key: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Next-token logits.

    Args:
        tokens: ``(B, T)`` int token ids, ``T <= block_size`` with learned positions.
        mask: optional ``(B, T)`` bool padding mask, True for real tokens.
        positions: optional ``(B, T)`` int positions; default ``0..T-1`` in every row.
        key: training randomness (``cfg.dropout``, ``cfg.router_noise``); None (evaluation,
            generation) is deterministic.
    A ``mask`` or ``positions`` of another shape or dtype is a DataError when traced.
    Returns:
        ``(logits, aux)``: ``(B, T, V)`` in ``logits_dtype`` (float32 unless configured)
        and the auxiliary losses summed over layers
        (``AUX_KEYS``; zero for dense models).
    """
    x, aux, _ = features(params, tokens, cfg, mask=mask, positions=positions, key=key)
    return _read_out(params, x, cfg), aux


def prepare_decoding(params: Decoder, cfg: ModelConfig) -> Decoder:
    """``params`` for a decoding loop: with unrolled layers, the blocks split into layers once,
    before the loop (``nn.split_layers``), instead of at every step inside it."""
    if cfg.scan_layers:
        return params
    return eqx.tree_at(lambda p: p.blocks, params, nn.split_layers(params.blocks))


def decode(
    params: Decoder,
    tokens: Array,
    cfg: ModelConfig,
    *,
    at: Array | None,
    mask: Array | None = None,
    positions: Array | None = None,
    cache: tuple[nn.KVCache, ...] | None = None,
) -> tuple[Array, tuple[nn.KVCache, ...] | None]:
    """The next-token logits at one position of each row, for generation.

    Args:
        tokens, mask, positions: as in ``apply``.
        at: ``(B,)`` int, the index into T whose logits to return; None: every index.
        cache: from ``init_cache``; extended with the keys/values of ``tokens``.
    Returns:
        ``(B, V)`` logits in ``logits_dtype`` (``(B, T, V)`` when ``at`` is None) and the
        updated cache.
    """
    x, _, cache = features(params, tokens, cfg, mask=mask, positions=positions, cache=cache)
    if at is not None:
        x = jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0]  # (B, D)
    return _read_out(params, x, cfg), cache
