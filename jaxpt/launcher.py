"""What ``launch.py`` runs, importable so tests can drive it without a subprocess."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxpt import data, evals, hf, models, sharding, train
from jaxpt.config import check_writable_directory, config_text
from jaxpt.errors import ConfigError, DataError, check_range, first_line
from jaxpt.generation import chat, generate, reply_room, room

MODES = ("train", "generate", "eval", "chat")
DEFAULT_NEW_TOKENS = 100  # the most --max_new_tokens=0 asks for
_UTF8, _ANY = "utf-8", "surrogatepass"  # a chat line's bytes between processes: any str


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """``--mode=generate`` and ``--mode=chat`` options (launch.py flags of the same names)."""

    prompt: str = ""  # empty: start from the begin-of-sequence token, i.e. a new document
    num_samples: int = 4
    # 0: as many as the block leaves (generate: after the prompt; chat: half of it, or what the
    # system prompt and the message leave), at most 100
    max_new_tokens: int = 0
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int = 0
    system_prompt: str = ""  # chat: the conversation's system message ("": none)

    def validate(self, vocab_size: int) -> None:
        """Raises ConfigError naming the first option (as its flag) out of range, for a model
        of ``vocab_size`` tokens."""
        check_range("--num_samples", self.num_samples, at_least=1, integer=True)
        fill = " (0: as many as the block leaves)"
        check_range("--max_new_tokens", self.max_new_tokens, at_least=0, integer=True, note=fill)
        check_range(
            "--top_k",
            self.top_k,
            at_least=0,
            at_most=vocab_size,
            integer=True,
            note=" (0: no top-k filter; at most model.vocab_size)",
        )
        check_range("--temperature", self.temperature, at_least=0, note=" (0: greedy)")
        check_range("--top_p", self.top_p, above=0, at_most=1, note=" (1: no nucleus filter)")
        check_range("--seed", self.seed, at_least=0, at_most=2**32 - 1, integer=True)

    def new_tokens(self, room: float) -> int:
        """``max_new_tokens``, or for 0 the ``room`` left in the block, from 1 to
        ``DEFAULT_NEW_TOKENS``."""
        return self.max_new_tokens or int(max(1, min(DEFAULT_NEW_TOKENS, room)))


def init_distributed() -> None:
    """Joins a multi-process run before anything touches a device.

    ``jax.distributed.initialize()`` finds the cluster itself on TPU pods, SLURM and Open MPI;
    elsewhere set ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``. CPU processes exchange collectives through gloo (GPU and TPU use
    their own). Raises ConfigError when it cannot join one (process 0 cannot take the port,
    or the coordinator does not answer in jax's 5 minutes) or a variable is malformed.
    """
    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    for name, value in (("JAX_NUM_PROCESSES", count), ("JAX_PROCESS_ID", index)):
        if value is not None and not value.isdigit():
            raise ConfigError(f"{name}={value!r} must be a whole number (see --distributed).")
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address is not None:
        _check_coordinator_address(address, starts_it=index is not None and int(index) == 0)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            num_processes=None if count is None else int(count),
            process_id=None if index is None else int(index),
        )
    except ValueError as error:  # jax's own checks of what it found, e.g. no coordinator
        raise ConfigError(
            f"--distributed could not join a cluster ({str(error).rstrip('.')}); run it under a "
            "TPU pod, SLURM or Open MPI, or set JAX_COORDINATOR_ADDRESS (host:port of process "
            "0), JAX_NUM_PROCESSES and JAX_PROCESS_ID."
        ) from None
    except jax.errors.JaxRuntimeError as error:  # the coordinator did not answer in time
        raise ConfigError(
            f"--distributed could not reach the coordinator ({first_line(error)}); start "
            "process 0 with the same JAX_COORDINATOR_ADDRESS (or, in a cluster, "
            "JAX_COORDINATOR_PORT) as every other process."
        ) from None


def _check_coordinator_address(address: str, *, starts_it: bool) -> None:
    """ConfigError unless ``address`` (``JAX_COORDINATOR_ADDRESS``) is ``host:port`` with a
    port in [1, 65535] (jax raised an IndexError without one) and, where this process
    ``starts_it`` (process 0), that port is free (jax crashed, often with a segfault)."""
    host, _, port = address.rpartition(":")
    if not (host and port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(
            f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port, the host of process 0 and "
            "a free port in [1, 65535], e.g. 10.0.0.1:1234 (see --distributed)."
        )
    if starts_it and not _port_is_free(int(port)):
        raise ConfigError(
            f"JAX_COORDINATOR_ADDRESS={address!r}: port {port} is in use on this host, where "
            "process 0 starts the coordinator; give every process another port."
        )


def _port_is_free(port: int) -> bool:
    """Whether a server can listen on ``port`` on every address of this host, as jax's
    coordinator does (``[::]:port``; TIME_WAIT connections of a finished run do not count)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("::", port))
    except OSError as error:  # other causes (a host without IPv6) are jax's to report
        return error.errno != errno.EADDRINUSE
    return True


