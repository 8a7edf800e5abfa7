"""Optimizers (AdamW, Adam, Adafactor, Lion, Muon) on a learning-rate schedule (warmup, then
cosine, warmup-stable-decay or inverse square root), global-norm clipping, a decay mask."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from optax._src import factorized

from jaxpt import nn
from jaxpt.errors import ConfigError, check_range

SCHEDULES = ("cosine", "wsd", "inverse_sqrt")
WSD_DECAY_FRACTION = 0.2  # wsd's decay with train.decay_fraction unset: the last fifth


def learning_rate(train_cfg) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine to ``lr * min_lr_ratio`` at ``steps``; or (wsd)
    constant until the last ``decay_fraction`` of the steps (unset: ``WSD_DECAY_FRACTION``)
    and linear down to the same floor;
    or (inverse_sqrt, as T5 and fairseq) ``lr * sqrt(warmup_steps / step)``, never below that
    floor.
    """
    peak, steps, warmup = train_cfg.lr, train_cfg.steps, train_cfg.warmup_steps
    floor = peak * train_cfg.min_lr_ratio
    if train_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), floor)
    if train_cfg.schedule == "inverse_sqrt":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), _inverse_sqrt(peak, warmup, floor)],
            boundaries=[warmup],
        )
    # The last ceil(steps * decay_fraction) steps; rounded first, as 10 * (1 - 0.9) is
    # 0.99999... in floats, which truncated to a 10-step decay instead of 9.
    fraction = train_cfg.decay_fraction
    fraction = WSD_DECAY_FRACTION if fraction is None else fraction
    decay_steps = math.ceil(round(steps * fraction, 6))
    decay_start = max(warmup, steps - decay_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak, warmup),
            optax.constant_schedule(peak),
            optax.linear_schedule(peak, floor, max(steps - decay_start, 1)),
        ],
        boundaries=[warmup, decay_start],
    )


def schedule_count(opt_state) -> jax.Array:
    """The count ``optimizer``'s learning-rate schedule reads: the updates applied so far,
    which lags the train state's step by the non-finite steps skipped (they keep the state)."""
    is_schedule = lambda path, value: path[-1].tuple_name == "ScaleByScheduleState"
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count", filtering=is_schedule)
    return counts[0][1]  # Muon's partition keeps one per part, all equal


def warmup_note(train_cfg) -> str | None:
    """A sentence for the start of a run whose warmup does not end before ``train.steps`` (a
    short run of a full-size preset, say), where the learning rate never reaches ``lr`` nor
    follows the schedule; None for any other run."""
    steps, warmup = train_cfg.steps, train_cfg.warmup_steps
    if warmup < steps:
        return None
    last = float(learning_rate(train_cfg)(steps - 1))
    return (
        f"note: train.warmup_steps={warmup} is not below train.steps={steps}, so the learning "
        f"rate only warms up, to {last:.3g} ({last / train_cfg.lr:.0%} of train.lr) at the last "
        f"step, and the {train_cfg.schedule} schedule never starts; lower train.warmup_steps "
        "to follow it"
    )


def _inverse_sqrt(peak: float, warmup: int, floor: float) -> optax.Schedule:
    """``peak * sqrt(w / (w + count))`` with ``w = max(warmup, 1)``: ``peak`` when the warmup
    ends (``count`` counts from there; ``join_schedules`` also evaluates it before), at least
    ``floor``."""
    w = max(warmup, 1)
    return lambda count: jnp.maximum(peak * jnp.sqrt(w / (w + jnp.maximum(count, 0))), floor)


def decay_mask(params, *, decay_embeddings: bool):
    """True for the arrays weight decay applies to: matrices of every layer (rank >= 2 before
    stacking, the expert axis aside: an expert's bias is a vector), but not norms, biases,
    and, unless asked, embedding and read-out tables."""
    tables = (nn.Embedding, nn.ReadOut)
    return nn.map_params(
        lambda layer, array, names: (
            len(names) - ("expert" in names) >= 2
            and (decay_embeddings or not isinstance(layer, tables))
        ),
        params,
    )


def hyperparameters(train_cfg) -> dict:
    """The ``b1``, ``b2`` and ``eps`` that ``train.optimizer`` reads (``OPTIMIZER_DEFAULTS``'
    keys), each the train config's (a ConfigDict, or a checkpoint's stored dict) where set,
    else the optimizer's default."""
    return {
        field: default if train_cfg.get(field) is None else train_cfg[field]
        for field, default in OPTIMIZER_DEFAULTS[train_cfg["optimizer"]].items()
    }


# The train fields besides b1, b2 and eps that shape the updates from a given step on
_UPDATE_FIELDS = (
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "schedule",
    "decay_fraction",
    "weight_decay",
    "decay_embeddings",
    "grad_clip",
    "load_balance_loss_coeff",
    "z_loss_coeff",
)


