"""The train state and the jitted train / eval steps."""

from __future__ import annotations

import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax import Array

from jaxpt import models, nn, sharding
from jaxpt.train._optimizer import learning_rate, optimizer, schedule_count


class TrainState(eqx.Module):
    """Everything a step reads and writes."""

    step: Array  # () int32, the number of steps taken
    params: eqx.Module
    opt_state: optax.OptState


def init_state(
    key: Array, cfg: models.ModelConfig | models.BigramConfig, tx: optax.GradientTransformation
) -> TrainState:
    """Fresh params for the model config ``cfg`` and a fresh optimizer state."""
    return start_state(models.get(cfg.name).init(key, cfg), tx)


def start_state(params, tx: optax.GradientTransformation) -> TrainState:
    """Step 0 from ``params`` (fresh or imported) with a fresh optimizer state."""
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def loss_fn(
    params,
    inputs: Array,
    targets: Array,
    cfg: models.ModelConfig | models.BigramConfig,
    *,
    key: Array | None = None,
    loss_mask: Array | None = None,
    load_balance_loss_coeff: float = 0.0,
    z_loss_coeff: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """Next-token loss plus the weighted auxiliary losses.

    Args:
        inputs, targets: ``(B, T)`` token ids; ``targets`` are ``inputs`` shifted by one.
        cfg: the model config.
        key: training randomness (dropout, router noise; see ``training_key``); None:
            deterministic, as in evaluation.
        loss_mask: optional ``(B, T)``, 1 where the target counts (e.g. the assistant's tokens
            of chat data); ``ce`` is then the mean over those targets only.
        load_balance_loss_coeff, z_loss_coeff: weights of the MoE losses in ``aux``.
    Returns:
        ``(loss, metrics)`` with the cross-entropy ``ce`` and the raw auxiliary losses.
    """
    logits, aux = models.get(cfg.name).apply(params, inputs, cfg, key=key)
    ce = nn.cross_entropy(logits, targets, loss_mask, kernels=cfg.kernels)
    loss = ce + load_balance_loss_coeff * aux["load_balance_loss"] + z_loss_coeff * aux["z_loss"]
    return loss, {"loss": loss, "ce": ce, **aux}


def _run_loss(config) -> Callable:
    """``loss(params, inputs, targets, *, loss_mask=None)`` of the run config ``config``
    (model and train)."""
    return functools.partial(
        loss_fn,
        cfg=models.config_from(config.model),
        load_balance_loss_coeff=config.train.load_balance_loss_coeff,
        z_loss_coeff=config.train.z_loss_coeff,
    )


# XLA:GPU records a whole train step as one CUDA graph and re-records it on every call (its
# buffers move): about 7 ms of host time per GPT-2 124M step on an H100, with the GPU idle.
# Launching the kernels directly lets the host run ahead. (Decoding loops keep the graphs:
# there they pay off.) With scanned layers, the forward stacks each layer's residuals into
# buffers XLA zero-fills first although every slot is then written: skipping the fill makes
# the scanned GPT-2 step 5.6% faster on an H200 (bench/profile_step.py). Other backends
# ignore both options.
STEP_COMPILER_OPTIONS = {
    "xla_gpu_enable_command_buffer": "",
    "xla_gpu_enable_dus_accumulator_zero_init_elimination": True,
}


def training_key(seed: int, step: Array, micro_batch: Array | int) -> Array:
    """The dropout and router-noise key of one micro-batch: ``train.seed`` folded with the
    step and the micro-batch index, so a resumed or resharded run draws the same noise."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), micro_batch)


def micro_batches(tokens: Array, n: int) -> Array:
    """``(B, T)`` -> ``(n, B // n, T)``; micro-batch ``i`` takes rows ``i, i + n, ...`` so
    that each device's rows of the global batch feed every micro-batch."""
    b, t = tokens.shape
    return tokens.reshape(b // n, n, t).swapaxes(0, 1)


def all_finite(tree) -> Array:
    """() bool: every element of every array in ``tree`` is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _summed_gradients(grad_fn: Callable, params, micro: list) -> tuple[object, dict[str, Array]]:
    """The sum over the micro-batches of ``grad_fn(params, *batch, index) -> (grads, metrics)``'s
    gradients, and each one's metrics ``(n_micro,)``; ``micro`` holds arrays ``(n_micro, ...)``,
    scanned, and ``index`` counts the micro-batches."""

    def accumulate(grads_sum, batch):
        grads, metrics = grad_fn(params, *batch)
        return jax.tree.map(jnp.add, grads_sum, grads), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    return jax.lax.scan(accumulate, zeros, (*micro, jnp.arange(micro[0].shape[0])))


def _mean_gradients(
    loss: Callable,
    params,
    n_micro: int,
    inputs: Array,
    targets: Array,
    key_of: Callable[[Array], Array],
) -> tuple[object, dict[str, Array]]:
    """Gradients and metrics of ``loss``, each the mean over the ``n_micro`` micro-batches of
    ``inputs`` and ``targets`` ``(B, T)``; ``key_of(i)`` is micro-batch ``i``'s training key."""
    value_and_grad = jax.value_and_grad(loss, has_aux=True)

    def grad_fn(params, inputs: Array, targets: Array, index):  # one micro-batch
        (_, metrics), grads = value_and_grad(params, inputs, targets, key=key_of(index))
        return grads, metrics

    if n_micro == 1:
        return grad_fn(params, inputs, targets, 0)
    micro = [micro_batches(inputs, n_micro), micro_batches(targets, n_micro)]
    grads, metrics = _summed_gradients(grad_fn, params, micro)
    grads = jax.tree.map(lambda g: g / n_micro, grads)
    return grads, jax.tree.map(jnp.mean, metrics)


def masked_gradients(
    loss: Callable,
    params,
    n_micro: int,
    inputs: Array,
    targets: Array,
    loss_mask: Array,
    key_of: Callable[[Array], Array],
) -> tuple[object, dict[str, Array]]:
    """Gradients and metrics of ``loss`` with ``ce`` averaged over the step's masked targets
    (``inputs``, ``targets``, ``loss_mask``: ``(B, T)``): each of the ``n_micro`` micro-batches'
    ``ce`` weighs by its share of those targets (the auxiliary losses by ``1 / n_micro``), so
    accumulating gives exactly what one batch would. ``loss_tokens`` counts the targets.
    ``key_of(i)`` is micro-batch ``i``'s training key (``training_key``)."""

    def objective(params, inputs, targets, loss_mask, weight, index):
        total, metrics = loss(params, inputs, targets, key=key_of(index), loss_mask=loss_mask)
        return weight * metrics["ce"] + (total - metrics["ce"]) / n_micro, metrics

    grad_fn = jax.grad(objective, has_aux=True)
    micro = [micro_batches(x, n_micro) for x in (inputs, targets, loss_mask)]
    counts = micro[2].astype(jnp.float32).sum(axis=(1, 2))  # (n_micro,)
    weights = counts / jnp.maximum(counts.sum(), 1.0)
    grads, metrics = _summed_gradients(grad_fn, params, [*micro, weights])
    return grads, _combined({**metrics, "loss_tokens": counts})


def make_train_step(config, tx: optax.GradientTransformation) -> Callable:
    """``step(state, inputs, targets, loss_mask=None) -> (state, metrics)``: accumulate
    gradients over ``train.grad_accum_steps`` micro-batches, clip, update. With a ``(B, T)``
    ``loss_mask`` (chat data) ``ce`` is the mean over the masked targets of the whole step
    (``masked_gradients``); ``metrics["lr"]`` is the learning rate the update applies, the
    schedule at the optimizer's count (``schedule_count``: the step less the non-finite steps
    skipped; computed here: evaluating the schedule eagerly at each log point cost the host a dozen
    device round trips a record). A step whose loss or gradients are not finite leaves params
    and optimizer state unchanged (``metrics["finite"]`` is False); the loop then stops or
    goes on by ``train.on_nonfinite``. The verdict is known before the update, so keeping the
    old state fuses into the update's one pass over the params; an update that overflows the
    params (a huge learning rate) shows as the next step's non-finite loss, and the loop never
    saves such params (``all_finite``)."""
    n_micro, seed = config.train.grad_accum_steps, config.train.seed
    schedule = learning_rate(config.train)
    loss = _run_loss(config)

    def mean_gradients(params, inputs: Array, targets: Array, loss_mask, step: Array):
        key_of = functools.partial(training_key, seed, step)
        if loss_mask is None:
            return _mean_gradients(loss, params, n_micro, inputs, targets, key_of)
        return masked_gradients(loss, params, n_micro, inputs, targets, loss_mask, key_of)

    def step(state: TrainState, inputs: Array, targets: Array, loss_mask: Array | None = None):
        grads, metrics = mean_gradients(state.params, inputs, targets, loss_mask, state.step)
        with jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            new_state = TrainState(
                state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state)
            )
        lr = schedule(schedule_count(state.opt_state))
        return new_state, {**metrics, "grad_norm": grad_norm, "lr": lr, "finite": finite}

    return step


def make_eval_step(config) -> Callable:
    """``eval_step(params, inputs, targets, loss_mask=None) -> metrics``: the same losses as
    a train step's, no update, over the same ``train.grad_accum_steps`` micro-batches (a batch
    that fits in memory only as micro-batches is evaluated as it trains, one at a time); with
    a mask also ``loss_tokens``, the number of targets ``ce`` averages."""
    n_micro = config.train.grad_accum_steps
    loss = _run_loss(config)

    def batch_metrics(params, inputs: Array, targets: Array, loss_mask: Array | None = None):
        metrics = loss(params, inputs, targets, loss_mask=loss_mask)[1]
        if loss_mask is None:
            return metrics
        return {**metrics, "loss_tokens": loss_mask.astype(jnp.float32).sum()}

    def eval_step(params, inputs: Array, targets: Array, loss_mask: Array | None = None):
        if n_micro == 1:
            return batch_metrics(params, inputs, targets, loss_mask)
        arrays = [x for x in (inputs, targets, loss_mask) if x is not None]
        each = lambda carry, micro: (carry, batch_metrics(params, *micro))
        _, metrics = jax.lax.scan(each, None, [micro_batches(x, n_micro) for x in arrays])
        return _combined(metrics)

    return eval_step


def _combined(metrics: dict[str, Array]) -> dict[str, Array]:
    """One batch's metrics from its micro-batches' ``(n_micro,)``: their means, but on masked
    data (with ``loss_tokens``) ``ce`` weighs each micro-batch by its targets, so it is the
    mean over every masked target of the batch, and ``loss_tokens`` is their sum."""
    mean = jax.tree.map(jnp.mean, metrics)
    if "loss_tokens" not in metrics:
        return mean
    counts = metrics["loss_tokens"]
    ce = jnp.sum(counts * metrics["ce"]) / jnp.maximum(counts.sum(), 1.0)
    loss = mean["loss"] - mean["ce"] + ce  # the auxiliary terms' mean, plus ce
    return {**mean, "loss": loss, "ce": ce, "loss_tokens": counts.sum()}


def state_shardings(
    abstract: TrainState, mesh, rules, tx, *, shard_optimizer: bool = False
) -> TrainState:
    """Shardings of the train state: optimizer moments follow their params (with
    ``shard_optimizer``, split over the data axis too: ``sharding.moment_shardings``);
    statistics of another shape (Adafactor's factored rows and columns) are replicated."""
    params = sharding.param_shardings(abstract.params, mesh, rules)
    moments = sharding.moment_shardings(
        abstract.params, mesh, rules, shard_optimizer=shard_optimizer
    )

    def follow_param(state, param_sharding, param):
        if isinstance(state, optax.MaskedNode):  # another partition's param (Muon): no array
            return state
        return param_sharding if state.shape == param.shape else sharding.replicated(mesh)

    opt_state = optax.tree_map_params(
        tx,
        follow_param,
        abstract.opt_state,
        moments,
        abstract.params,
        transform_non_params=lambda _: sharding.replicated(mesh),
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    return TrainState(sharding.replicated(mesh), params, opt_state)


def abstract_state(config, mesh) -> tuple[TrainState, TrainState]:
    """The train state's shapes and dtypes (nothing allocated) and its shardings on ``mesh``."""
    model_cfg = models.config_from(config.model)
    key = jax.random.key(config.train.seed)
    abstract_params = jax.eval_shape(lambda k: models.get(model_cfg.name).init(k, model_cfg), key)
    tx = optimizer(config.train, abstract_params)
    abstract = jax.eval_shape(lambda k: init_state(k, model_cfg, tx), key)
    shardings = state_shardings(
        abstract, mesh, config.mesh.rules, tx, shard_optimizer=config.mesh.shard_optimizer
    )
    return abstract, shardings