def run(
    config,
    *,
    workdir: str,
    mode: str,
    sample_options: SampleOptions | None = None,
    distributed: bool = False,
) -> None:
    """Runs ``mode`` (one of ``MODES``) for ``config`` in ``workdir``, after checking every
    config field (and, to train, that ``workdir`` can be written) before anything compiles.
    ``distributed``: joins the multi-process run (``init_distributed``) after those checks, so
    that a bad config stops each process at once rather than once every process has joined
    (or, where only some processes have it, leaves the others waiting for them)."""
    if not str(workdir):  # Path("") is the current directory, which holds someone's files
        raise ConfigError("--workdir is empty: name the run's directory, e.g. --workdir=runs/x.")
    if mode not in MODES:
        raise ConfigError(f"--mode={mode!r} is not one of {list(MODES)}.")
    train.check_outside_checkpoints(workdir)  # eval writes there even reading init_from
    if distributed:
        train.validate_config(_without_backend_checks(config))
        if mode == "train":
            check_writable_directory(workdir, "--workdir")
        init_distributed()
    if mode == "train":
        train.validate_config(config)
        check_writable_directory(workdir, "--workdir")
        init_params = pretrained_params(config, workdir)
        train.print_once(config_text(config))
        train.train(config, workdir, init_params=init_params)
    elif mode == "generate":
        for i, text in enumerate(sample(config, workdir, sample_options or SampleOptions())):
            train.print_once(f"--- sample {i}\n{text}")
    elif mode == "eval":
        evaluate(config, workdir)
    else:
        converse(config, workdir, sample_options or SampleOptions())


def _without_backend_checks(config):
    """A copy of ``config`` with ``model.sdpa_implementation='cudnn'``, whose check asks which
    backend runs (a GPU's), as ``'auto'``: no process of a multi-process run may ask before it
    joins (``jax.distributed.initialize`` refuses to start after that), so the modes check
    the cuDNN choice after joining."""
    config = config.copy_and_resolve_references()
    if config.model.get("sdpa_implementation") == "cudnn":
        config.model.sdpa_implementation = "auto"
    return config


def pretrained_params(config, workdir: str | Path) -> Callable[[], object] | None:
    """What ``train.train`` starts from without a checkpoint: None for a fresh ``init``, or,
    with ``checkpoint.init_from``, a function that loads that HF checkpoint's params (called
    only then, so a resumed run never reads it). Where ``workdir`` holds no checkpoint, the
    checkpoint's config.json is checked against ``config.model`` here, before anything
    compiles, and so is its tokenizer, where it ships one, against the one that tokenized the
    data (``_check_data_tokenizer``); a run that resumes neither reads nor fetches it (the load
    checks it too)."""
    source = config.checkpoint.init_from
    if not source:
        return None
    model_cfg = models.config_from(config.model)
    if not train.has_checkpoint(workdir):
        own = hf.init_from_tokenizer(model_cfg, source)  # checks config.json too
        if own is not None:
            use = "fine-tuning on it would train the model on"
            _check_data_tokenizer(config, data.run_tokenizer(config.data), own, use)

    def load() -> object:
        params = hf.load_init_from(model_cfg, source).params
        train.print_once(f"initialised params from {source}")
        return params

    return load


