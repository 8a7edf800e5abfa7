"""The registry of named presets: each is one config of the decoder (or the bigram table).

Research code adds its own with ``register``; a registered name then works wherever a run
config names a model (``model.name``): the launcher, ``jaxpt.generate``, Hugging Face export.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
from jax import Array

from jaxpt.errors import ConfigError
from jaxpt.models import _bigram, _decoder
from jaxpt.models._config import BigramConfig, ModelConfig


class Architecture(NamedTuple):
    """The functions of one kind of model; see ``Model`` for their arguments."""

    init: Callable
    apply: Callable
    init_cache: Callable
    prepare_decoding: Callable
    decode: Callable


ARCHITECTURES: dict[type, Architecture] = {
    ModelConfig: Architecture(
        _decoder.init,
        _decoder.apply,
        _decoder.init_cache,
        _decoder.prepare_decoding,
        _decoder.decode,
    ),
    BigramConfig: Architecture(
        _bigram.init,
        _bigram.apply,
        _bigram.init_cache,
        _bigram.prepare_decoding,
        _bigram.decode,
    ),
}


@dataclasses.dataclass(frozen=True)
class Model:
    """A named preset: ``default_config()``, ``init(key, cfg)`` and ``apply(params, tokens, cfg)``.

    ``apply`` always returns ``(logits, aux)``: ``(B, T, V)`` logits and a dict of auxiliary
    losses (MoE load balance and router z-loss; zeros for dense models). ``init_cache`` and
    ``decode`` serve generation (``jaxpt.generate``), which calls ``decode`` in a loop on
    params from ``prepare_decoding`` (``decode`` takes the params as they are, too). Every
    method takes a config of the preset's class (``ModelConfig`` or ``BigramConfig``),
    validated when it was built.
    """

    name: str
    summary: str
    config: ModelConfig | BigramConfig

    def default_config(self) -> ModelConfig | BigramConfig:
        """This preset's model config (immutable: ``dataclasses.replace`` makes variants)."""
        return self.config

    def _architecture(self, cfg) -> Architecture:
        kind = type(self.config)
        if not isinstance(cfg, kind):
            raise ConfigError(
                f"model {self.name!r} takes a {kind.__name__}, not a {type(cfg).__name__}: "
                "convert a run config's model section with jaxpt.models.config_from."
            )
        return ARCHITECTURES[kind]

    def init(self, key: Array, cfg):
        """Params for ``cfg``, in ``cfg.param_dtype``, drawn by one compiled program."""
        return _compiled_init(self._architecture(cfg).init)(key, cfg)

    def apply(self, params, tokens: Array, cfg, *, mask=None, positions=None, key=None):
        """``(B, T)`` tokens -> ``(logits, aux)``; see the decoder's ``apply`` for arguments
        (``key``: training randomness, None for deterministic)."""
        arch = self._architecture(cfg)
        return arch.apply(params, tokens, cfg, mask=mask, positions=positions, key=key)

    def init_cache(self, batch_size: int, length: int, cfg):
        """An empty generation cache for ``length`` positions of ``batch_size`` sequences.

        None when the model cannot be cached (an earlier token's output changes as the
        sequence grows: MoE that can drop tokens, Soft MoE); generation then re-runs the
        whole sequence each step.
        """
        return self._architecture(cfg).init_cache(batch_size, length, cfg)

    def prepare_decoding(self, params, cfg):
        """``params`` laid out for ``decode`` in a loop, computed once before it (the
        decoder's unrolled layers: split out of their stacks)."""
        return self._architecture(cfg).prepare_decoding(params, cfg)

    def decode(self, params, tokens: Array, cfg, *, at, mask=None, positions=None, cache=None):
        """float32 ``(B, V)`` next-token logits at index ``at[b]`` of each row (``at=None``:
        ``(B, T, V)`` at every index), and the cache extended with ``tokens`` (``(B, T)`` at
        ``positions``; ``cache=None``: no cache)."""
        arch = self._architecture(cfg)
        return arch.decode(params, tokens, cfg, at=at, mask=mask, positions=positions, cache=cache)


_REGISTRY: dict[str, Model] = {}


def register(name: str, config: ModelConfig | BigramConfig, *, summary: str = "") -> Model:
    """Adds the preset ``name``: ``config`` with its ``name`` field set to ``name``.

    Raises ConfigError if the name is taken or ``config`` is not a model config.
    """
    if name in _REGISTRY:
        raise ConfigError(f"model.name={name!r} is already registered: pick another name.")
    if type(config) not in ARCHITECTURES:
        raise ConfigError(
            f"register takes a ModelConfig or BigramConfig, not a {type(config).__name__}."
        )
    model = Model(name, summary, dataclasses.replace(config, name=name))
    _REGISTRY[name] = model
    return model


def unregister(name: str) -> None:
    """Removes the preset ``name`` (e.g. one a test registered)."""
    get(name)  # an unknown name is one sentence
    del _REGISTRY[name]


def names() -> tuple[str, ...]:
    """Registry names, in registration order."""
    return tuple(_REGISTRY)


@functools.cache
def _compiled_init(init: Callable) -> Callable:
    """``init(key, cfg)`` compiled for each config (static: configs are hashable). Op by op,
    the README's 4-layer example drew its params in 8.2 s on a 2-core CPU; compiled, 5.3 s,
    compilation included. Under an outer ``jit`` or ``eval_shape`` it is traced inline."""
    return jax.jit(init, static_argnums=1)