def resume_note(stored_train: dict, train_cfg, step: int) -> str | None:
    """A sentence for a run resuming checkpoint ``step`` (whose train config was
    ``stored_train``, of the same optimizer) with other updates than it trained with: another
    learning rate, schedule, decay, clip or loss coefficient (``_UPDATE_FIELDS``: ``steps``,
    raised to train on, is not one), or other ``b1``, ``b2`` or ``eps``, set otherwise or a
    default that changed (Lion's ``b2`` was AdamW's 0.95 before 0.99); None where they agree,
    or ``stored_train`` names no optimizer."""
    if stored_train.get("optimizer") != train_cfg.optimizer:
        return None
    stored = [f for f in _UPDATE_FIELDS if f in stored_train]  # older checkpoints lack some
    before = {**{f: stored_train[f] for f in stored}, **hyperparameters(stored_train)}
    now = {**{f: train_cfg[f] for f in stored}, **hyperparameters(train_cfg)}
    changed = [field for field in now if before[field] != now[field]]
    if not changed:
        return None
    values = ", ".join(
        f"train.{f}={_shown(now[f])} (checkpoint {step}: {_shown(before[f])})" for f in changed
    )
    return (
        f"note: this run goes on with {values}; {_flags_of(before, changed)} to train on as before"
    )


def _flags_of(before: dict, changed: list[str]) -> str:
    """What to pass for the ``changed`` fields to take their ``before`` values again (a field
    that was unset is left out: the command line cannot unset one)."""
    keep = [f"--config.train.{f}={_shown(before[f])}" for f in changed if before[f] is not None]
    unset = [f"--config.train.{f}" for f in changed if before[f] is None]
    return " and ".join(
        ([f"pass {' '.join(keep)}"] if keep else [])
        + ([f"leave {' '.join(unset)} out"] if unset else [])
    )


def _shown(value) -> str:
    """A train field's value as a flag takes it (``3e-4``, ``cosine``, ``True``), or unset."""
    if value is None:
        return "unset"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _adamw(train_cfg, lr: optax.Schedule, mask, params) -> optax.GradientTransformation:
    """AdamW (Loshchilov and Hutter, 2019): weight decay decoupled from the moments."""
    del params
    return optax.adamw(
        lr, **hyperparameters(train_cfg), weight_decay=train_cfg.weight_decay, mask=mask
    )


def _adam(train_cfg, lr: optax.Schedule, mask, params) -> optax.GradientTransformation:
    """Adam with L2 weight decay added to the gradient before the moments (torch.optim.Adam's
    ``weight_decay``); plain Adam at ``weight_decay`` 0."""
    del params
    return optax.chain(
        optax.add_decayed_weights(train_cfg.weight_decay, mask),
        optax.adam(lr, **hyperparameters(train_cfg)),
    )


def _adafactor(train_cfg, lr: optax.Schedule, mask, params) -> optax.GradientTransformation:
    """Adafactor (Shazeer and Stern, 2018) at optax's defaults: factored second moments, no
    momentum, updates clipped to RMS 1 and scaled by the param's RMS, each layer of a stacked
    array its own param (``optax.adafactor`` took the whole stack's RMS, and factored the
    moments of a stack of 128 or more layers or experts over that axis); decoupled weight decay
    (``b1``, ``b2`` and ``eps`` are Adam's and unused). optax adds the decay after the learning
    rate, so it is scaled by the schedule here: ``lr * weight_decay`` per step, as AdamW decays.
    The chain and its state are ``optax.adafactor``'s (see ``_factored_rms_per_slice``)."""
    decay = lambda count: train_cfg.weight_decay * lr(count)
    stacked = _leading_axes(params, experts=False)
    return optax.chain(
        _factored_rms_per_slice(_leading_axes(params, experts=True)),
        _scale_per_layer(lambda update, param, rms: 1 / jnp.maximum(1.0, rms(update)), stacked),
        optax.scale_by_learning_rate(lr, flip_sign=False),
        _scale_per_layer(lambda update, param, rms: jnp.maximum(rms(param), 1e-3), stacked),
        optax.add_decayed_weights(decay, mask),
        optax.scale(-1),
    )


def _leading_axes(params, *, experts: bool):
    """Each array's number of leading stacked-layer axes, and with ``experts`` its expert axis
    (an expert layer's first) too."""
    return nn.map_params(
        lambda layer, array, names: (
            array.ndim - len(names) + (experts and names[:1] == ("expert",))
        ),
        params,
    )


_MIN_DIM_TO_FACTOR = 128  # optax's default
_FACTORED_RMS = optax.scale_by_factored_rms(min_dim_size_to_factor=_MIN_DIM_TO_FACTOR)
_SLICE_AXES = optax.FactoredState(count=None, v_row=0, v_col=0, v=0)  # one count for all