def sample(config, workdir: str | Path, options: SampleOptions) -> list[str]:
    """Prompt plus completion, as text, for each of ``options.num_samples`` samples drawn
    from the latest checkpoint in ``workdir`` (or ``checkpoint.init_from``, see
    ``params_and_tokenizer``); each stops at end-of-text or at an end-of-sequence id of
    ``checkpoint.init_from`` (``init_from_eos_ids``). The prompt is shown as typed,
    without the special tokens its encoding added (Llama 3's BOS; an empty prompt's start),
    as transformers' ``decode(skip_special_tokens=True)`` shows a generation."""
    train.validate_config(config)
    model_cfg = models.config_from(config.model)
    options.validate(model_cfg.vocab_size)
    params, tokenizer = params_and_tokenizer(config, workdir)
    prompt = prompt_ids(tokenizer, options.prompt)
    generated = generate(
        params,
        [prompt] * options.num_samples,
        model_cfg,
        max_new_tokens=options.new_tokens(room(model_cfg, len(prompt))),
        temperature=options.temperature,
        top_k=options.top_k or None,
        top_p=None if options.top_p == 1 else options.top_p,
        key=jax.random.key(options.seed),
        stop_token=tokenizer.eot_id,
        stop_sequences=[[stop] for stop in init_from_eos_ids(config)],
        n_tokens=tokenizer.vocab_size,
    )
    typed = data.transformers_ids(tokenizer, options.prompt, template=False)
    return [tokenizer.decode(typed + new) for new in generated.completions()]


def init_from_eos_ids(config) -> tuple[int, ...]:
    """The end-of-sequence ids of ``checkpoint.init_from`` (the model's, or the one it was
    fine-tuned from; ``hf.eos_ids``), at each of which transformers' ``generate`` stops, as
    sampling does; () without one."""
    init_from = config.checkpoint.init_from
    return hf.eos_ids(init_from) if init_from else ()


def prompt_ids(tokenizer: data.Tokenizer, prompt: str) -> list[int]:
    """The ids ``--prompt`` is continued from: as transformers' tokenizer of the same files
    encodes it (``data.transformers_ids``: with Llama 3's BOS, with nothing added by GPT-2's
    BPE), or, for an empty prompt (or one of no tokens), the begin-of-sequence token the
    harness adapter puts before an empty context (``data.bos_id``; GPT-2's end-of-text).
    A prompt the tokenizer cannot encode is a DataError naming ``--prompt``."""
    try:
        ids = data.transformers_ids(tokenizer, prompt) if prompt else []
    except DataError as error:  # a character outside a char-level model's vocabulary
        raise DataError(f"--prompt: {error}; write the prompt in text the model reads.") from None
    return ids or [data.bos_id(tokenizer)]


def converse(config, workdir: str | Path, options: SampleOptions) -> None:
    """``--mode=chat``: a conversation in the terminal with the model ``sample`` would use.
    Each line read is a user message, answered by ``jaxpt.chat`` with the conversation so far
    (``options.system_prompt`` first). A message the model cannot take (longer than the block
    leaves, or text its tokenizer cannot encode) is one ``error:`` line and left out; end of
    input (Ctrl-D) or Ctrl-C, also while a reply is drawn, ends the conversation. In a
    multi-process run process 0 alone reads and prints, and every process answers the line it
    read (``_read_message``)."""
    train.validate_config(config)
    model_cfg = models.config_from(config.model)
    options.validate(model_cfg.vocab_size)
    params, tokenizer = params_and_tokenizer(config, workdir)
    # what would refuse every message, refused once now: a template with no end-of-turn
    # marker, a marker or system prompt the tokenizer cannot encode or the block cannot hold
    tokenizer.encode(data.end_of_turn(tokenizer, data.chat_template(tokenizer)))
    tokenizer.encode(options.system_prompt)
    messages = []
    if options.system_prompt:
        messages.append({"role": "system", "content": options.system_prompt})
        _check_system_prompt_leaves_room(tokenizer, messages, model_cfg)
    key = jax.random.key(options.seed)
    train.print_once("chat: type a message and press Enter; Ctrl-D ends the conversation")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C mid-reply
        while (text := _read_message()) is not None:
            key, turn_key = jax.random.split(key)
            turn = [*messages, {"role": "user", "content": text}]
            try:
                reply = _reply(params, model_cfg, tokenizer, turn, options, turn_key)
            except (ConfigError, DataError) as error:
                if jax.process_index() == 0:
                    print(f"error: {error} (message left out)", file=sys.stderr, flush=True)
                continue
            train.print_once(reply)
            messages = [*turn, {"role": "assistant", "content": reply}]
    train.print_once("")


