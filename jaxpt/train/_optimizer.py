"""AdamW with warmup + cosine or warmup-stable-decay, global-norm clipping, a decay mask."""

from __future__ import annotations

import optax

from jaxpt import nn
from jaxpt.errors import ConfigError

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
    """Clip by global norm, then AdamW on the learning-rate schedule."""
    return optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip),
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
    checks = [
        (train_cfg.steps > 0, f"train.steps={train_cfg.steps} must be positive."),
        (train_cfg.batch_size > 0, f"train.batch_size={train_cfg.batch_size} must be positive."),
        (
            train_cfg.grad_accum_steps > 0,
            f"train.grad_accum_steps={train_cfg.grad_accum_steps} must be positive.",
        ),
        (
            train_cfg.batch_size % train_cfg.grad_accum_steps == 0,
            f"train.batch_size={train_cfg.batch_size} is not divisible by "
            f"train.grad_accum_steps={train_cfg.grad_accum_steps}: each micro-batch must have "
            "the same number of sequences.",
        ),
        (
            train_cfg.schedule in SCHEDULES,
            f"train.schedule={train_cfg.schedule!r} is not one of {list(SCHEDULES)}.",
        ),
        (train_cfg.warmup_steps >= 0, f"train.warmup_steps={train_cfg.warmup_steps} must be >= 0."),
        (train_cfg.lr > 0, f"train.lr={train_cfg.lr} must be positive."),
        (
            train_cfg.on_nonfinite in ("stop", "skip"),
            f"train.on_nonfinite={train_cfg.on_nonfinite!r} is not 'stop' or 'skip'.",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
