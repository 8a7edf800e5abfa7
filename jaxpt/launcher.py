"""What ``launch.py`` runs, importable so tests can drive it without a subprocess."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import jax

from jaxpt import data, hf, models, train
from jaxpt.config import check_writable_directory
from jaxpt.errors import ConfigError, check_range
from jaxpt.generation import chat, generate

MODES = ("train", "generate", "chat")


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """``--mode=generate`` and ``--mode=chat`` options (launch.py flags of the same names)."""

    prompt: str = ""  # empty: start from the end-of-text token, i.e. a new document
    num_samples: int = 4
    max_new_tokens: int = 100
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int = 0
    system_prompt: str = ""  # chat: the conversation's system message ("": none)

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
        init_params = pretrained_params(config)
        print(config, flush=True)
        train.train(config, workdir, init_params=init_params)
    elif mode == "generate":
        for i, text in enumerate(sample(config, workdir, sample_options or SampleOptions())):
            print(f"--- sample {i}\n{text}", flush=True)
    elif mode == "chat":
        converse(config, workdir, sample_options or SampleOptions())
    else:
        raise ConfigError(f"--mode={mode!r} is not one of {list(MODES)}.")


def pretrained_params(config) -> Callable[[], object] | None:
    """What ``train.train`` starts from without a checkpoint: None for a fresh ``init``, or,
    with ``checkpoint.init_from``, a function that loads that HF checkpoint's params (called
    only then, so a resumed run never reads it). The checkpoint's config.json is checked
    against ``config.model`` here, before anything compiles."""
    source = config.checkpoint.init_from
    if not source:
        return None
    model_cfg = models.config_from(config.model)
    hf.check_init_from(model_cfg, source)

    def load() -> object:
        params = hf.load_init_from(model_cfg, source).params
        print(f"initialised params from {source}", flush=True)
        return params

    return load


def sample(config, workdir: str | Path, options: SampleOptions) -> list[str]:
    """Prompt plus completion, as text, for each of ``options.num_samples`` samples drawn
    from the latest checkpoint in ``workdir`` (or ``checkpoint.init_from``, see
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


def converse(config, workdir: str | Path, options: SampleOptions) -> None:
    """``--mode=chat``: a conversation in the terminal with the model ``sample`` would use.
    Each line read is a user message, answered by ``jaxpt.chat`` with the conversation so far
    (``options.system_prompt`` first); end of input (Ctrl-D) or Ctrl-C ends it."""
    train.validate_config(config)
    options.validate()
    params, tokenizer = params_and_tokenizer(config, workdir)
    model_cfg = models.config_from(config.model)
    messages = []
    if options.system_prompt:
        messages.append({"role": "system", "content": options.system_prompt})
    key = jax.random.key(options.seed)
    print("chat: type a message and press Enter; Ctrl-D ends the conversation", flush=True)
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(flush=True)
            return
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        key, turn_key = jax.random.split(key)
        reply = chat(
            params,
            model_cfg,
            tokenizer,
            messages,
            max_new_tokens=options.max_new_tokens,
            temperature=options.temperature,
            top_k=options.top_k or None,
            top_p=None if options.top_p == 1 else options.top_p,
            key=turn_key,
        )
        print(reply, flush=True)
        messages.append({"role": "assistant", "content": reply})


def params_and_tokenizer(config, workdir: str | Path) -> tuple[object, data.Tokenizer]:
    """The latest checkpoint's params and the run's tokenizer. In a workdir without
    checkpoints, a config with ``checkpoint.init_from`` gets that HF checkpoint's params and
    the tokenizer that came with it (else the run's)."""
    directory = Path(workdir) / "checkpoints"  # orbax names each checkpoint by its step
    trained = directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())
    source = config.checkpoint.init_from
    if trained or not source:
        step, params = train.latest_params(config, workdir)
        print(f"sampling from checkpoint {step} of {workdir}", flush=True)
        return params, data.run_tokenizer(config.data)
    pretrained = hf.load_init_from(models.config_from(config.model), source)
    print(f"sampling from checkpoint.init_from={source}", flush=True)
    tokenizer = pretrained.tokenizer
    return pretrained.params, data.run_tokenizer(config.data) if tokenizer is None else tokenizer
