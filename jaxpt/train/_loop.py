"""The training loop: validate, build the mesh and state, restore, step, log, evaluate, save."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpt import data, evals, models, nn, sharding
from jaxpt.config import check_fields
from jaxpt.errors import ConfigError, check_range
from jaxpt.train._checkpoint import (
    Checkpoints,
    check_outside_checkpoints,
    check_run_checkpoints,
)
from jaxpt.train._memory import check_state_fits, memory_checked
from jaxpt.train._metrics import MetricsLog, StepClock, print_once
from jaxpt.train._optimizer import (
    hyperparameters,
    optimizer,
    resume_note,
    validate_train,
    warmup_note,
)
from jaxpt.train._step import (
    STEP_COMPILER_OPTIONS,
    TrainState,
    abstract_state,
    all_finite,
    init_state,
    make_eval_step,
    make_train_step,
    start_state,
)

log = logging.getLogger(__name__)


def validate_config(config) -> None:
    """Raises ConfigError naming the first field of a run config that breaks a rule: the model
    (its registry entry's ``validate``), train, mesh, the checkpoint, eval and log counts,
    ``eval.tasks``, and ``checkpoint.init_from``'s type; a field no run config has (a
    misspelling, ``config.check_fields``). Reads no file; ``train`` runs it first, the launcher
    before any mode."""
    check_fields(config)
    validate_train(config.train)
    _check_router_losses(config)
    sharding.validate_mesh(config.mesh)
    for section, field in (
        ("checkpoint", "every_steps"),
        ("checkpoint", "keep"),
        ("eval", "every_steps"),
        ("eval", "batches"),
        ("log", "every_steps"),
        ("log", "profile_steps"),
    ):
        check_range(f"{section}.{field}", config[section][field], at_least=1, integer=True)
    check_range(
        "eval.hellaswag_every_steps",
        config.eval.hellaswag_every_steps,
        at_least=0,
        integer=True,
        note=" (0: never)",
    )
    check_range(
        "log.profile_from_step",
        config.log.profile_from_step,
        at_least=0,
        integer=True,
        note=" (0: never)",
    )
    evals.parse_tasks(config.eval.tasks)
    if not isinstance(config.checkpoint.init_from, str):
        raise ConfigError(
            f"checkpoint.init_from={config.checkpoint.init_from!r} must be a checkpoint "
            "directory, a hub name or '' (none)."
        )


def check_batch_fits_mesh(config, mesh) -> None:
    """Each micro-batch must split evenly over the devices that share the batch."""
    shards = sharding.batch_shards(mesh, config.mesh.rules)
    micro = config.train.batch_size // config.train.grad_accum_steps
    if micro % shards:
        raise ConfigError(
            f"A micro-batch of {micro} sequences (train.batch_size={config.train.batch_size} / "
            f"train.grad_accum_steps={config.train.grad_accum_steps}) does not divide over the "
            f"{shards} devices of the batch mesh axes; make it a multiple of {shards}."
        )


def _has_router(cfg) -> bool:
    """Whether the model config ``cfg`` (any registry entry's) routes tokens top-k."""
    return isinstance(cfg, models.ModelConfig) and cfg.has_router


def _check_router_losses(config) -> None:
    """ConfigError for a router loss weighed where no layer has a top-k router: the loss is
    zero there (a dense model, Soft MoE), and the run would train without it. Builds, and so
    validates, ``config.model``."""
    if _has_router(models.config_from(config.model)):
        return
    for field in ("load_balance_loss_coeff", "z_loss_coeff"):
        weight = config.train[field]
        if weight != 0:
            raise ConfigError(
                f"train.{field}={weight!r} weighs a top-k router's loss, and no layer of "
                "this model routes top-k (a 'moe' in model.mixer); set it to 0."
            )


def check_experts_fit_mesh(config, mesh) -> None:
    """Ragged top-k experts (``model.moe_matmul``) cannot be split over the devices that
    share the batch (expert parallelism moves the padded rows); said before anything runs,
    not when the step is traced. The layer splits them by the activations' rules (a rule's
    data and fsdp axes gather the stored experts whole), and so does this check."""
    cfg = models.config_from(config.model)
    if not _has_router(cfg):
        return
    rules = config.mesh.rules
    spec = sharding.spec_for((cfg.n_experts,), ("expert",), mesh, sharding.activation_rules(rules))
    nn.check_grouped_matmul(
        cfg.moe_matmul, nn.expert_parallel_axes(spec[0], sharding.batch_axes(mesh, rules))
    )


def validation_data(config, manifest: data.Manifest, batch_sh) -> data.Loader:
    """The validation batches of a run, split as ``batch_sh`` says; raises DataError when the
    split holds fewer than ``eval.batches``."""
    return _loader(config, manifest, "val", batch_sh, eval_batches=config.eval.batches)


def _loader(
    config, manifest: data.Manifest, split: str, batch_sh, *, eval_batches: int | None = None
) -> data.Loader:
    """The run's loader of ``split``, reading this process's rows of ``batch_sh``, after
    checking that the split holds a batch (``eval_batches``: as many evaluation batches)
    before the rows are listed (one index per sequence: a batch of 10^12 filled the memory)."""
    batch_size, seq_len = config.train.batch_size, models.config_from(config.model).block_size
    data.check_batches(manifest, split, batch_size, seq_len, eval_batches=eval_batches)
    rows = data.process_rows(batch_sh, (batch_size, seq_len))
    return data.Loader(manifest, split, batch_size, seq_len, rows=rows)


def fresh_state(
    model_cfg, tx, shardings: TrainState, key, init_params: Callable[[], Any] | None
) -> TrainState:
    """The state of step 0: params from ``init_params()`` (e.g. a pretrained checkpoint's, to
    fine-tune) or, without it, from ``init``; the optimizer state is new either way."""
    if init_params is None:
        return jax.jit(lambda k: init_state(k, model_cfg, tx), out_shardings=shardings)(key)
    params = jax.device_put(init_params(), shardings.params)
    return jax.jit(lambda p: start_state(p, tx), out_shardings=shardings)(params)


def report_shardings(config, model_cfg, params, mesh) -> None:
    """On process 0: with ``log.shardings``, prints the mesh and every param's PartitionSpec
    (and its optimizer moments' with ``mesh.shard_optimizer``);
    always, warns of each large param (or its optimizer moments) that a mesh axis cannot
    split (see ``sharding.replication_warnings``) and of attention heads it cannot split
    (``sharding.attention_warnings``)."""
    if jax.process_index() != 0:
        return
    rules, shard_optimizer = config.mesh.rules, config.mesh.shard_optimizer
    if config.log.shardings:
        report = sharding.describe_shardings(params, mesh, rules, shard_optimizer=shard_optimizer)
        print(report, flush=True)
    warnings = sharding.replication_warnings(params, mesh, rules, shard_optimizer=shard_optimizer)
    if isinstance(model_cfg, models.ModelConfig):  # the bigram has no attention
        warnings += sharding.attention_warnings(model_cfg.n_head, model_cfg.n_kv_head, mesh, rules)
    for warning in warnings:
        log.warning(warning)


def describe(config, model_cfg, mesh) -> str:
    """The start-of-run summary: parameters (and those a token uses, for experts), tokens per
    step, FLOPs per token, the optimizer with the ``b1``, ``b2`` and ``eps`` it uses; then,
    on a line of its own, the mesh and its devices (``sharding.describe_mesh``)."""
    tokens = config.train.batch_size * model_cfg.block_size
    n, active = model_cfg.n_params, model_cfg.n_active_params
    params = f"{n:,} parameters" + (f" ({active:,} active per token)" if active != n else "")
    values = ", ".join(f"{k}={v:g}" for k, v in hyperparameters(config.train).items())
    return (
        f"model {model_cfg.name}: {params}; {tokens:,} tokens per "
        f"step ({config.train.batch_size} x {model_cfg.block_size}); "
        f"{model_cfg.flops_per_token:.3e} training FLOPs per token; "
        f"optimizer {config.train.optimizer}"
        + (f" ({values})" if values else "")
        + f"\n{sharding.describe_mesh(mesh)}"
    )


class NonFiniteError(FloatingPointError):
    """A step was not finite under ``train.on_nonfinite='stop'``; the message is one sentence
    naming the step and the last good checkpoint."""


class Interrupted(Exception):
    """SIGTERM or SIGINT ended training after its current step was saved."""

    def __init__(self, signum: signal.Signals, step: int):
        super().__init__(f"{signum.name}: stopped at step {step}")
        self.signal, self.step = signum, step


class _StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps; one the process
    ignores (SIGINT in a shell's background job, which Ctrl-C at its terminal must not stop)
    stays ignored. Over several processes, which a signal may reach steps apart, they agree: a
    process that stopped alone would save while the others still step, and their collectives
    would hang."""

    def __init__(self, mesh):
        self.signal: signal.Signals | None = None
        self.previous = {
            s: signal.signal(s, self._handle)
            for s in (signal.SIGTERM, signal.SIGINT)
            if signal.getsignal(s) is not signal.SIG_IGN
        }
        self._any_process = _any_process(mesh) if jax.process_count() > 1 else None
        self._agreement: jax.Array | None = None  # dispatched after the last step

    def _handle(self, signum, frame):
        del frame
        self.signal = signal.Signals(signum)

    def after_step(self) -> bool:
        """Whether the loop stops after the step just dispatched: on one process, when a
        signal has come; on several, when one had come to any of them by the step before
        (read once this step is dispatched, so every process stops after the same step; one
        without a signal of its own then stops as for SIGTERM)."""
        if self._any_process is None:
            return self.signal is not None
        previous, self._agreement = self._agreement, self._any_process(self.signal is not None)
        if previous is None or not bool(previous):
            return False
        self.signal = self.signal or signal.SIGTERM
        return True

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _any_process(mesh) -> Callable[[bool], jax.Array]:
    """``flag -> whether any process passed True``: a replicated bool, computed on ``mesh``'s
    devices (dispatched like a step; reading it waits for the processes' flags)."""
    each_device = NamedSharding(mesh, P(mesh.axis_names))  # (devices,): one flag on each
    any_flag = jax.jit(jnp.any, out_shardings=NamedSharding(mesh, P()))

    def any_process(flag: bool) -> jax.Array:
        flags = jax.make_array_from_callback((mesh.size,), each_device, lambda _: np.array([flag]))
        return any_flag(flags)

    return any_process


class _StepProfiler:
    """Traces ``log.profile_steps`` steps from step ``log.profile_from_step`` (numbered as
    logged) with jax.profiler into ``workdir/profile`` (``profile/process_I`` for each of
    several processes, whose traces would share file names), in a new timestamped folder;
    does nothing when ``log.profile_from_step`` is 0, and says so when the run starts (resumes)
    after that step."""

    def __init__(self, workdir: Path, log_cfg, start_step: int):
        self.directory = workdir / "profile"
        if jax.process_count() > 1:
            self.directory /= f"process_{jax.process_index()}"
        self.first = log_cfg.profile_from_step
        self.last = self.first + log_cfg.profile_steps - 1
        self.tracing = False
        self.traced_to = self.first  # the last step dispatched while tracing
        if self.first and start_step >= self.first:
            print_once(
                f"log.profile_from_step={self.first} is not after step {start_step}, where this "
                "run starts: no profile (set a later step)"
            )

    def before(self, step: int) -> None:
        """Starts the trace if ``step`` (about to be dispatched) is the first traced."""
        if self.first and step == self.first:
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.tracing = True

    def after(self, step: int, metrics: dict) -> None:
        """Stops the trace once the last traced step, just dispatched, has run."""
        if not self.tracing:
            return
        self.traced_to = step
        if step >= self.last:
            jax.block_until_ready(metrics)
            self.stop()

    def stop(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
            print(f"profile of steps {self.first}-{self.traced_to} in {self.directory}", flush=True)


class _PendingSteps:
    """The metrics of the steps dispatched since the last fetch, the non-finite policy, and
    whether a step changed the state since ``saved_step`` (the last step saved or restored).

    Metrics are fetched together, so the host runs ahead of the device: a log step's once the
    step after it is dispatched (the device keeps busy while the host fetches and writes them),
    and everything at eval and save points. Under ``on_nonfinite='stop'`` each step's
    ``finite`` flag is also read once the next step is dispatched: a bad step stops the run
    one step later, while the device still has work queued, rather than at the next log point.
    """

    def __init__(
        self,
        log: MetricsLog,
        clock: StepClock,
        policy: str,
        checkpoints: Checkpoints,
        saved_step: int,
    ):
        self.log, self.clock, self.policy = log, clock, policy
        self.checkpoints, self.saved_step = checkpoints, saved_step
        self.steps: list[tuple[int, dict]] = []
        self.updated = False  # some step since saved_step was finite

    def add(self, step: int, metrics: dict) -> None:
        """Queues ``step``'s metrics; raises NonFiniteError if the step before was not finite
        and the policy is to stop."""
        self.steps.append((step, metrics))
        self.clock.dispatched(step, metrics)
        if self.policy == "stop" and len(self.steps) > 1 and not self.steps[-2][1]["finite"]:
            self.flush()

    def flush(self, through: int | None = None) -> None:
        """Fetches and logs the queued steps (those up to step ``through``), up to the first
        non-finite one under 'stop'."""
        records = []
        cut = len(self.steps) if through is None else sum(s <= through for s, _ in self.steps)
        fetched, self.steps = jax.device_get(self.steps[:cut]), self.steps[cut:]
        for step, metrics in fetched:
            record = {"step": step, **{k: float(v) for k, v in metrics.items() if k != "finite"}}
            records.append(record)
            if metrics["finite"]:
                self.updated = True
            elif self.policy == "stop":
                self._log(records)
                raise NonFiniteError(_stop_message(record, self.checkpoints))
            else:
                print_once(
                    f"step {step} is not finite ({_losses(record)}): its update was skipped "
                    "(train.on_nonfinite='skip')"
                )
        self._log(records)

    def _log(self, records: list[dict]) -> None:
        if records:
            self.log.train_steps(records, self.clock.finished_at(records[-1]["step"]))

    def refuse_save(self, step: int) -> None:
        """Step ``step``'s params are not finite (an update overflowed them): not saved; under
        'stop' the run ends here."""
        message = (
            f"Step {step}'s params are not finite (an update overflowed them), so they were not "
            "saved"
        )
        if self.policy == "stop":
            raise NonFiniteError(
                f"{message} and training stopped (train.on_nonfinite='stop'); "
                f"{_last_checkpoint(self.checkpoints)}; lower train.lr."
            )
        print_once(f"{message} (train.on_nonfinite='skip')")


def _losses(record: dict) -> str:
    return f"loss {record['loss']:.4g}, grad_norm {record['grad_norm']:.4g}"


def _last_checkpoint(checkpoints: Checkpoints) -> str:
    checkpoints.wait()  # name a checkpoint that is on disk
    saved = checkpoints.steps()
    if not saved:
        return "no checkpoint was saved before it"
    return f"the last good checkpoint is step {saved[-1]} in {checkpoints.directory}"


def _stop_message(record: dict, checkpoints: Checkpoints) -> str:
    return (
        f"Step {record['step']} is not finite ({_losses(record)}), so training stopped "
        f"(train.on_nonfinite='stop') and {_last_checkpoint(checkpoints)}; lower train.lr, or "
        "set train.on_nonfinite='skip' to skip such steps."
    )


class _Run(NamedTuple):
    """What a run is made of, each part checked against the config before anything compiles."""

    model_cfg: Any  # the model's config dataclass
    mesh: jax.sharding.Mesh
    abstract: TrainState  # shapes and dtypes
    shardings: TrainState
    tx: Any  # the optax optimizer
    batch_sh: jax.sharding.NamedSharding
    train_data: data.Loader
    val_data: data.Loader
    hellaswag: Callable | None  # params -> HellaSwag metrics, with eval.hellaswag_every_steps


def _prepare(config) -> _Run:
    """Validates ``config`` and builds the run's mesh, state shapes, optimizer and loaders:
    every input error surfaces here, before any compile. Prints the start-of-run summary."""
    validate_config(config)
    model_cfg = models.config_from(config.model)
    mesh = sharding.make_mesh(config.mesh)
    check_batch_fits_mesh(config, mesh)
    check_experts_fit_mesh(config, mesh)
    abstract, shardings = abstract_state(config, mesh)
    check_state_fits(abstract, shardings, mesh)
    batch_size, seq_len = config.train.batch_size, model_cfg.block_size
    need = data.tokens_needed(config.train.steps, batch_size, seq_len, config.eval.batches)
    manifest = data.ensure_prepared(config.data, need=need)
    data.check_vocab(manifest, model_cfg.vocab_size)
    tx = optimizer(config.train, abstract.params)
    print_once(describe(config, model_cfg, mesh))
    if note := warmup_note(config.train):
        print_once(note)
    report_shardings(config, model_cfg, abstract.params, mesh)
    batch_sh = sharding.batch_sharding(mesh, config.mesh.rules)
    train_data = _loader(config, manifest, "train", batch_sh)
    val_data = validation_data(config, manifest, batch_sh)
    hellaswag = None
    if config.eval.hellaswag_every_steps:  # its items are read here
        hellaswag = evals.hellaswag.for_run(config, mesh, data.tokenizer_for(manifest))
    return _Run(model_cfg, mesh, abstract, shardings, tx, batch_sh, train_data, val_data, hellaswag)


def _check_workdir(workdir: Path) -> None:
    """Raises ConfigError when ``workdir`` is inside another run's checkpoints
    (``check_outside_checkpoints``), holds a file where training makes a directory, a
    ``checkpoints/`` holding names no run makes there (``check_run_checkpoints``), or a
    ``metrics.jsonl`` or ``loss.png`` (which training rewrites) but no ``checkpoints/``: a
    run makes that directory before it logs, so those files are not a run's but someone
    else's."""
    check_outside_checkpoints(workdir)
    for name in ("checkpoints", "tensorboard", "profile"):
        path = workdir / name
        if path.exists() and not path.is_dir():  # orbax hung and failed at the first save
            raise ConfigError(
                f"{path} is a file, where training keeps its {name}/ directory: choose a new "
                "or empty --workdir (nothing was changed)."
            )
    if (workdir / "checkpoints").is_dir():
        check_run_checkpoints(workdir / "checkpoints")
        return
    held = [name for name in ("metrics.jsonl", "loss.png") if (workdir / name).exists()]
    if held:
        raise ConfigError(
            f"{workdir} holds {' and '.join(held)} but no checkpoints/, so it is not a jaxpt "
            f"run's and training would overwrite {'them' if len(held) > 1 else 'it'}: choose a "
            "new or empty --workdir (nothing was changed)."
        )


def _check_same_data(
    config, train_data: data.Loader, loader_state: dict, checkpoints: Checkpoints, step: int
) -> None:
    """ConfigError unless ``train_data`` holds the data checkpoint ``step``'s ``loader_state``
    indexes (``Loader.holds``: its tokens, not its path): on other data the run would go on
    mid-epoch with positions and an order drawn for the data it was trained on."""
    if train_data.holds(loader_state):
        return
    trained_on = checkpoints.stored_section(step, "data").get("dataset")
    keep = (
        f"run with --config.data.dataset={trained_on}"
        if trained_on not in (None, config.data.dataset)
        else "run with the data it was trained on (a hub dataset's also with the eval.batches "
        "it was trained with: its training split starts after the validation tokens they read)"
    )
    raise ConfigError(
        f"data.dataset={config.data.dataset!r} ({train_data.manifest.directory}) is not the data "
        f"checkpoint {step} in {checkpoints.directory} was trained on (data.dataset="
        f"{trained_on!r}; its loader state indexes that data's first {loader_state['tokens']} "
        f"training tokens): {keep} to resume it, or start the new run in another --workdir "
        "(nothing was changed)."
    )


def _trained_already(checkpoints: Checkpoints, step: int, steps: int) -> str:
    """What a run says, and all it does, when its checkpoint ``step`` is at or past
    ``train.steps``: no step is left to train, so nothing is written (no metrics, plot,
    TensorBoard events or checkpoint)."""
    return (
        f"checkpoint {step} in {checkpoints.directory} is already at step {step} >= "
        f"train.steps={steps}, so there is nothing to train and nothing was written; raise "
        "--config.train.steps to train further"
    )


class _Steps(NamedTuple):
    """The run's jitted functions (traced at their first call)."""

    # (state, *batch) -> (state, metrics); donates the state; checked to fit the device's
    # memory before its first run (memory_checked)
    train: Callable
    eval: Callable  # (params, *batch) -> metrics
    params_finite: Callable  # params -> bool


def _jit_steps(config, run: _Run) -> _Steps:
    """The train step (explicit shardings, donated state), the eval step and the finite check
    of params, over ``run``'s mesh."""
    batch_args = (run.batch_sh,) * (3 if run.train_data.by_rows else 2)  # chat: + loss_mask
    train_step = jax.jit(
        make_train_step(config, run.tx),
        in_shardings=(run.shardings, *batch_args),
        out_shardings=(run.shardings, sharding.replicated(run.mesh)),
        donate_argnums=0,
        compiler_options=STEP_COMPILER_OPTIONS,
    )
    train_step = memory_checked(train_step, config, run.mesh)
    eval_step = jax.jit(make_eval_step(config), in_shardings=(run.shardings.params, *batch_args))
    params_finite = jax.jit(all_finite, in_shardings=(run.shardings.params,))
    return _Steps(train_step, eval_step, params_finite)


def train(
    config, workdir: str | Path, *, init_params: Callable[[], Any] | None = None
) -> TrainState:
    """Trains ``config`` in ``workdir``, resuming from its latest readable checkpoint; without
    one, from the params ``init_params()`` returns (called only then, so a resumed run never
    reads them; the launcher passes ``checkpoint.init_from``'s), else from a fresh ``init``.
    A checkpoint already at ``train.steps`` (or past it) is returned as it is, with one line
    saying so; nothing is written.

    Raises NonFiniteError when a step is not finite under ``train.on_nonfinite='stop'``, and
    Interrupted after saving when SIGTERM or SIGINT arrives."""
    if not str(workdir):  # Path("") is the current directory, which holds someone's files
        raise ConfigError("the workdir is empty: name the run's directory, e.g. runs/x.")
    workdir = Path(workdir)
    _check_workdir(workdir)
    run = _prepare(config)
    workdir.mkdir(parents=True, exist_ok=True)
    steps = _jit_steps(config, run)
    batch_size = config.train.batch_size
    with contextlib.ExitStack() as cleanup:
        checkpoints = Checkpoints(workdir / "checkpoints", keep=config.checkpoint.keep)
        cleanup.callback(checkpoints.close)
        restored = checkpoints.restore_latest(run.abstract, run.shardings, config)
        if restored is None:
            key = jax.random.key(config.train.seed)
            state = fresh_state(run.model_cfg, run.tx, run.shardings, key, init_params)
            loader_state = run.train_data.init_state(config.train.seed)
        else:
            resumed, state, loader_state = restored
            _check_same_data(config, run.train_data, loader_state, checkpoints, resumed)
            if resumed >= config.train.steps:
                print_once(_trained_already(checkpoints, resumed, config.train.steps))
                return state
            print_once(f"resumed from checkpoint {resumed}")
            if config.checkpoint.init_from:
                print_once(
                    f"checkpoint.init_from={config.checkpoint.init_from} is not read: a run "
                    "resumes from its workdir's checkpoints"
                )
            if note := resume_note(
                checkpoints.stored_section(resumed, "train"), config.train, resumed
            ):
                print_once(note)
        step = int(state.step)
        log = MetricsLog(
            workdir,
            total_steps=config.train.steps,
            first_step=step,
            tokens_per_step=batch_size * run.model_cfg.block_size,
            flops_per_token=run.model_cfg.flops_per_token,
            print_every=config.log.every_steps,
        )
        cleanup.callback(log.close)
        clock = StepClock()
        cleanup.callback(clock.close)
        pending = _PendingSteps(log, clock, config.train.on_nonfinite, checkpoints, step)
        stop = _StopRequest(run.mesh)
        cleanup.callback(stop.restore)
        profiler = _StepProfiler(workdir, config.log, step)
        cleanup.callback(profiler.stop)

        def save(s: int) -> None:
            """Saves step ``s`` unless every step since the last save was skipped (non-finite):
            then the state is that save's, and a copy would only rotate older ones out. Params
            that an overflowing update made non-finite are never saved."""
            pending.flush()
            if not pending.updated:
                print_once(f"step {s}: unchanged since step {pending.saved_step}; not saved")
            elif not steps.params_finite(state.params):
                pending.refuse_save(s)
            else:
                checkpoints.save(s, state, loader_state, config)
                pending.updated, pending.saved_step = False, s

        def evaluate(s: int) -> None:
            """After step ``s``: the validation loss every ``eval.every_steps``, HellaSwag
            every ``eval.hellaswag_every_steps`` (with it on), both after the last step."""
            last = s == config.train.steps
            if s % config.eval.every_steps == 0 or last:
                pending.flush()
                val = run.val_data, config.eval.batches, run.batch_sh
                log.eval(s, evals.validation_loss(steps.eval, state.params, *val))
            if run.hellaswag and (s % config.eval.hellaswag_every_steps == 0 or last):
                pending.flush()
                log.task(s, "hellaswag", run.hellaswag(state.params))

        with sharding.activation_sharding(run.mesh, config.mesh.rules):  # the steps trace in here
            stopping = False
            while step < config.train.steps and not stopping:
                batch, loader_state = run.train_data.next_batch(loader_state)
                profiler.before(step + 1)
                state, metrics = steps.train(
                    state, *data.to_global(batch, run.batch_sh, batch_size)
                )
                step += 1
                profiler.after(step, metrics)
                pending.add(step, metrics)
                if step > 1 and (step - 1) % config.log.every_steps == 0:
                    pending.flush(through=step - 1)  # while this step runs
                evaluate(step)
                if step % config.checkpoint.every_steps == 0:
                    save(step)
                stopping = stop.after_step()
            if stop.signal is not None:
                pending.flush()  # the step's own line first
                # each process's own: every one saves its part, and says it stops where they agreed
                print(f"{stop.signal.name}: saving step {step} before exiting", flush=True)
            if step not in checkpoints.steps():
                save(step)
            pending.flush()
    if stop.signal is not None:
        raise Interrupted(stop.signal, step)
    return state