def _factored_rms_per_slice(sliced_axes) -> optax.GradientTransformation:
    """``optax.scale_by_factored_rms`` (at its defaults) with each slice of an array its own
    param: ``sliced_axes`` (a tree like the params) counts each array's leading layer and
    expert axes, and a slice's second moments are factored over the dims optax picks for that
    slice alone (its two largest, when both reach 128), as Adafactor on the unstacked model.

    The state is optax's ``FactoredState``. An array whose whole shape optax factors over the
    same dims (or, like its slices, not at all) runs through optax whole and keeps optax's
    state shapes (its ``row_col_mean`` is then per slice too); the others (128 or more layers
    or experts, where optax factored over that axis, or factored stacked vectors) hold their
    slices' states stacked, of other shapes: restore refuses a checkpoint with optax's state
    for them in one sentence naming the array.
    """
    n_sliced_by_path = dict(jax.tree.leaves_with_path(sliced_axes))

    def per_array(fn, path, x, in_axes, out_axes):
        return _per_slice(fn, x.shape, n_sliced_by_path[path], in_axes, out_axes)

    def init_fn(params):
        leaves, treedef = jax.tree.flatten_with_path(params)
        init = lambda path, x: per_array(_FACTORED_RMS.init, path, x, 0, _SLICE_AXES)(x)
        return _gathered_state(jnp.zeros([], jnp.int32), treedef, [init(*leaf) for leaf in leaves])

    def update_fn(updates, state, params):
        leaves, treedef = jax.tree.flatten_with_path(updates)
        trees = (state.v_row, state.v_col, state.v, params)

        def update(path, x, v_row, v_col, v, param):
            in_axes, out_axes = (0, _SLICE_AXES, 0), (0, _SLICE_AXES)
            array_state = optax.FactoredState(state.count, v_row, v_col, v)
            return per_array(_FACTORED_RMS.update, path, x, in_axes, out_axes)(
                x, array_state, param
            )

        per_leaf = map(treedef.flatten_up_to, trees)
        results = [update(*leaf, *rest) for leaf, *rest in zip(leaves, *per_leaf, strict=True)]
        new_updates = treedef.unflatten([update for update, _ in results])
        count = optax.safe_increment(state.count)
        return new_updates, _gathered_state(count, treedef, [s for _, s in results])

    return optax.GradientTransformation(init_fn, update_fn)


def _per_slice(fn: Callable, shape: tuple, n_sliced: int, in_axes, out_axes) -> Callable:
    """``fn``, or, where optax would factor other dims of an array of ``shape`` than of one
    slice (``shape`` without its ``n_sliced`` leading axes), ``fn`` vmapped over those axes."""
    if _factored_dims(shape) == _factored_dims(shape[n_sliced:], offset=n_sliced):
        return fn
    for _ in range(n_sliced):
        fn = jax.vmap(fn, in_axes, out_axes)
    return fn


def _factored_dims(shape: tuple, offset: int = 0) -> tuple[int, int] | None:
    """The dims optax factors an array of ``shape`` over (plus ``offset``), or None."""
    dims = factorized._factored_dims(shape, True, _MIN_DIM_TO_FACTOR)
    return None if dims is None else (dims[0] + offset, dims[1] + offset)


def _gathered_state(count, treedef, states: list) -> optax.FactoredState:
    """One ``FactoredState`` of ``count`` from each array's (in ``treedef``'s order)."""
    gather = lambda field: treedef.unflatten([getattr(s, field) for s in states])
    return optax.FactoredState(count, gather("v_row"), gather("v_col"), gather("v"))


def _scale_per_layer(factor: Callable, stacked) -> optax.GradientTransformation:
    """Multiplies each update by ``factor(update, param, rms)``, where ``rms(x)`` is the root
    mean square of each layer's slice of ``x`` (its ``stacked`` leading axes are layers),
    shaped to broadcast against it."""

    def update_fn(updates, state, params):
        def scaled(update, param, n_stacked):
            axes = tuple(range(n_stacked, update.ndim))
            rms = lambda x: jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True))
            return update * factor(update, param, rms)

        return jax.tree.map(scaled, updates, params, stacked), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _lion(train_cfg, lr: optax.Schedule, mask, params) -> optax.GradientTransformation:
    """Lion (Chen et al., 2023): the sign of interpolated momenta (``b1``, ``b2``), decoupled
    weight decay. Lion's steps are larger than Adam's: its authors use a 3-10x smaller lr."""
    del params
    return optax.lion(
        lr, **hyperparameters(train_cfg), weight_decay=train_cfg.weight_decay, mask=mask
    )


