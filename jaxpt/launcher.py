"""What ``launch.py`` runs, importable so tests can drive it without a subprocess."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax

from jaxpt import data, hf, models, sharding, train
from jaxpt.config import check_writable_directory
from jaxpt.errors import ConfigError, check_range
from jaxpt.generation import generate

MODES = ("train", "generate")


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """``--mode=generate`` options (launch.py flags of the same names)."""

    prompt: str = ""  # empty: start from the end-of-text token, i.e. a new document
    num_samples: int = 4
    max_new_tokens: int = 100
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int = 0

    def validate(self) -> None:
        """Raises ConfigError naming the first option (as its flag) out of range."""
        check_range("--num_samples", self.num_samples, at_least=1, integer=True)
        check_range("--max_new_tokens", self.max_new_tokens, at_least=1, integer=True)
        check_range("--top_k", self.top_k, at_least=0, integer=True, note=" (0: no top-k filter)")
        check_range("--temperature", self.temperature, at_least=0, note=" (0: greedy)")
        check_range("--top_p", self.top_p, above=0, at_most=1, note=" (1: no nucleus filter)")
        check_range("--seed", self.seed, at_least=0, at_most=2**32 - 1, integer=True)


def init_distributed() -> None:
    """Joins a multi-process run before anything touches a device.

    ``jax.distributed.initialize()`` finds the cluster itself on TPU pods, SLURM and Open MPI;
    elsewhere set ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``. CPU processes exchange collectives through gloo (GPU and TPU use
    their own).
    """
    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        num_processes=None if count is None else int(count),
        process_id=None if index is None else int(index),
    )


def run(config, *, workdir: str, mode: str, sample_options: SampleOptions | None = None) -> None:
    """Runs ``mode`` (one of ``MODES``) for ``config`` in ``workdir``, after checking every
    config field (and, to train, that ``workdir`` can be written) before anything compiles."""
    if mode == "train":
        train.validate_config(config)
        check_writable_directory(workdir, "--workdir")
        print(config, flush=True)
        train.train(config, workdir)
    elif mode == "generate":
        for i, text in enumerate(sample(config, workdir, sample_options or SampleOptions())):
            print(f"--- sample {i}\n{text}", flush=True)
    else:
        raise ConfigError(f"--mode={mode!r} is not one of {list(MODES)}.")


def sample(config, workdir: str | Path, options: SampleOptions) -> list[str]:
    """Prompt plus completion, as text, for each of ``options.num_samples`` samples drawn
    from the latest checkpoint in ``workdir`` (or ``model.init_from``, see
    ``params_and_tokenizer``); each stops at end-of-text."""
    train.validate_config(config)
    options.validate()
    params, tokenizer = params_and_tokenizer(config, workdir)
    prompt = tokenizer.encode(options.prompt) if options.prompt else [tokenizer.eot_id]
    generated = generate(
        params,
        [prompt] * options.num_samples,
        models.config_from(config.model),
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        top_k=options.top_k or None,
        top_p=None if options.top_p == 1 else options.top_p,
        key=jax.random.key(options.seed),
        stop_token=tokenizer.eot_id,
        n_tokens=tokenizer.vocab_size,
    )
    return [tokenizer.decode(prompt + new) for new in generated.completions()]


def params_and_tokenizer(config, workdir: str | Path) -> tuple[object, data.Tokenizer]:
    """The latest checkpoint's params and the run's tokenizer. In a workdir without
    checkpoints, a config with ``model.init_from`` gets that HF checkpoint's params and the
    tokenizer that came with it (else the run's)."""
    directory = Path(workdir) / "checkpoints"  # orbax names each checkpoint by its step
    trained = directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())
    if trained or not hf.init_source(config.model):
        step, params = latest_params(config, workdir)
        print(f"sampling from checkpoint {step} of {workdir}", flush=True)
        return params, tokenizer_of(config.data)
    pretrained = hf.load_init_from(config.model)
    print(f"sampling from model.init_from={config.model.init_from}", flush=True)
    tokenizer = pretrained.tokenizer
    return pretrained.params, tokenizer_of(config.data) if tokenizer is None else tokenizer


def tokenizer_of(data_config) -> data.Tokenizer:
    """The tokenizer a run's data was prepared with (the char vocabulary lives there), or
    ``data.tokenizer`` by name when the data directory is not on this machine."""
    try:
        return data.tokenizer_for(data.ensure_prepared(data_config))
    except data.DataNotFoundError:
        return data.get_tokenizer(data_config.tokenizer)


def latest_params(config, workdir: str | Path) -> tuple[int, object]:
    """The step and params of the newest readable checkpoint in ``workdir/checkpoints``
    (ConfigError when it holds another model than ``config.model``); reads only."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise ConfigError(
            f"{directory} does not exist: train this config with --mode=train and "
            f"--workdir={workdir} first."
        )
    checkpoints = train.Checkpoints(directory, keep=None)  # read only: nothing is touched
    try:
        mesh = sharding.make_mesh(config.mesh)
        restored = checkpoints.restore_latest(*train.abstract_state(config, mesh), config.model)
    finally:
        checkpoints.close()
    if restored is None:
        raise ConfigError(f"no checkpoint in {directory} could be read.")
    step, state, _ = restored
    return step, state.params
