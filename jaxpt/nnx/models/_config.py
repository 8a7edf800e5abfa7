"""The original JaxPT's config classes (NNX_API.md §3) and their conversion to and from the
core's ``jaxpt.models.ModelConfig``.

Each config is a mutable, hashable dataclass with the original's fields and defaults. A model
reads ``config.model_config()`` on every call, so a field changed after building the model
(``use_cache``) takes effect at the next call, as in the original.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Literal

import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxpt import models
from jaxpt.errors import ConfigError

# The original's attention implementations; its "slow" one is the core's explicit "einsum".
_SDPA = {"xla": "xla", "cudnn": "cudnn", "slow": "einsum"}
# The original's glu_activation names: silu/swish, tanh-gelu, anything else a sigmoid gate.
_GLU_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu_tanh"}
# Fields that change how the core inits or runs a model, not what its params compute.
_RUN_FIELDS = (
    "name",
    "proj_init",
    "dropout",  # training randomness: the NNX models turn it on by their flags
    "router_noise",
    "scan_layers",
    "remat_policy",
    "logits_dtype",
    "sdpa_implementation",
)


def _dtype_name(field: str, dtype) -> str:
    """The core's name of ``dtype`` (``jnp.bfloat16`` -> ``"bfloat16"``); ConfigError naming
    ``field`` for a value that is no dtype (None would be numpy's default, float64)."""
    try:
        name = None if dtype is None else jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name is None:
        raise ConfigError(
            f"{field}={dtype!r} is not a dtype: use jnp.float32, jnp.bfloat16 or jnp.float16."
        )
    return name


def _rope_base(rope_theta: float) -> float:
    """The core's ``rope_base`` (HF's base), ``1 / rope_theta``; ConfigError naming
    ``rope_theta`` when it is not positive."""
    if not rope_theta > 0:  # nan too
        raise ConfigError(
            f"rope_theta={rope_theta!r} must be a positive number: the inverse frequencies are "
            "rope_theta ** (2j / head width), and rope_theta=1e-4 is a base of 10000."
        )
    return _reciprocal(rope_theta)


def _reciprocal(x: float) -> float:
    """``1 / x`` to 15 significant digits, so that a base goes through ``rope_theta`` and back
    unchanged: 1 / (1 / 100000) is 99999.99999999999 in floats, this 100000.0."""
    return float(f"{1.0 / x:.15g}")


# original field -> (core field, original value -> core value, core config -> original value)
_TO_CORE: dict[str, tuple[str, Any, Any]] = {
    **{
        name: (name, lambda v: v, lambda c, name=name: getattr(c, name))
        for name in (
            "block_size",
            "vocab_size",
            "n_layer",
            "n_head",
            "n_kv_head",
            "n_embed",
            "n_mlp_hidden",
            "ln_epsilon",
            "init_stddev",
            "mlp_bias",
            "attention_bias",
            "n_experts",
            "top_k",
            "load_factor",
            "expert_weight_priority",
            "moe_bias",
            "moe_router_bias",
        )
    },
    # the original's configs hold jax.numpy's scalar types (jnp.bfloat16)
    "dtype": ("dtype", functools.partial(_dtype_name, "dtype"), lambda c: getattr(jnp, c.dtype)),
    "param_dtype": (
        "param_dtype",
        functools.partial(_dtype_name, "param_dtype"),
        lambda c: getattr(jnp, c.param_dtype),
    ),
    "sdpa_implementation": (
        "sdpa_implementation",
        lambda v: _SDPA.get(v, v),
        lambda c: {core: orig for orig, core in _SDPA.items()}.get(c.sdpa_implementation, "xla"),
    ),
    "rope_theta": ("rope_base", _rope_base, lambda c: _reciprocal(c.rope_base)),
    "glu_activation": (
        "activation",
        lambda v: _GLU_ACTIVATIONS.get(v, "sigmoid"),
        lambda c: {"silu": "silu", "gelu_tanh": "gelu"}.get(c.activation, c.activation),
    ),
    "zero_proj_init": (
        "proj_init",
        lambda v: "zero" if v else "scaled",
        lambda c: c.proj_init == "zero",
    ),
    "use_qk_norm": ("qk_norm", lambda v: v, lambda c: c.qk_norm),
    "use_squared_relu": (
        "activation",
        lambda v: "squared_relu" if v else "silu",
        lambda c: c.activation == "squared_relu",
    ),
}


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class Config:
    """The original's ``jaxpt.modules.config.Config``: the fields every model config has.

    Subclasses name the core preset they start from (``preset``) and the core fields their
    architecture fixes (``fixed``); ``model_config()`` converts, ``from_model_config`` converts
    back.
    """

    preset: ClassVar[str] = "gpt"
    fixed: ClassVar[dict[str, Any]] = {}
    # The GPT family and the MoE models return logits in config.dtype; SmolLM in float32.
    logits_in_dtype: ClassVar[bool] = True

    name: str = "gpt"  # the checkpoint folder name
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    zero_proj_init: bool = False

    def model_config(self) -> models.ModelConfig:
        """The core config that computes this model (validated; ConfigError names a bad
        field)."""
        ours = {}
        for field in dataclasses.fields(self):
            if field.name in _TO_CORE:
                core_name, convert, _ = _TO_CORE[field.name]
                ours[core_name] = convert(getattr(self, field.name))
        ours.setdefault("n_kv_head", ours["n_head"])  # no GQA field: multi-head attention
        bf16 = ours["dtype"] == "bfloat16"
        preset = models.get(self.preset).default_config().to_dict()
        return models.ModelConfig.from_dict(
            {
                **preset,
                "scan_layers": True,  # compile time independent of depth
                "dropout": 0.0,  # the original's GPT family and MoE models have none
                "router_noise": 0.0,  # add_noise turns it on
                "logits_dtype": "bfloat16" if bf16 and self.logits_in_dtype else "float32",
                **self.fixed,
                **ours,
            }
        )

    @property
    def logits_dtype(self):
        """The dtype of the logits the model returns."""
        return jnp.dtype(self.dtype) if self.logits_in_dtype else jnp.dtype(jnp.float32)

    @classmethod
    def from_model_config(cls, cfg: models.ModelConfig, **fields):
        """This class's config for the core config ``cfg`` (other fields from ``fields``).

        Raises ConfigError naming the first field of ``cfg`` this architecture cannot hold.
        """
        ours = {
            f.name: _TO_CORE[f.name][2](cfg)
            for f in dataclasses.fields(cls)
            if f.name in _TO_CORE and f.name not in fields
        }
        config = cls(**ours, **fields)
        back = config.model_config().to_dict()
        for name, value in cfg.to_dict().items():
            if name in _RUN_FIELDS or _same(back.get(name), value):
                continue
            raise ConfigError(
                f"model.{name}={value!r} does not fit {cls.__name__}, which has "
                f"{name}={back.get(name)!r}: pick the class of that architecture."
            )
        return config


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class GPTConfig(Config):
    """GPT-2 124M."""

    preset: ClassVar[str] = "gpt"
    fixed: ClassVar[dict[str, Any]] = {}

    block_size: int = 1024
    vocab_size: int = 50304  # 50257 padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embed: int = 768
    n_mlp_hidden: int = 3072
    ln_epsilon: float = 1e-5
    init_stddev: float = 0.02
    sdpa_implementation: Literal["xla", "cudnn", "slow"] = "xla"


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class _GLU:
    """A SiLU-gated (by default) GLU instead of the MLP."""

    mlp_bias: bool = False
    glu_activation: str = "silu"


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class _RoPE:
    rope_theta: float = 1e-4  # inverse frequencies rope_theta ** (2j / hd): 1 / HF's base


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class _GQA:
    n_kv_head: int = 3
    attention_bias: bool = False
    use_cache: bool = False  # read on every call


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class NoPE_GPTConfig(GPTConfig):
    """GPT without position embeddings (hashable, unlike the original's [D18])."""

    preset: ClassVar[str] = "nope_gpt"
    fixed: ClassVar[dict[str, Any]] = dict(activation="gelu_tanh")


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class GLU_GPTConfig(_GLU, GPTConfig):
    preset: ClassVar[str] = "glu_gpt"


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class RoPE_GPTConfig(_RoPE, GPTConfig):
    preset: ClassVar[str] = "rope_gpt"


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class GLU_RoPE_GPTConfig(_GLU, _RoPE, GPTConfig):
    preset: ClassVar[str] = "glu_rope_gpt"


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class GQA_GPTConfig(_GQA, GPTConfig):
    preset: ClassVar[str] = "gqa_gpt"

    n_head: int = 9
    n_embed: int = 576


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class GQA_GLU_RoPE_GPTConfig(_GLU, _RoPE, _GQA, GPTConfig):
    preset: ClassVar[str] = "gqa_glu_rope_gpt"

    n_kv_head: int = 4


VGPTConfig = GPTConfig


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class _Llama(Config):
    """What SmolLM and the MoE configs share (NNX_API.md §3)."""

    name: str = "SmolLM"
    block_size: int = 2048
    vocab_size: int = 50304
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    n_embed: int = 576
    n_mlp_hidden: int = 1536
    ln_epsilon: float = 1e-5
    mlp_bias: bool = False
    attention_bias: bool = False
    use_cache: bool = False
    sdpa_implementation: Literal["xla", "cudnn", "slow"] = "xla"
    rope_theta: float = 1e-4
    init_stddev: float = 0.02
    mesh: Mesh | None = None  # never read


_EXPERTS_SPEC = PartitionSpec("devices")
_LLAMA = dict(mixer="glu", position="rope", norm="rmsnorm", qk_norm=False)


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class SmolLM_Config(_Llama):
    """SmolLM-135M's shape at GPT-2's vocabulary (set vocab_size=49152 for SmolLM's)."""

    preset: ClassVar[str] = "smollm"
    fixed: ClassVar[dict[str, Any]] = _LLAMA
    logits_in_dtype: ClassVar[bool] = False

    vocab_size: int = 50257
    glu_activation: str = "silu"
    pad_token: str = "<pad>"  # never read


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class _MoE(_Llama):
    dtype: Any = jnp.bfloat16
    block_size: int = 2048
    n_layer: int = 32
    n_head: int = 12
    n_kv_head: int = 4
    n_embed: int = 576
    n_mlp_hidden: int = 2304
    ln_epsilon: float = 1e-6
    n_experts: int = 8
    moe_bias: bool = True
    expert_partition_spec: PartitionSpec = _EXPERTS_SPEC  # never read [D5]

    def model_config(self) -> models.ModelConfig:
        """The core config. Raises ConfigError for a ``glu_activation`` other than SiLU: the
        original's experts gate with SiLU whatever it says, and the core's experts share the
        GLU layers' activation."""
        cfg = super().model_config()
        if cfg.activation not in ("silu", "squared_relu"):  # Tiny_MoE_2: use_squared_relu
            raise ConfigError(
                f"{type(self).__name__}.glu_activation={self.glu_activation!r} would gate the "
                f"experts with {cfg.activation}, where the original's experts always use SiLU "
                "(only its GLU layers follow glu_activation): set glu_activation='silu'."
            )
        return cfg


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class _TopK(_MoE):
    top_k: int = 2
    load_factor: float = 1.1
    expert_weight_priority: bool = True
    load_balance_loss_coeff: float = 1e-2  # the caller applies the coefficients
    z_loss_coeff: float = 1e-3


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class Tiny_MoE_Config(_TopK):
    """Top-2 of 8 SiLU-GLU experts in the even layers, GLU in the odd ones."""

    preset: ClassVar[str] = "tiny_moe"
    fixed: ClassVar[dict[str, Any]] = dict(_LLAMA, mixer="moe,glu", moe_expert="glu")

    name: str = "Tiny_MoE"
    glu_activation: str = "silu"

    def model_config(self) -> models.ModelConfig:
        """The core config; the original's router has a bias when ``mlp_bias`` is on."""
        return dataclasses.replace(super().model_config(), moe_router_bias=self.mlp_bias)


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class Tiny_MoE_2_Config(_TopK):
    """MoE in every layer: gated squared-ReLU experts, QK-norm, zero residual projections."""

    preset: ClassVar[str] = "tiny_moe_2"
    fixed: ClassVar[dict[str, Any]] = dict(_LLAMA, mixer="moe", moe_expert="glu")

    name: str = "Tiny_MoE_2"
    zero_proj_init: bool = True
    n_layer: int = 30
    n_embed: int = 672
    n_mlp_hidden: int = 2048
    ln_epsilon: float = 1e-5
    pad_token: str = "<pad>"
    load_factor: float = 1.25
    expert_weight_priority: bool = False
    z_loss_coeff: float = 5e-4
    moe_bias: bool = False
    moe_router_bias: bool = True
    use_qk_norm: bool = True
    use_squared_relu: bool = True


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class Tiny_MoE_3_Config(_MoE):
    """Soft MoE over 8 SiLU-GLU experts in the even layers, GLU in the odd ones."""

    preset: ClassVar[str] = "tiny_moe_3"
    fixed: ClassVar[dict[str, Any]] = dict(_LLAMA, mixer="soft_moe,glu", moe_expert="glu")

    name: str = "Tiny_MoE_3"
    glu_activation: str = "silu"
