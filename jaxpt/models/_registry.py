"""The registry of named presets: each is one config of the decoder (or the bigram table)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections
from jax import Array

from jaxpt.errors import ConfigError
from jaxpt.models import _bigram, _decoder
from jaxpt.models._config import (
    decoder_config,
    mixer_pattern,
    validate_common,
    validate_decoder,
)


@dataclasses.dataclass(frozen=True)
class Model:
    """A named preset: ``default_config()``, ``init(key, cfg)`` and ``apply(params, tokens, cfg)``.

    ``apply`` always returns ``(logits, aux)``: float32 logits ``(B, T, V)`` and a dict of
    auxiliary losses (MoE load balance and router z-loss; zeros for dense models).
    ``init_cache`` and ``decode`` serve generation (``jaxpt.generate``).
    """

    name: str
    summary: str
    _default_config: Callable[[], ml_collections.ConfigDict]
    _init: Callable
    _apply: Callable
    _validate: Callable
    _init_cache: Callable
    _decode: Callable

    def default_config(self) -> ml_collections.ConfigDict:
        """A fresh copy of this preset's model config."""
        return self._default_config()

    def validate(self, cfg) -> None:
        """Raises ConfigError naming the first field of ``cfg`` that breaks a rule."""
        validate_common(cfg, names())
        self._validate(cfg)

    def init(self, key: Array, cfg):
        """Params for ``cfg`` (validated first)."""
        self.validate(cfg)
        return self._init(key, cfg)

    def apply(self, params, tokens: Array, cfg, *, mask=None, positions=None):
        """``(B, T)`` tokens -> ``(logits, aux)``; see the decoder's ``apply`` for arguments."""
        self.validate(cfg)
        return self._apply(params, tokens, cfg, mask=mask, positions=positions)

    def init_cache(self, cfg, batch_size: int, length: int):
        """An empty generation cache for ``length`` positions of ``batch_size`` sequences.

        None when the model cannot be cached (an earlier token's output changes as the
        sequence grows: MoE that can drop tokens, Soft MoE); generation then re-runs the
        whole sequence each step.
        """
        self.validate(cfg)
        return self._init_cache(cfg, batch_size, length)

    def decode(self, params, tokens: Array, cfg, *, at, mask=None, positions=None, cache=None):
        """float32 ``(B, V)`` next-token logits at index ``at[b]`` of each row, and the cache
        extended with ``tokens`` (``(B, T)`` at ``positions``; ``cache=None``: no cache)."""
        self.validate(cfg)
        return self._decode(params, tokens, cfg, at=at, mask=mask, positions=positions, cache=cache)


def _validate_decoder(cfg) -> None:
    validate_decoder(cfg, _decoder.MIXERS)
    for kind in sorted(set(mixer_pattern(cfg))):
        _decoder.MIXERS[kind].validate(cfg)


def decoder_preset(name: str, summary: str, **overrides) -> Model:
    """A registry entry for the decoder with ``overrides`` on the GPT-2 defaults."""
    return Model(
        name,
        summary,
        lambda: decoder_config(name=name, **overrides),
        _decoder.init,
        _decoder.apply,
        _validate_decoder,
        _decoder.init_cache,
        _decoder.decode,
    )


def _bigram_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name="bigram",
            vocab_size=256,  # set from the tokenizer; a (V, V) table, so keep V small
            block_size=256,  # training window length
            init_stddev=0.02,
            dtype="float32",
            param_dtype="float32",
        )
    )


_GLU = dict(mixer="glu", activation="silu", mlp_bias=False)
_ROPE = dict(position="rope")


def _tiny_moe(**overrides) -> dict:
    """The Tiny_MoE family's shared shape (original defaults), updated with ``overrides``."""
    return dict(
        dict(
            block_size=2048,
            n_layer=32,
            n_head=12,
            n_kv_head=4,
            n_embed=576,
            n_mlp_hidden=2304,  # F of the dense GLU layers and of every expert
            activation="silu",
            mlp_bias=False,
            norm="rmsnorm",
            ln_epsilon=1e-6,
            attention_bias=False,
            dtype="bfloat16",
            n_experts=8,
            moe_bias=True,  # expert biases
            **_ROPE,
        ),
        **overrides,
    )