def _check_system_prompt_leaves_room(tokenizer, system: list[dict], model_cfg) -> None:
    """ConfigError where the ``system`` messages, with an empty user message and the
    assistant's prompt, leave no room for a reply in the block: every message would be
    refused."""
    empty = [*system, {"role": "user", "content": ""}]
    taken = len(data.chat_prompt(tokenizer, empty, data.chat_template(tokenizer)))
    if taken > model_cfg.block_size:
        raise ConfigError(
            f"--system_prompt takes {taken} tokens of the chat prompt, even with an empty "
            f"message, which leaves no room for a reply in model.block_size = "
            f"{model_cfg.block_size}: shorten it."
        )


def _read_message() -> str | None:
    """The next message process 0 reads (``_typed_message``), the same on every process of
    a multi-process run, each of which draws the reply over the params they share: only
    process 0 has the user's terminal (the others' stdin is none, or another's input)."""
    line = _typed_message() if jax.process_index() == 0 else None
    encoded = np.frombuffer(b"" if line is None else line.encode(_UTF8, _ANY), np.uint8)
    size = multihost_utils.broadcast_one_to_all(np.int32(-1 if line is None else encoded.size))
    if size < 0:
        return None
    received = encoded if jax.process_index() == 0 else np.zeros(int(size), np.uint8)
    return multihost_utils.broadcast_one_to_all(received).tobytes().decode(_UTF8, _ANY)


def _typed_message() -> str | None:
    """The next line typed at the ``> `` prompt that is not blank; None at the end of input
    (Ctrl-D) or on Ctrl-C."""
    line = ""
    try:
        while not line.strip():
            line = input("> ")
    except (EOFError, KeyboardInterrupt):
        return None
    return line


def _reply(params, model_cfg, tokenizer, messages, options: SampleOptions, key) -> str:
    """``jaxpt.chat``'s reply to ``messages`` with the command line's sampling options."""
    left = reply_room(tokenizer, messages, data.chat_template(tokenizer), model_cfg)
    return chat(
        params,
        model_cfg,
        tokenizer,
        messages,
        max_new_tokens=options.new_tokens(left),
        temperature=options.temperature,
        top_k=options.top_k or None,
        top_p=None if options.top_p == 1 else options.top_p,
        key=key,
    )


def params_and_tokenizer(config, workdir: str | Path) -> tuple[object, data.Tokenizer]:
    """The latest checkpoint's params and the run's tokenizer. In a workdir without
    checkpoints, a config with ``checkpoint.init_from`` gets that HF checkpoint's params and
    the tokenizer that came with it (else the run's)."""
    loaded = load_params(config, workdir, "sampling from")
    return loaded.params, loaded.tokenizer


class Loaded(NamedTuple):
    """Params read for sampling or evaluation, and where they came from."""

    step: int  # the checkpoint's step; 0 for checkpoint.init_from
    source: str  # e.g. "checkpoint 200 of runs/gpt" or "checkpoint.init_from=gpt2"
    params: object
    tokenizer: data.Tokenizer


def _reads_init_from(config, workdir: str | Path) -> bool:
    """Whether ``load_params`` reads ``checkpoint.init_from``: it is set and ``workdir`` holds
    no checkpoint."""
    return bool(config.checkpoint.init_from) and not train.has_checkpoint(workdir)


def _tokenizer_of(config, workdir: str | Path) -> data.Tokenizer:
    """The tokenizer of the params ``load_params`` reads, after checking that there are some
    (ConfigError: see ``train.trained_checkpoints`` and ``hf.check_init_from``); reads no
    params."""
    if not _reads_init_from(config, workdir):
        train.trained_checkpoints(workdir, or_init_from=True)
        return data.run_tokenizer(config.data)
    own = hf.init_from_tokenizer(models.config_from(config.model), config.checkpoint.init_from)
    return data.run_tokenizer(config.data) if own is None else own


def load_params(
    config, workdir: str | Path, verb: str, tokenizer: data.Tokenizer | None = None
) -> Loaded:
    """What ``params_and_tokenizer`` reads, printing ``"<verb> <source>"``; reads only.
    ``tokenizer``: the params' (``_tokenizer_of``), where the caller has it already."""
    if tokenizer is None:
        tokenizer = _tokenizer_of(config, workdir)
    source = config.checkpoint.init_from
    if _reads_init_from(config, workdir):
        params = hf.load_init_from(models.config_from(config.model), source).params
        loaded = Loaded(0, f"checkpoint.init_from={source}", params, tokenizer)
    else:
        step, params = train.latest_params(config, workdir)
        loaded = Loaded(step, f"checkpoint {step} of {workdir}", params, tokenizer)
    train.print_once(f"{verb} {loaded.source}")
    return loaded


