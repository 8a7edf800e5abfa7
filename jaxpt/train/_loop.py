"""The training loop: validate, build the mesh and state, restore, step, log, evaluate, save."""

from __future__ import annotations

import signal
from pathlib import Path

import jax
import numpy as np
import optax

from jaxpt import data, evals, hf, models, sharding
from jaxpt.errors import ConfigError
from jaxpt.train._checkpoint import Checkpoints
from jaxpt.train._metrics import MetricsLog
from jaxpt.train._optimizer import learning_rate, optimizer, validate_train
from jaxpt.train._step import (
    STEP_COMPILER_OPTIONS,
    TrainState,
    init_state,
    make_eval_step,
    make_train_step,
    start_state,
)


def state_shardings(abstract: TrainState, mesh, rules, tx) -> TrainState:
    """Shardings of the train state: optimizer moments follow their params."""
    params = sharding.param_shardings(abstract.params, mesh, rules)
    opt_state = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract.opt_state,
        params,
        transform_non_params=lambda _: sharding.replicated(mesh),
    )
    return TrainState(sharding.replicated(mesh), params, opt_state)


def abstract_state(config, mesh) -> tuple[TrainState, TrainState]:
    """The train state's shapes and dtypes (nothing allocated) and its shardings on ``mesh``."""
    model_cfg = models.config_from(config.model)
    key = jax.random.key(config.train.seed)
    abstract_params = jax.eval_shape(lambda k: models.get(model_cfg.name).init(k, model_cfg), key)
    tx = optimizer(config.train, abstract_params)
    abstract = jax.eval_shape(lambda k: init_state(k, model_cfg, tx), key)
    return abstract, state_shardings(abstract, mesh, config.mesh.rules, tx)


def check_batch_fits_mesh(config, mesh) -> None:
    """Each micro-batch must split evenly over the devices that share the batch."""
    shards = int(np.prod([mesh.shape[a] for a in sharding.batch_axes(mesh, config.mesh.rules)]))
    micro = config.train.batch_size // config.train.grad_accum_steps
    if micro % shards:
        raise ConfigError(
            f"A micro-batch of {micro} sequences (train.batch_size={config.train.batch_size} / "
            f"train.grad_accum_steps={config.train.grad_accum_steps}) does not divide over the "
            f"{shards} devices of the batch mesh axes; make it a multiple of {shards}."
        )


def fresh_state(config, model_cfg, tx, shardings: TrainState, key) -> TrainState:
    """The state of step 0: params from ``init`` or, with ``model.init_from``, from that HF
    checkpoint (fine-tuning); the optimizer state is new either way."""
    if not hf.init_source(config.model):
        return jax.jit(lambda k: init_state(k, model_cfg, tx), out_shardings=shardings)(key)
    params = jax.device_put(hf.load_init_from(config.model).params, shardings.params)
    print(f"initialised params from {config.model.init_from}", flush=True)
    return jax.jit(lambda p: start_state(p, tx), out_shardings=shardings)(params)


def describe(config, model_cfg) -> str:
    """The start-of-run summary: parameters, tokens per step, FLOPs per token."""
    tokens = config.train.batch_size * model_cfg.block_size
    return (
        f"model {model_cfg.name}: {model_cfg.n_params:,} parameters; {tokens:,} tokens per "
        f"step ({config.train.batch_size} x {model_cfg.block_size}); "
        f"{model_cfg.flops_per_token:.3e} training FLOPs per token"
    )


