"""The model config: every field the decoder reads, with defaults, and its validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxpt.errors import ConfigError
from jaxpt.nn import ACTIVATIONS, IMPLEMENTATIONS, NORMS

POSITIONS = ("learned", "rope", "none")
PROJ_INITS = ("normal", "scaled", "zero")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def decoder_config(**overrides) -> ml_collections.ConfigDict:
    """The decoder's fields at GPT-2 124M defaults, updated with ``overrides``."""
    cfg = ml_collections.ConfigDict(
        dict(
            name="gpt",  # registry name, see jaxpt.models.names()
            vocab_size=50304,  # 50257 GPT-2 tokens padded to a multiple of 64
            block_size=1024,  # longest sequence (learned position table size)
            n_layer=12,
            n_head=12,  # query heads H
            n_kv_head=12,  # key/value heads K; H % K == 0 (K < H is grouped-query attention)
            n_embed=768,  # width D
            n_mlp_hidden=3072,  # F
            mixer="mlp",  # comma-separated repeating pattern of: mlp, glu (and MoE kinds)
            activation="gelu_tanh",  # MLP activation or GLU gate: see jaxpt.nn.ACTIVATIONS
            position="learned",  # learned | rope | none
            rope_base=10000.0,  # inverse frequencies base**(-2i/Dh); original rope_theta=1/base
            norm="layernorm",  # layernorm | rmsnorm
            ln_epsilon=1e-5,
            attention_bias=True,
            mlp_bias=True,
            qk_norm=False,  # RMSNorm on queries and keys per head
            tie_embeddings=True,  # logits read out through the token embedding
            init_stddev=0.02,
            proj_init="scaled",  # residual-out projections: normal | scaled (1/sqrt(2L)) | zero
            dtype="float32",  # compute dtype (bfloat16 on GPU/TPU)
            param_dtype="float32",
            sdpa_implementation="auto",  # auto | xla | cudnn | einsum (reference)
            # float32, or bfloat16 as under torch autocast: half the bytes of the largest
            # activation; the loss's softmax statistics are float32 either way
            logits_dtype="float32",
            remat_policy="none",  # none | full | a jax.checkpoint_policies name
            scan_layers=True,  # lax.scan over layers (False: unrolled loop, same params)
            # An HF checkpoint directory or hub name a run starts from when its workdir has no
            # checkpoint yet (see jaxpt.hf); "" for none. init and apply never read it.
            init_from="",
        )
    )
    cfg.update(overrides)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(cfg, field: str, choices) -> None:
    value = cfg[field]
    _require(
        value in choices,
        f"model.{field}={value!r} is not one of {sorted(choices)}: pick one of those.",
    )


def validate_common(cfg, names) -> None:
    """Checks the fields every model has: name, sizes and dtypes."""
    _choice(cfg, "name", names)
    for field in ("vocab_size", "block_size"):
        _require(
            isinstance(cfg[field], int) and cfg[field] > 0,
            f"model.{field}={cfg[field]!r} must be a positive integer.",
        )
    _choice(cfg, "dtype", FLOAT_DTYPES)
    _choice(cfg, "param_dtype", FLOAT_DTYPES)


def validate_decoder(cfg, mixers) -> None:
    """Raises ConfigError naming the first decoder field that breaks a rule."""
    for field in ("n_layer", "n_head", "n_kv_head", "n_embed", "n_mlp_hidden"):
        _require(
            isinstance(cfg[field], int) and cfg[field] > 0,
            f"model.{field}={cfg[field]!r} must be a positive integer.",
        )
    _require(
        cfg.n_embed % cfg.n_head == 0,
        f"model.n_embed={cfg.n_embed} is not divisible by model.n_head={cfg.n_head}: "
        "the head width is n_embed // n_head.",
    )
    _require(
        cfg.n_head % cfg.n_kv_head == 0,
        f"model.n_head={cfg.n_head} is not divisible by model.n_kv_head={cfg.n_kv_head}: "
        "each key/value head serves a whole group of query heads.",
    )
    pattern = mixer_pattern(cfg)
    for kind in pattern:
        _require(
            kind in mixers,
            f"model.mixer={cfg.mixer!r} names {kind!r}, not one of {sorted(mixers)}.",
        )
    _require(
        cfg.n_layer % len(pattern) == 0,
        f"model.n_layer={cfg.n_layer} is not a multiple of the model.mixer pattern "
        f"{cfg.mixer!r} ({len(pattern)} layers).",
    )
    _choice(cfg, "activation", ACTIVATIONS)
    _choice(cfg, "position", POSITIONS)
    _choice(cfg, "norm", NORMS)
    _choice(cfg, "proj_init", PROJ_INITS)
    _choice(cfg, "sdpa_implementation", IMPLEMENTATIONS)
    _choice(cfg, "logits_dtype", ("float32", "bfloat16"))
    _require(
        isinstance(cfg.init_from, str),
        f"model.init_from={cfg.init_from!r} must be a checkpoint directory, a hub name or '' "
        "(none).",
    )
    if cfg.position == "rope":
        _require(
            (cfg.n_embed // cfg.n_head) % 2 == 0,
            f"rotary embeddings need an even head width; n_embed // n_head = "
            f"{cfg.n_embed // cfg.n_head}.",
        )
    _require(
        cfg.remat_policy in ("none", "full") or cfg.remat_policy in dir(jax.checkpoint_policies),
        f"model.remat_policy={cfg.remat_policy!r} is not 'none', 'full' or a "
        "jax.checkpoint_policies name (e.g. 'dots_saveable').",
    )
    _require(
        cfg.sdpa_implementation != "cudnn" or jax.default_backend() == "gpu",
        "model.sdpa_implementation='cudnn' needs a GPU; use 'auto' or 'xla' on "
        f"{jax.default_backend()}.",
    )
    _require(
        cfg.sdpa_implementation != "cudnn" or jnp.dtype(cfg.dtype).itemsize == 2,
        f"model.sdpa_implementation='cudnn' needs a 16-bit model.dtype, not {cfg.dtype!r}.",
    )


def mixer_pattern(cfg) -> tuple[str, ...]:
    """The repeating block pattern, e.g. ``"moe,glu"`` -> ``("moe", "glu")``."""
    return tuple(kind.strip() for kind in cfg.mixer.split(","))