def _muon(train_cfg, lr: optax.Schedule, mask, params) -> optax.GradientTransformation:
    """Muon (Jordan et al., 2024; ``optax.contrib.muon``) for the matrices of every layer
    (stacked layer and expert axes are batch axes), AdamW for embeddings, norms and biases, as
    modded-nanogpt trains. Muon's updates are scaled to AdamW's RMS (``consistent_rms=0.2``,
    Liu et al., 2025), so both share ``lr`` and ``weight_decay``."""
    matrices = _muon_matrices(params)
    return optax.partition(
        {
            "muon": optax.contrib.muon(
                lr,
                weight_decay=train_cfg.weight_decay,  # every matrix is in the decay mask
                muon_weight_dimension_numbers=_muon_dimensions,
                consistent_rms=0.2,
            ),
            "adamw": _adamw(train_cfg, lr, mask, params),
        },
        jax.tree.map(lambda muon: "muon" if muon else "adamw", matrices),
    )


def _muon_matrices(params):
    """True for the weights of linear layers (per layer and expert), False for the rest."""
    return nn.map_params(
        lambda layer, array, names: (
            isinstance(layer, (nn.Linear, nn.ExpertLinear)) and array is layer.weight
        ),
        params,
    )


def _muon_dimensions(updates):
    """Each matrix's input (reduction) and output axes: its last two; the rest are batch."""
    return jax.tree.map(
        lambda u: optax.contrib.MuonDimensionNumbers(u.ndim - 2, u.ndim - 1), updates
    )


OPTIMIZERS: dict[str, Callable] = {
    "adamw": _adamw,
    "adam": _adam,
    "adafactor": _adafactor,
    "lion": _lion,
    "muon": _muon,
}
# What each optimizer reads of train.b1, train.b2 and train.eps, and what it takes for a field
# left unset (None); it reads no other (setting one is refused). Muon's AdamW part reads them.
_GPT2_ADAMW = {"b1": 0.9, "b2": 0.95, "eps": 1e-8}
OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "adamw": _GPT2_ADAMW,
    "adam": _GPT2_ADAMW,
    "adafactor": {},  # no momentum; its second-moment decay is its own (1 - step^-0.8)
    "lion": {"b1": 0.9, "b2": 0.99},  # Chen et al., 2023, as optax.lion; no eps (a sign)
    "muon": _GPT2_ADAMW,
}


def optimizer(train_cfg, params) -> optax.GradientTransformation:
    """Clip by global norm (``grad_clip`` 0: no clipping), then ``train.optimizer`` on the
    learning-rate schedule, with weight decay on ``decay_mask``'s arrays."""
    clip = train_cfg.grad_clip
    mask = decay_mask(params, decay_embeddings=train_cfg.decay_embeddings)
    rule = OPTIMIZERS[train_cfg.optimizer]
    return optax.chain(
        optax.clip_by_global_norm(clip) if clip else optax.identity(),
        rule(train_cfg, learning_rate(train_cfg), mask, params),
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
    if train_cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"train.optimizer={train_cfg.optimizer!r} is not one of {list(OPTIMIZERS)}."
        )
    if train_cfg.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule={train_cfg.schedule!r} is not one of {list(SCHEDULES)}.")
    _check_decay_fraction(train_cfg)
    check_range("train.weight_decay", train_cfg.weight_decay, at_least=0)
    _check_hyperparameters(train_cfg)
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


def _check_decay_fraction(train_cfg) -> None:
    """ConfigError for a ``decay_fraction`` that is set (not None) where ``train.schedule``
    is not wsd, the one schedule that reads it, or out of [0, 1]."""
    fraction, schedule = train_cfg.decay_fraction, train_cfg.schedule
    if fraction is None:
        return
    if schedule != "wsd":
        raise ConfigError(
            f"train.decay_fraction={fraction!r} has no effect with train.schedule={schedule!r} "
            "(only 'wsd' decays over a fraction of the steps): leave train.decay_fraction "
            "unset (None), or set train.schedule='wsd'."
        )
    check_range("train.decay_fraction", fraction, at_least=0, at_most=1)


def _check_hyperparameters(train_cfg) -> None:
    """ConfigError for a ``b1``, ``b2`` or ``eps`` that is set (not None) where
    ``train.optimizer`` does not read it, or out of its range."""
    name, reads = train_cfg.optimizer, OPTIMIZER_DEFAULTS[train_cfg.optimizer]
    for field in ("b1", "b2", "eps"):
        value = train_cfg[field]
        if value is None:
            continue
        if field not in reads:
            read = " and ".join(f"train.{f}" for f in reads) or "none of b1, b2 and eps"
            raise ConfigError(
                f"train.{field}={value!r} has no effect with train.optimizer={name!r}, which "
                f"reads {read}: leave train.{field} unset (None), or choose an optimizer "
                "that reads it."
            )
        if field == "eps":
            check_range("train.eps", value, above=0)
        else:
            check_range(f"train.{field}", value, at_least=0, below=1)