class _StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        del frame
        self.signal = signal.Signals(signum).name

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(config, workdir: str | Path) -> TrainState:
    """Trains ``config`` in ``workdir``, resuming from its latest readable checkpoint; without
    one, from ``model.init_from`` when set, else from a fresh ``init``."""
    workdir = Path(workdir)
    model_cfg = models.config_from(config.model)
    if hf.init_source(config.model):
        hf.check_init_from(config.model)
    validate_train(config.train)
    manifest = data.ensure_prepared(config.data)
    data.check_vocab(manifest, model_cfg.vocab_size)
    mesh = sharding.make_mesh(config.mesh)
    check_batch_fits_mesh(config, mesh)
    rules = config.mesh.rules
    batch_size, seq_len = config.train.batch_size, model_cfg.block_size

    key = jax.random.key(config.train.seed)
    abstract, shardings = abstract_state(config, mesh)
    tx = optimizer(config.train, abstract.params)
    print(describe(config, model_cfg), flush=True)

    batch_sh = sharding.batch_sharding(mesh, rules)
    rows = data.process_rows(batch_sh, (batch_size, seq_len))
    train_data = data.Loader(manifest, "train", batch_size, seq_len, rows=rows)
    val_data = data.Loader(manifest, "val", batch_size, seq_len, rows=rows)
    val_data.check_eval(config.eval.batches)  # before anything compiles

    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=config.checkpoint.keep)
    restored = checkpoints.restore_latest(abstract, shardings)
    if restored is None:
        state = fresh_state(config, model_cfg, tx, shardings, key)
        loader_state = train_data.init_state(config.train.seed)
    else:
        step, state, loader_state = restored
        print(f"resumed from checkpoint {step}", flush=True)

    step_fn = jax.jit(
        make_train_step(config, tx),
        in_shardings=(shardings, batch_sh, batch_sh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=STEP_COMPILER_OPTIONS,
    )
    eval_fn = jax.jit(make_eval_step(config), in_shardings=(shardings.params, batch_sh, batch_sh))
    step = int(state.step)
    log = MetricsLog(
        workdir,
        total_steps=config.train.steps,
        first_step=step,
        tokens_per_step=batch_size * seq_len,
        flops_per_token=model_cfg.flops_per_token,
        print_every=config.log.every_steps,
    )
    schedule = learning_rate(config.train)
    stop = _StopRequest()
    pending: list[tuple[int, dict]] = []

    def flush() -> None:
        """Fetches the metrics of the steps run since the last flush and logs them."""
        records = []
        for s, metrics in jax.device_get(pending):
            record = {"step": s, **{k: float(v) for k, v in metrics.items() if k != "finite"}}
            record["lr"] = float(schedule(s - 1))
            records.append(record)
            if not metrics["finite"]:
                _non_finite(s, record["loss"], config.train.on_nonfinite, checkpoints)
        pending.clear()
        log.train_steps(records)

    def save(s: int) -> None:
        flush()
        checkpoints.save(s, state, loader_state, config)

    try:
        with sharding.activation_sharding(mesh, rules):  # the steps trace in here
            while step < config.train.steps and stop.signal is None:
                batch, loader_state = train_data.next_batch(loader_state)
                state, metrics = step_fn(state, *data.to_global(batch, batch_sh, batch_size))
                step += 1
                pending.append((step, metrics))
                if step % config.log.every_steps == 0:
                    flush()
                if step % config.eval.every_steps == 0 or step == config.train.steps:
                    flush()
                    log.eval(
                        step,
                        evals.validation_loss(
                            eval_fn, state.params, val_data, config.eval.batches, batch_sh
                        ),
                    )
                if step % config.checkpoint.every_steps == 0:
                    save(step)
            if stop.signal is not None:
                print(f"{stop.signal}: saving step {step} before exiting", flush=True)
            if step not in checkpoints.steps():
                save(step)
            flush()
    finally:
        stop.restore()
        checkpoints.close()
        log.close()
    return state


def _non_finite(step: int, loss: float, policy: str, checkpoints: Checkpoints) -> None:
    """Says that ``step`` had a non-finite loss; raises when the policy is to stop."""
    last = checkpoints.steps()[-1] if checkpoints.steps() else None
    if policy == "skip":
        print(f"step {step}: loss {loss} is not finite; the update was skipped", flush=True)
        return
    raise FloatingPointError(
        f"Loss {loss} is not finite at step {step}; stopped (train.on_nonfinite='stop'). "
        f"The last good checkpoint is step {last}."
    )