_MODELS = [
    decoder_preset("gpt", "GPT-2 124M: learned positions, GELU MLP, LayerNorm, tied."),
    decoder_preset(
        "vgpt",
        "GPT-2 shape at the exact GPT-2 vocab (50257, loads GPT-2 checkpoints unpadded) "
        "with plain N(0, 0.02) init of every projection (no 1/sqrt(2L) residual scaling).",
        vocab_size=50257,
        proj_init="normal",
    ),
    decoder_preset(
        "nope_gpt", "GPT without position embeddings, ReLU MLP.", position="none", activation="relu"
    ),
    decoder_preset("glu_gpt", "GPT with a SiLU-gated GLU.", **_GLU),
    decoder_preset("rope_gpt", "GPT with rotary positions.", **_ROPE),
    decoder_preset("glu_rope_gpt", "GPT with rotary positions and a GLU.", **_ROPE, **_GLU),
    decoder_preset(
        "gqa_gpt",
        "GPT with grouped-query attention (9 query / 3 KV heads).",
        n_head=9,
        n_kv_head=3,
        n_embed=576,
        attention_bias=False,
    ),
    decoder_preset(
        "gqa_glu_rope_gpt",
        "GQA (12 / 4 heads) with rotary positions and a GLU.",
        n_kv_head=4,
        attention_bias=False,
        **_ROPE,
        **_GLU,
    ),
    decoder_preset(
        "smollm",
        "SmolLM-135M (Llama): GQA 9 / 3, rotary, SiLU GLU, RMSNorm, no biases, tied.",
        vocab_size=49152,
        block_size=2048,
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        n_embed=576,
        n_mlp_hidden=1536,
        norm="rmsnorm",
        attention_bias=False,
        proj_init="normal",
        **_ROPE,
        **_GLU,
    ),
    decoder_preset(
        "tiny_moe",
        "Tiny_MoE: GQA 12 / 4, rotary, RMSNorm; top-2 of 8 SiLU-GLU experts, capacity claimed "
        "by router-weight priority, alternating with GLU layers.",
        **_tiny_moe(
            mixer="moe,glu",
            moe_expert="glu",  # glu (gated) | mlp experts, activation from `activation`
            top_k=2,  # experts per token
            load_factor=1.1,  # slots per expert: ceil(load_factor * top_k * max(1, T / E))
            expert_weight_priority=True,  # surest tokens claim slots first; not causal
            moe_router_bias=False,
        ),
    ),
    decoder_preset(
        "tiny_moe_2",
        "Tiny_MoE_2: MoE in every layer, top-2 of 8 squared-ReLU experts in token order, "
        "QK-norm, zero-initialised residual projections.",
        **_tiny_moe(
            mixer="moe",
            n_layer=30,
            n_embed=672,
            n_mlp_hidden=2048,
            ln_epsilon=1e-5,
            qk_norm=True,
            proj_init="zero",
            activation="squared_relu",
            moe_expert="mlp",
            moe_bias=False,
            top_k=2,
            load_factor=1.25,
            expert_weight_priority=False,
            moe_router_bias=True,
        ),
    ),
    decoder_preset(
        "tiny_moe_3",
        "Tiny_MoE_3: Soft MoE over 8 SiLU-GLU experts (block_size // 8 slots each) "
        "alternating with GLU layers.",
        **_tiny_moe(mixer="soft_moe,glu", moe_expert="glu"),
    ),
    decoder_preset(
        "charformer",
        "Character-level GPT: 30 layers, 960 wide, 15 heads, ReLU MLP, bfloat16 compute.",
        vocab_size=256,
        n_layer=30,
        n_head=15,
        n_kv_head=15,
        n_embed=960,
        n_mlp_hidden=3840,
        activation="relu",
        dtype="bfloat16",
    ),
    Model(
        "bigram",
        "Bigram table: next-token logits from the current token alone.",
        _bigram_config,
        _bigram.init,
        _bigram.apply,
        lambda cfg: None,
        _bigram.init_cache,
        _bigram.decode,
    ),
]
_REGISTRY = {model.name: model for model in _MODELS}


def names() -> tuple[str, ...]:
    """Registry names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Model:
    """The preset called ``name``."""
    if name not in _REGISTRY:
        raise ConfigError(f"model.name={name!r} is not one of {list(_REGISTRY)}.")
    return _REGISTRY[name]