def get(name: str) -> Model:
    """The preset called ``name``."""
    if name not in _REGISTRY:
        raise ConfigError(f"model.name={name!r} is not one of {list(_REGISTRY)}.")
    return _REGISTRY[name]


def config_from(section: Mapping[str, Any]) -> ModelConfig | BigramConfig:
    """The model config of a run config's ``model`` section (or any mapping of fields): the
    preset ``section["name"]`` with the section's fields, validated.

    A field the preset's class does not have is a ConfigError naming it.
    """
    fields = dict(section)
    preset = get(fields.get("name")).config
    return type(preset).from_dict({**preset.to_dict(), **fields})


# The presets are the full-size models as a run trains them on a GPU or TPU: float32 params,
# bfloat16 compute and logits (as under torch autocast; the loss reduces in float32), and an
# unrolled layer loop, which makes the GPT-2 train step 1.2x faster on an H200 than the
# scanned one (bench/train_step.py, bench/profile_step.py; compiling takes longer, once a run).
_RUN = dict(dtype="bfloat16", logits_dtype="bfloat16", scan_layers=False)
_GLU = dict(mixer="glu", activation="silu", mlp_bias=False)
_ROPE = dict(position="rope")


def _decoder_preset(name: str, summary: str, **fields) -> None:
    register(name, ModelConfig(**{**_RUN, **fields}), summary=summary)


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
            n_experts=8,
            moe_bias=True,
            **_ROPE,
        ),
        **overrides,
    )


_decoder_preset("gpt", "GPT-2 124M: learned positions, GELU MLP, LayerNorm, tied.")
_decoder_preset(
    "vgpt",
    "GPT-2 shape at the exact GPT-2 vocab (50257, loads GPT-2 checkpoints unpadded) "
    "with plain N(0, 0.02) init of every projection (no 1/sqrt(2L) residual scaling).",
    vocab_size=50257,
    proj_init="normal",
)
_decoder_preset(
    "nope_gpt", "GPT without position embeddings, ReLU MLP.", position="none", activation="relu"
)
_decoder_preset("glu_gpt", "GPT with a SiLU-gated GLU.", **_GLU)
_decoder_preset("rope_gpt", "GPT with rotary positions.", **_ROPE)
_decoder_preset("glu_rope_gpt", "GPT with rotary positions and a GLU.", **_ROPE, **_GLU)
_decoder_preset(
    "gqa_gpt",
    "GPT with grouped-query attention (9 query / 3 KV heads).",
    n_head=9,
    n_kv_head=3,
    n_embed=576,
    attention_bias=False,
)
_decoder_preset(
    "gqa_glu_rope_gpt",
    "GQA (12 / 4 heads) with rotary positions and a GLU.",
    n_kv_head=4,
    attention_bias=False,
    **_ROPE,
    **_GLU,
)
_decoder_preset(
    "smollm",
    "SmolLM-135M (Llama): GQA 9 / 3, rotary, SiLU GLU, RMSNorm, no biases, tied; residual-out "
    "projections at 0.02 / sqrt(2L), as the original JaxPT inits them.",
    vocab_size=49152,
    block_size=2048,
    n_layer=30,
    n_head=9,
    n_kv_head=3,
    n_embed=576,
    n_mlp_hidden=1536,
    norm="rmsnorm",
    attention_bias=False,
    **_ROPE,
    **_GLU,
)
_decoder_preset(
    "tiny_moe",
    "Tiny_MoE: GQA 12 / 4, rotary, RMSNorm; top-2 of 8 SiLU-GLU experts, capacity claimed "
    "by router-weight priority, alternating with GLU layers.",
    **_tiny_moe(
        mixer="moe,glu",
        moe_expert="glu",
        top_k=2,
        load_factor=1.1,
        expert_weight_priority=True,
        moe_router_bias=False,
        router_noise=0.01,  # the original's add_noise, on in training
    ),
)
_decoder_preset(
    "tiny_moe_2",
    "Tiny_MoE_2: MoE in every layer, top-2 of 8 gated squared-ReLU experts in token order, "
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
        moe_expert="glu",  # the original's w_c_proj(relu(w_gate x)^2 * w_c_fc x)
        moe_bias=False,
        top_k=2,
        load_factor=1.25,
        expert_weight_priority=False,
        moe_router_bias=True,
        router_noise=0.01,
    ),
)
_decoder_preset(
    "tiny_moe_3",
    "Tiny_MoE_3: Soft MoE over 8 SiLU-GLU experts (block_size // 8 slots each) "
    "alternating with GLU layers.",
    **_tiny_moe(mixer="soft_moe,glu", moe_expert="glu"),
)
_decoder_preset(
    "charformer",
    "Character-level GPT: 30 layers, 960 wide, 15 heads, ReLU MLP, dropout 0.1, an untied "
    "read-out with a bias, bfloat16 compute.",
    vocab_size=256,
    n_layer=30,
    n_head=15,
    n_kv_head=15,
    n_embed=960,
    n_mlp_hidden=3840,
    activation="relu",
    dropout=0.1,
    tie_embeddings=False,
    lm_head_bias=True,
)
register(
    "bigram",
    BigramConfig(),
    summary="Bigram table: next-token logits from the current token alone.",
)