# ----------------------------------------------------------------------------- --mode=eval


def evaluate(config, workdir: str | Path) -> Path | None:
    """``--mode=eval``: the tasks of ``eval.tasks`` on the latest checkpoint in ``workdir`` (or
    on ``checkpoint.init_from``, as ``params_and_tokenizer`` reads them), printed as a table
    and written by process 0 to ``<workdir>/eval/<step>.json``, whose path it returns. Every
    input (config, data, HellaSwag items and their tokens, lm-eval) is checked before the
    params are read, and that there are params to evaluate before any task data is read (which
    can take long). A file of that name is never overwritten: evaluating a step again writes
    ``<step>.1.json``, and so on."""
    train.validate_config(config)
    tasks = evals.parse_tasks(config.eval.tasks)
    check_writable_directory(Path(workdir) / "eval", "--workdir")
    mesh = sharding.make_mesh(config.mesh)
    train.check_batch_fits_mesh(config, mesh)
    train.check_experts_fit_mesh(config, mesh)
    tokenizer = _tokenizer_of(config, workdir)
    runners = _task_runners(config, tasks, mesh, tokenizer)
    loaded = load_params(config, workdir, "evaluating", tokenizer)
    shardings = sharding.param_shardings(loaded.params, mesh, config.mesh.rules)
    params = jax.device_put(loaded.params, shardings)
    results = {}
    for run_task in runners:
        results.update(run_task(params))
    train.print_once(results_table(results))
    if jax.process_index() != 0:  # one process writes
        return None
    record = {"step": loaded.step, "source": loaded.source, "results": results}
    return write_new_json(Path(workdir) / "eval", str(loaded.step), record)


def _task_runners(config, tasks: list[str], mesh, tokenizer: data.Tokenizer) -> list[Callable]:
    """One ``params -> {task: metrics}`` per kind of task asked for, of a model that reads
    ``tokenizer``, each set up (data read and checked) now."""
    runners = []
    if "val_loss" in tasks:
        runners.append(_val_loss_runner(config, mesh, tokenizer))
    if "hellaswag" in tasks:
        hellaswag = evals.hellaswag.for_run(config, mesh, tokenizer)
        runners.append(lambda params: {"hellaswag": hellaswag(params)})
    harness_tasks = [t.removeprefix(evals.HARNESS) for t in tasks if t.startswith(evals.HARNESS)]
    if harness_tasks:
        runners.append(_harness_runner(config, harness_tasks, mesh, tokenizer))
    return runners


def _val_loss_runner(config, mesh, tokenizer: data.Tokenizer) -> Callable:
    model_cfg = models.config_from(config.model)
    batch_size, seq_len = config.train.batch_size, model_cfg.block_size
    need = data.tokens_needed(0, batch_size, seq_len, config.eval.batches)
    manifest = data.ensure_prepared(config.data, need=need)
    data.check_vocab(manifest, model_cfg.vocab_size)
    use, otherwise = "val_loss would score", ", or leave val_loss out of eval.tasks"
    _check_data_tokenizer(config, data.tokenizer_for(manifest), tokenizer, use, otherwise)
    batch_sh = sharding.batch_sharding(mesh, config.mesh.rules)
    loader = train.validation_data(config, manifest, batch_sh)
    step = jax.jit(train.make_eval_step(config))

    def run(params) -> dict:
        with sharding.activation_sharding(mesh, config.mesh.rules):
            return {
                "val_loss": evals.validation_loss(
                    step, params, loader, config.eval.batches, batch_sh
                )
            }

    return run


def _check_data_tokenizer(
    config, prepared: data.Tokenizer, tokenizer: data.Tokenizer, use: str, otherwise: str = ""
) -> None:
    """ConfigError unless ``tokenizer`` (``checkpoint.init_from``'s) reads the run's data as
    ``prepared``, the tokenizer that wrote it, does: else ``use`` (what the run would do with
    the data: "fine-tuning on it would train the model on", ...) ids that mean other text to
    the model. ``otherwise``: another way out, ended the sentence with."""
    if data.same_vocabulary(prepared, tokenizer):
        return
    own, wrote = _tokenizer_name(tokenizer), _tokenizer_name(prepared)
    raise ConfigError(
        f"checkpoint.init_from={config.checkpoint.init_from} comes with another tokenizer "
        f"({own}) than the one that tokenized data.dataset={config.data.dataset!r} ({wrote}): "
        f"{use} ids that mean other text to it; prepare the data with the checkpoint's "
        f"tokenizer (python -m jaxpt.data.prepare --tokenizer={own}, and "
        f"--config.data.tokenizer={own}){otherwise}."
    )


