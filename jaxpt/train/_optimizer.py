"""AdamW with warmup + cosine or warmup-stable-decay, global-norm clipping, a decay mask."""

from __future__ import annotations

import optax

from jaxpt import nn
from jaxpt.errors import ConfigError, check_range

SCHEDULES = ("cosine", "wsd")


def learning_rate(train_cfg) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine to ``lr * min_lr_ratio`` at ``steps``, or (wsd)
    constant until the last ``decay_fraction`` of the steps and linear down to the same floor.
    """
    peak, steps, warmup = train_cfg.lr, train_cfg.steps, train_cfg.warmup_steps
    floor = peak * train_cfg.min_lr_ratio
    if train_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), floor)
    decay_start = max(warmup, int(steps * (1 - train_cfg.decay_fraction)))
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak, warmup),
            optax.constant_schedule(peak),
            optax.linear_schedule(peak, floor, max(steps - decay_start, 1)),
        ],
        boundaries=[warmup, decay_start],
    )


def decay_mask(params, *, decay_embeddings: bool):
    """True for the arrays weight decay applies to: matrices of every layer (rank >= 2 before
    stacking), but not norms, biases, and, unless asked, embedding tables."""
    return nn.map_params(
        lambda layer, array, names: (
            len(names) >= 2 and (decay_embeddings or not isinstance(layer, nn.Embedding))
        ),
        params,
    )


def optimizer(train_cfg, params) -> optax.GradientTransformation:
    """Clip by global norm (``grad_clip`` 0: no clipping), then AdamW on the learning-rate
    schedule."""
    clip = train_cfg.grad_clip
    return optax.chain(
        optax.clip_by_global_norm(clip) if clip else optax.identity(),
        optax.adamw(
            learning_rate(train_cfg),
            b1=train_cfg.b1,
            b2=train_cfg.b2,
            eps=train_cfg.eps,
            weight_decay=train_cfg.weight_decay,
            mask=decay_mask(params, decay_embeddings=train_cfg.decay_embeddings),
        ),
    )


def validate_train(train_cfg) -> None:
    """Raises ConfigError naming the first train field that breaks a rule."""
    for field in ("steps", "batch_size", "grad_accum_steps"):
        check_range(f"train.{field}", train_cfg[field], at_least=1, integer=True)
    if train_cfg.batch_size % train_cfg.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size={train_cfg.batch_size} is not divisible by "
            f"train.grad_accum_steps={train_cfg.grad_accum_steps}: each micro-batch must have "
            "the same number of sequences."
        )
    check_range("train.warmup_steps", train_cfg.warmup_steps, at_least=0, integer=True)
    check_range("train.seed", train_cfg.seed, at_least=0, at_most=2**32 - 1, integer=True)
    check_range("train.lr", train_cfg.lr, above=0)
    check_range(
        "train.min_lr_ratio",
        train_cfg.min_lr_ratio,
        at_least=0,
        at_most=1,
        note=" (the final learning rate is lr * min_lr_ratio)",
    )
    if train_cfg.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule={train_cfg.schedule!r} is not one of {list(SCHEDULES)}.")
    check_range("train.decay_fraction", train_cfg.decay_fraction, at_least=0, at_most=1)
    check_range("train.weight_decay", train_cfg.weight_decay, at_least=0)
    for field in ("b1", "b2"):
        check_range(f"train.{field}", train_cfg[field], at_least=0, below=1)
    check_range("train.eps", train_cfg.eps, above=0)
    check_range(
        "train.grad_clip",
        train_cfg.grad_clip,
        at_least=0,
        note=" (the largest global gradient norm; 0: no clipping)",
    )
    for field in ("load_balance_loss_coeff", "z_loss_coeff"):
        check_range(f"train.{field}", train_cfg[field], at_least=0)
    if train_cfg.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite={train_cfg.on_nonfinite!r} is not 'stop' or 'skip'.")
