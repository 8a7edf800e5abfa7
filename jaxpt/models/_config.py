"""The model configs: typed, frozen, hashable values, validated once when built.

``ModelConfig`` is every field the decoder reads (GPT-2 124M by default), ``BigramConfig`` the
bigram table's. Both are frozen dataclasses: hashable, so a config can be a static argument of
``jax.jit``; immutable, so a jitted function never holds a stale trace of a config that changed
after it was traced; ``dataclasses.replace`` makes a variant and validates it again. A run
config's ``model`` section (ml_collections) converts to one with ``jaxpt.models.config_from``.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxpt import nn
from jaxpt.errors import ConfigError, check_range, did_you_mean
from jaxpt.models import _bigram, _decoder
from jaxpt.models._checks import require, require_choice, require_positive_int
from jaxpt.models._mixers import MIXERS

POSITIONS = ("learned", "rope", "none")
PROJ_INITS = ("normal", "scaled", "zero")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "True or False", str: "a string"}


class _Fields:
    """What both config classes share: type checks, common fields, dict conversion."""

    __slots__ = ()

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]):
        """The config with ``fields`` (a dict or a ConfigDict section) and defaults for the rest;
        a field the class does not have is a ConfigError naming it."""
        fields = dict(fields)
        known = [f.name for f in dataclasses.fields(cls)]
        for name in fields:
            if name not in known:
                raise ConfigError(
                    f"model.{name} is not a {cls.__name__} field: {did_you_mean(name, known)}"
                )
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict, leaving out those that are None (the MoE fields of a dense
        model: a run config's flags cannot override a None)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: value for name, value in values.items() if value is not None}

    def _check_types(self) -> None:
        """Raises ConfigError for the first field whose value has the wrong type; stores the
        integers given for float fields as floats (so equal configs have equal fields)."""
        for name, hint in _field_types(type(self)).items():
            value = getattr(self, name)
            allowed = typing.get_args(hint) or (hint,)  # X | None -> (X, NoneType)
            if not any(_has_type(value, t) for t in allowed):
                what = " or ".join(_TYPE_NAMES.get(t, "None") for t in allowed)
                raise ConfigError(f"model.{name}={value!r} must be {what}.")
            if isinstance(value, int) and float in allowed and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))

    def _check_common(self) -> None:
        """The fields every model has: sizes, dtypes and kernels."""
        require_positive_int("vocab_size", self.vocab_size)
        require_positive_int("block_size", self.block_size)
        check_range("model.init_stddev", self.init_stddev, at_least=0)
        require_choice("dtype", self.dtype, FLOAT_DTYPES)
        require_choice("param_dtype", self.param_dtype, FLOAT_DTYPES)
        require_choice("kernels", self.kernels, nn.KERNELS)


def _cudnn_max_head_dim() -> int:
    """The widest head cuDNN's flash attention takes on this machine's first GPU (JAX's rule:
    256 from compute capability 9.0, Hopper, up; 128 before)."""
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    return 256 if int(capability.split(".")[0]) >= 9 else 128


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _has_type(value, t) -> bool:
    if t in (int, float):  # True is an int to Python, not to a config
        return isinstance(value, int if t is int else (int, float)) and not isinstance(value, bool)
    return isinstance(value, t)


@functools.cache
def _param_count(init: Callable, cfg) -> int:
    shapes = jax.eval_shape(lambda: init(jax.random.key(0), cfg))
    return sum(leaf.size for leaf in jax.tree.leaves(shapes))


@functools.cache
def _active_param_count(init: Callable, cfg) -> int:
    shapes = jax.eval_shape(lambda: init(jax.random.key(0), cfg))
    skipped = 0.0
    for kind, block in zip(cfg.mixer_pattern, shapes.blocks, strict=True):
        used = MIXERS[kind].experts_per_token(cfg)
        if used is not None:
            experts = sum(leaf.size for leaf in jax.tree.leaves(block.mixer.experts))
            skipped += experts * (1 - used / cfg.n_experts)
    return round(_param_count(init, cfg) - skipped)


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig(_Fields):
    """The decoder's fields, at GPT-2 124M defaults; see the README's field table.

    Raises ConfigError naming the first field that breaks a rule. Derived quantities are
    properties: ``head_dim``, ``mixer_pattern``, ``repeats``, ``is_causal``, ``is_cacheable``,
    ``n_params``, ``flops_per_token``, and the specs the layers take.
    """

    name: str = "gpt"  # registry name, see jaxpt.models.names()
    vocab_size: int = 50304  # 50257 GPT-2 tokens padded to a multiple of 64
    block_size: int = 1024  # longest sequence (learned position table size)
    n_layer: int = 12
    n_head: int = 12  # query heads H
    n_kv_head: int = 12  # key/value heads K; H % K == 0 (K < H is grouped-query attention)
    n_embed: int = 768  # width D
    n_mlp_hidden: int = 3072  # F
    mixer: str = "mlp"  # comma-separated repeating pattern of jaxpt.models.MIXERS kinds
    activation: str = "gelu_tanh"  # MLP activation or GLU gate: see jaxpt.nn.ACTIVATIONS
    position: str = "learned"  # learned | rope | none
    rope_base: float = 10000.0  # inverse frequencies base**(-2i/Dh); original rope_theta=1/base
    norm: str = "layernorm"  # layernorm | rmsnorm
    ln_epsilon: float = 1e-5
    attention_bias: bool = True
    mlp_bias: bool = True
    qk_norm: bool = False  # RMSNorm on queries and keys per head
    tie_embeddings: bool = True  # logits read out through the token embedding
    lm_head_bias: bool = False  # a (V,) bias on the untied read-out (the original Charformer)
    init_stddev: float = 0.02
    proj_init: str = "scaled"  # residual-out projections: normal | scaled (1/sqrt(2L)) | zero
    dtype: str = "float32"  # compute dtype (bfloat16 on GPU/TPU)
    param_dtype: str = "float32"
    sdpa_implementation: str = "auto"  # auto | xla | cudnn | einsum (reference)
    # jaxpt's Pallas kernels (the residual-stream norms, the loss): auto (on a GPU) | xla |
    # pallas (everywhere; interpreted off a GPU, slowly: for tests)
    kernels: str = "auto"
    # float32, or bfloat16 as under torch autocast: half the bytes of the largest activation;
    # the loss's softmax statistics are float32 either way
    logits_dtype: str = "float32"
    remat_policy: str = "none"  # none | full | a jax.checkpoint_policies policy: nn.REMAT_POLICIES
    scan_layers: bool = True  # lax.scan over layers (False: unrolled loop, same params)
    # Training-only randomness (apply with a key): embedding, attention-probability and
    # residual dropout rate, as GPT-2 / nanoGPT; and the original JaxPT's router noise,
    # moe router logits * U(1 - router_noise, 1 + router_noise) (its add_noise uses 0.01)
    dropout: float = 0.0
    router_noise: float = 0.0
    # Mixture of experts (mixer kinds moe, soft_moe); None in a dense model
    n_experts: int | None = None  # E
    moe_expert: str | None = None  # glu (gated) | mlp experts, activation from `activation`
    moe_bias: bool | None = None  # expert biases
    top_k: int | None = None  # experts per token (moe)
    load_factor: float | None = None  # slots per expert: ceil(load_factor*top_k*max(1, T/E))
    expert_weight_priority: bool | None = None  # surest tokens claim slots first: not causal
    moe_router_bias: bool | None = None
    # how top-k experts run: padded (one batched matmul over every expert's capacity) | ragged
    # (jax.lax.ragged_dot over exactly the kept choices; dense on CPU, see nn.expert_rows)
    moe_matmul: str = "padded"

    def __post_init__(self) -> None:
        self._check_types()
        self._check_common()
        self._check_sizes()
        self._check_choices()
        self._check_mixers()

    def _check_sizes(self) -> None:
        """Counts, rates and the head layout."""
        for field in ("n_layer", "n_head", "n_kv_head", "n_embed", "n_mlp_hidden"):
            require_positive_int(field, getattr(self, field))
        check_range("model.ln_epsilon", self.ln_epsilon, above=0)
        check_range("model.rope_base", self.rope_base, above=0)
        check_range("model.dropout", self.dropout, at_least=0, below=1)
        check_range("model.router_noise", self.router_noise, at_least=0, below=1)
        require(
            self.n_embed % self.n_head == 0,
            f"model.n_embed={self.n_embed} is not divisible by model.n_head={self.n_head}: "
            "the head width is n_embed // n_head.",
        )
        require(
            self.n_head % self.n_kv_head == 0,
            f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head}: "
            "each key/value head serves a whole group of query heads.",
        )

    def _check_choices(self) -> None:
        """The named options, and the combinations and backends they need."""
        require(
            not (self.lm_head_bias and self.tie_embeddings),
            "model.lm_head_bias=True needs an untied read-out: set model.tie_embeddings=False.",
        )
        require_choice("activation", self.activation, nn.ACTIVATIONS)
        require_choice("position", self.position, POSITIONS)
        require_choice("norm", self.norm, nn.NORMS)
        require_choice("proj_init", self.proj_init, PROJ_INITS)
        require_choice("sdpa_implementation", self.sdpa_implementation, nn.IMPLEMENTATIONS)
        require_choice("logits_dtype", self.logits_dtype, ("float32", "bfloat16"))
        require_choice("moe_matmul", self.moe_matmul, nn.GROUPED_MATMULS)
        if self.position == "rope":
            require(
                self.head_dim % 2 == 0,
                f"rotary embeddings need an even head width; n_embed // n_head = {self.head_dim}.",
            )
        require_choice("remat_policy", self.remat_policy, nn.REMAT_POLICIES)
        if self.sdpa_implementation == "xla" and self.dtype == "float16":  # asks the backend
            backend = jax.default_backend()
            require(
                backend == "gpu",
                f"model.sdpa_implementation='xla' with model.dtype='float16' needs a GPU (jax's "
                f"float16 attention does not compile on {backend}); use 'auto' or 'einsum'.",
            )
        if self.sdpa_implementation == "cudnn":  # asks for the backend: never at import
            backend = jax.default_backend()
            require(
                backend == "gpu",
                f"model.sdpa_implementation='cudnn' needs a GPU; use 'auto' or 'xla' on {backend}.",
            )
            require(
                jnp.dtype(self.dtype).itemsize == 2,
                f"model.sdpa_implementation='cudnn' needs a 16-bit model.dtype, not "
                f"{self.dtype!r}.",
            )
            widest = _cudnn_max_head_dim()
            require(
                self.head_dim % 8 == 0 and self.head_dim <= widest,
                f"model.sdpa_implementation='cudnn' needs a head width (n_embed // n_head = "
                f"{self.head_dim}) that is a multiple of 8 and at most {widest} on this GPU; "
                "use 'auto' or 'xla'.",
            )

    def _check_mixers(self) -> None:
        """The mixer pattern: known kinds, whole repeats, each kind's fields and rules."""
        for kind in self.mixer_pattern:
            require(
                kind in MIXERS,
                f"model.mixer={self.mixer!r} names {kind!r}, not one of {sorted(MIXERS)}.",
            )
        require(
            self.n_layer % len(self.mixer_pattern) == 0,
            f"model.n_layer={self.n_layer} is not a multiple of the model.mixer pattern "
            f"{self.mixer!r} ({len(self.mixer_pattern)} layers).",
        )
        for kind in sorted(set(self.mixer_pattern)):
            for field in MIXERS[kind].needs:
                require(
                    getattr(self, field) is not None,
                    f"model.mixer={self.mixer!r} uses {kind!r}, which needs model.{field}; "
                    "start from a MoE preset (tiny_moe, tiny_moe_2, tiny_moe_3).",
                )
            MIXERS[kind].validate(self)
        for field, default in (("router_noise", 0), ("moe_matmul", "padded")):
            value = getattr(self, field)
            require(
                value == default or self.has_router,
                f"model.{field}={value!r} needs a top-k router (a 'moe' layer in "
                f"model.mixer={self.mixer!r}); set it to {default!r}.",
            )

    @property
    def head_dim(self) -> int:
        """Dh, the width of one attention head."""
        return self.n_embed // self.n_head

    @property
    def mixer_pattern(self) -> tuple[str, ...]:
        """The repeating block pattern, e.g. ``"moe,glu"`` -> ``("moe", "glu")``."""
        return tuple(kind.strip() for kind in self.mixer.split(","))

    @property
    def has_router(self) -> bool:
        """Whether a layer routes tokens to its top-k experts (a ``moe`` layer): what
        ``router_noise``, ``moe_matmul`` and the router losses act on."""
        return "moe" in self.mixer_pattern

    @property
    def repeats(self) -> int:
        """How many times the mixer pattern repeats over the layers."""
        return self.n_layer // len(self.mixer_pattern)

    @property
    def is_causal(self) -> bool:
        """Whether logits at ``t`` never depend on later tokens (false for some MoE configs)."""
        return all(MIXERS[kind].causal(self) for kind in self.mixer_pattern)

    @property
    def is_cacheable(self) -> bool:
        """Whether every layer's output at ``t`` is fixed once tokens ``<= t`` are (KV cache)."""
        return all(MIXERS[kind].cacheable(self) for kind in self.mixer_pattern)

    @property
    def max_length(self) -> int:
        """The longest sequence the model takes (the learned position table's size)."""
        return self.block_size

    @property
    def residual_out_std(self) -> float:
        """Init std of a projection that writes into the residual stream.

        ``proj_init``: ``"normal"`` uses ``init_stddev``; ``"scaled"`` divides it by
        ``sqrt(2 * n_layer)`` (GPT-2: two residual writes per layer); ``"zero"`` starts at zero.
        """
        scale = {"normal": 1.0, "scaled": (2 * self.n_layer) ** -0.5, "zero": 0.0}
        return self.init_stddev * scale[self.proj_init]

    @property
    def attention_spec(self) -> nn.AttentionSpec:
        """What every attention layer of the model computes."""
        return nn.AttentionSpec(
            n_head=self.n_head,
            n_kv_head=self.n_kv_head,
            head_dim=self.head_dim,
            qk_norm=self.qk_norm,
            norm_eps=self.ln_epsilon,
            rope_base=self.rope_base if self.position == "rope" else None,
            implementation=self.sdpa_implementation,
            dropout=self.dropout,
        )

    @property
    def moe_spec(self) -> nn.MoESpec:
        """How the top-k MoE layers route (mixer kind ``moe``)."""
        return nn.MoESpec(
            n_experts=self.n_experts,
            top_k=self.top_k,
            load_factor=self.load_factor,
            expert_weight_priority=self.expert_weight_priority,
            grouped_matmul=self.moe_matmul,
            router_noise=self.router_noise,
        )

    @property
    def n_params(self) -> int:
        """The number of parameters (from ``jax.eval_shape`` of ``init``: nothing allocated)."""
        return _param_count(_decoder.init, self)

    @property
    def n_active_params(self) -> int:
        """The parameters one token runs through: ``n_params`` less the experts it skips (a
        top-k layer runs ``top_k`` of its ``n_experts``, a Soft MoE layer about one expert's
        worth); equal to ``n_params`` for a dense model."""
        return _active_param_count(_decoder.init, self)

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per token: ``6 N + 12 L D T`` (PaLM appendix B; nanoGPT's MFU), plus
        Soft MoE's ``12 S D`` per Soft MoE layer.

        ``6 N`` is the forward and backward matmuls over the ``N`` active parameters
        (``n_active_params``: tied embedding counted once, position table included, as the
        torch reference counts; a mixture of experts counts the experts a token uses, as
        MaxText and PaLM do); ``12 L D T`` is attention's scores and weighted sum at sequence
        length ``T = block_size``; a Soft MoE layer's dispatch and combine over its
        ``S = n_experts * (block_size // n_experts)`` slots are the same kind of matmul
        (``Mixer.mixing_flops``).
        """
        attention = 12.0 * self.n_layer * self.n_embed * self.block_size
        mixing = self.repeats * sum(MIXERS[kind].mixing_flops(self) for kind in self.mixer_pattern)
        return 6.0 * self.n_active_params + attention + mixing


@dataclasses.dataclass(frozen=True, slots=True)
class BigramConfig(_Fields):
    """The bigram table's fields; raises ConfigError naming the first that breaks a rule."""

    name: str = "bigram"
    vocab_size: int = 256  # set from the tokenizer; a (V, V) table, so keep V small
    block_size: int = 256  # training window length
    init_stddev: float = 0.02
    dtype: str = "float32"  # the run configs' common key; the table's logits are float32
    param_dtype: str = "float32"
    kernels: str = "auto"  # the loss's Pallas kernel: auto (on a GPU) | xla | pallas

    def __post_init__(self) -> None:
        self._check_types()
        self._check_common()

    is_causal = True  # the next token depends on the current one alone
    is_cacheable = True
    max_length = None  # reads one token at a time: any length

    @property
    def n_params(self) -> int:
        """``V * V``."""
        return _param_count(_bigram.init, self)

    @property
    def n_active_params(self) -> int:
        """``n_params``: the table has no experts."""
        return self.n_params

    @property
    def flops_per_token(self) -> float:
        """``6 V``: the forward and backward of one table row."""
        return 6.0 * self.vocab_size