def _tokenizer_name(tokenizer: data.Tokenizer) -> str:
    """What ``--tokenizer`` of ``jaxpt.data.prepare`` names ``tokenizer`` by: its
    tokenizer.json, or "gpt2" / "char"."""
    if isinstance(tokenizer, data.HFTokenizer):
        return str(tokenizer.path)
    return tokenizer.spec()["kind"]


def _harness_runner(config, tasks: list[str], mesh, tokenizer: data.Tokenizer) -> Callable:
    try:
        from jaxpt.evals import harness
    except ImportError as error:  # lm-eval is an optional extra
        raise ConfigError(
            f"eval.tasks={config.eval.tasks!r} names lm-evaluation-harness tasks, but lm-eval "
            f"does not import ({error}); install it with `uv sync --extra harness`."
        ) from None
    model_cfg = models.config_from(config.model)
    loaded = harness.load_tasks(tasks, model_cfg.max_length)
    harness.check_requests(loaded, tokenizer)
    rows = config.train.batch_size // config.train.grad_accum_steps
    stop_ids = init_from_eos_ids(config)

    def run(params) -> dict:
        metrics = harness.evaluate(
            params,
            model_cfg,
            tokenizer,
            loaded,
            batch_size=rows,
            mesh=mesh,
            rules=config.mesh.rules,
            stop_ids=stop_ids,
        )
        return {f"{evals.HARNESS}{name}": values for name, values in metrics.items()}

    return run


def results_table(results: dict[str, dict]) -> str:
    """One line per task and metric: ``task  metric  value``."""
    lines = [f"{'task':<28} {'metric':<24} value"]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{task:<28} {metric:<24} {shown}")
    return "\n".join(lines)


def write_new_json(directory: Path, stem: str, record: dict) -> Path:
    """Writes ``record`` to ``directory/<stem>.json``, or where that exists to the first free
    ``<stem>.<n>.json``, through a temporary file hard-linked into place: a link fails rather
    than replace a file, so no file is ever overwritten or left half-written. On a filesystem
    without hard links (``NO_HARD_LINKS``) the file is created exclusively and written instead,
    and removed again if that is interrupted (only a killed process can leave it partial)."""
    text = (json.dumps(record, indent=2) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{stem}.{os.getpid()}.tmp"
    temporary.write_bytes(text)
    try:
        for n in itertools.count():
            path = directory / (f"{stem}.json" if n == 0 else f"{stem}.{n}.json")
            try:
                _link_or_create(temporary, path, text)
            except FileExistsError:
                continue
            print(f"wrote {path}", flush=True)
            return path
    finally:
        temporary.unlink()


# What link(2) answers where a filesystem has no hard links: EPERM (Linux's vfat and exfat,
# VMware's hgfs), ENOTSUP = EOPNOTSUPP (macOS, Docker's osxfs), ENOSYS (FUSE filesystems that
# do not implement link: gcsfuse, LTFS) and EXDEV (union filesystems such as mergerfs, between
# branches). Never EEXIST: a name taken stays FileExistsError.
NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV})


def _link_or_create(temporary: Path, path: Path, text: bytes) -> None:
    """Hard-links ``temporary`` (holding ``text``) to ``path``, or where the filesystem has no
    hard links, creates ``path`` and writes ``text`` to it; FileExistsError where it exists."""
    try:
        os.link(temporary, path)
    except OSError as error:
        if error.errno not in NO_HARD_LINKS:
            raise
        _create_new(path, text)


def _create_new(path: Path, text: bytes) -> None:
    """Creates ``path`` exclusively (FileExistsError where it exists) and writes ``text`` to
    it, synced; on any error or interrupt after the create, removes the file it created."""
    file = open(path, "xb")  # noqa: SIM115 (the with below closes it, inside the try)
    try:
        with file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())  # a full disk, or gcsfuse's upload, fails here, not later
    except BaseException:
        path.unlink()
        raise
