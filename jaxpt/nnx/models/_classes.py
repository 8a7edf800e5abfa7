"""The original JaxPT's model classes (NNX_API.md §2), each a ``jaxpt.models`` preset.

Call conventions: ``model(idx)`` (the GPT family also takes ``mask=None``) and
``model(idx, mask=None)`` (SmolLM, MoE) return logits; Tiny_MoE returns ``(logits, lb, z)``
when a loss flag is on and Tiny_MoE_2 always does, a disabled term being ``0``; Bigram and
Charformer take ``(idx, targets=None)`` and ignore the targets.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from jaxpt import models
from jaxpt.errors import ConfigError
from jaxpt.nnx.models import _config as c
from jaxpt.nnx.models import _layout
from jaxpt.nnx.models._module import ConfiguredModel, FunctionalModel, init_params


class _Decoder(ConfiguredModel):
    def __call__(self, idx: Array, mask: Array | None = None) -> Array:
        """``(B, T)`` int tokens (``mask``: optional ``(B, T)`` bool, True for real tokens)
        -> ``(B, T, V)`` logits."""
        logits, _ = self._run(idx, mask)
        return logits.astype(self.config.logits_dtype)


class GPT(_Decoder):
    config_class = c.GPTConfig
    layout = _layout.gpt_layout()


class NoPE_GPT(_Decoder):
    config_class = c.NoPE_GPTConfig
    layout = _layout.gpt_layout()


class GLU_GPT(_Decoder):
    config_class = c.GLU_GPTConfig
    layout = _layout.gpt_layout(mixer="glu")


class RoPE_GPT(_Decoder):
    config_class = c.RoPE_GPTConfig
    layout = _layout.gpt_layout()


class GLU_RoPE_GPT(_Decoder):
    config_class = c.GLU_RoPE_GPTConfig
    layout = _layout.gpt_layout(mixer="glu")


class GQA_GPT(_Decoder):
    config_class = c.GQA_GPTConfig
    layout = _layout.gpt_layout(gqa=True)
    has_cache = True


class GQA_GLU_RoPE_GPT(_Decoder):
    config_class = c.GQA_GLU_RoPE_GPTConfig
    layout = _layout.gpt_layout(mixer="glu", gqa=True)
    has_cache = True


VGPT = GPT  # the original's vgpt module fails to import [D2]; it was GPT


class SmolLM(_Decoder):
    config_class = c.SmolLM_Config
    layout = _layout.llama_layout(glu="mlp")
    has_cache = True


class _TopKMoE(_Decoder):
    """Top-k MoE with the original's flags, set by ``model.train(add_noise=...,
    load_balance_loss=..., z_loss=...)`` (all False at first; ``eval()`` keeps them)."""

    layout = _layout.llama_layout(glu="glu")
    has_cache = True
    always_returns_losses: ClassVar[bool] = False

    def __init__(self, config: c.Config | None = None, rngs: nnx.Rngs | None = None):
        super().__init__(config, rngs)
        self.add_noise = False
        self.load_balance_loss = False
        self.z_loss = False

    def _randomness(self, cfg):
        """Router noise (logits times U(0.99, 1.01), the original's) while ``add_noise`` is
        on, from the ``gate_noise`` stream (the default stream where there is none)."""
        if not self.add_noise:
            return cfg, None
        return dataclasses.replace(cfg, router_noise=0.01), self.rngs.gate_noise()

    def _check_flags_fit_the_cache(self) -> None:
        """ConfigError where a training flag is on while ``use_cache`` is: the cache is the
        core's decoding path, which draws no router noise and computes no losses."""
        flags = {
            "add_noise": self.add_noise,
            "load_balance_loss": self.load_balance_loss,
            "z_loss": self.z_loss,
        }
        on = [flag for flag, value in flags.items() if value]
        if on and self._use_cache():
            raise ConfigError(
                f"use_cache=True with {', '.join(on)} on: the cache serves decoding, which "
                "draws no router noise and computes no loss; turn the flags off "
                f"(model.train({'=False, '.join(on)}=False)) or set use_cache=False."
            )

    def __call__(self, idx: Array, mask: Array | None = None):
        """``(B, T)`` tokens -> logits, or ``(logits, load_balance_loss, z_loss)`` summed
        over layers when a loss flag is on (or always, ``always_returns_losses``)."""
        self._check_flags_fit_the_cache()
        logits, aux = self._run(idx, mask)
        logits = logits.astype(self.config.logits_dtype)
        if not (self.always_returns_losses or self.load_balance_loss or self.z_loss):
            return logits
        lb = aux["load_balance_loss"] if self.load_balance_loss else 0
        z = aux["z_loss"] if self.z_loss else 0
        return logits, lb, z


class Tiny_MoE(_TopKMoE):
    config_class = c.Tiny_MoE_Config


class Tiny_MoE_2(_TopKMoE):
    config_class = c.Tiny_MoE_2_Config
    always_returns_losses = True


class Tiny_MoE_3(_Decoder):
    config_class = c.Tiny_MoE_3_Config
    layout = _layout.llama_layout(glu="glu")
    has_cache = True


def _generate(model, key: Array, idx: Array, max_new_tokens: int, window: int | None) -> Array:
    """The original's sampling loop, one categorical draw per row (it drew ``(B, 1)`` from
    ``(B, V)`` logits, which fails unless B = 1 [D22]). ``window``: the tokens the model
    sees."""
    for _ in range(max_new_tokens):
        key = jax.random.split(key)[0]
        logits = model(idx if window is None else idx[:, -window:])[:, -1]  # (B, V)
        idx_next = jax.random.categorical(key, jax.nn.log_softmax(logits))[:, None]  # (B, 1)
        idx = jnp.concatenate([idx, idx_next.astype(idx.dtype)], axis=1)  # (B, T + 1)
    return idx


class Bigram(FunctionalModel):
    """``Bigram(vocab_size, rngs)``: the core's bigram table."""

    layout = _layout.BIGRAM_LAYOUT

    def __init__(self, vocab_size: int, rngs: nnx.Rngs):
        self.config = models.BigramConfig(vocab_size=vocab_size)
        self._set_up(init_params(rngs.params(), self.config), rngs)

    def model_config(self) -> models.BigramConfig:
        return self.config

    def __call__(self, idx: Array, targets: Array | None = None) -> Array:
        """``(B, T)`` tokens -> float32 ``(B, T, V)`` logits; ``targets`` is ignored."""
        del targets
        return self._run(idx, None)[0]

    def generate(self, key: Array, idx: Array, max_new_tokens: int) -> Array:
        """``(B, T)`` -> ``(B, T + max_new_tokens)``, sampled."""
        return _generate(self, key, idx, max_new_tokens, window=None)


class Charformer(FunctionalModel):
    """``Charformer(vocab_size, features, num_heads, num_blocks, block_size, rngs)``: the
    core's ``charformer`` preset at those sizes (pre-norm GPT, ReLU MLP, dropout 0.1, an
    untied read-out with a bias)."""

    layout = _layout.CHARFORMER_LAYOUT
    deterministic = False  # dropout on until eval(), as in the original

    def __init__(self, vocab_size, features, num_heads, num_blocks, block_size, rngs: nnx.Rngs):
        preset = models.get("charformer").default_config()
        self.config = dataclasses.replace(
            preset,
            vocab_size=vocab_size,
            n_embed=features,
            n_head=num_heads,
            n_kv_head=num_heads,
            n_layer=num_blocks,
            block_size=block_size,
            n_mlp_hidden=4 * features,
            ln_epsilon=1e-6,  # flax's LayerNorm default
            tie_embeddings=False,
            dtype="float32",
            logits_dtype="float32",
            scan_layers=True,
        )
        self._set_up(init_params(rngs.params(), self.config), rngs)

    def model_config(self) -> models.ModelConfig:
        return self.config

    def _randomness(self, cfg):
        """Dropout (0.1) until ``eval()``, from the ``dropout`` stream (or the default)."""
        if self.deterministic:
            return dataclasses.replace(cfg, dropout=0.0), None
        return cfg, self.rngs.dropout()

    def __call__(self, idx: Array, targets: Array | None = None) -> Array:
        """``(B, T)`` tokens -> float32 ``(B, T, V)`` logits; ``targets`` is ignored."""
        del targets
        return self._run(idx, None)[0]

    def generate(self, key: Array, idx: Array, block_size: int, max_new_tokens: int) -> Array:
        """``(B, T)`` -> ``(B, T + max_new_tokens)``; the model sees the last ``block_size``
        tokens."""
        return _generate(self, key, idx, max_new_tokens, window=block_size)
