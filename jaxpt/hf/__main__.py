"""The command line: a transformers checkpoint into a directory ``checkpoint.init_from`` reads
(``--to=jaxpt``), or a run's latest checkpoint out as one (``--to=hf``).

    uv run python -m jaxpt.hf --to=jaxpt --source=HuggingFaceTB/SmolLM-135M --out=hf/smollm
    uv run python -m jaxpt.hf --to=hf --config=configs/gpt.py:smoke --workdir=runs/gpt \\
        --out=hf/gpt-smoke

``--out`` must be a new or empty directory: nothing a user put there is overwritten.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from jaxpt.errors import (  # imports nothing more
    ConfigError,
    DataError,
    exit_at_once_on_interrupt,
    exit_interrupted,
    first_line,
    sentence,
)

# Ctrl-C before --out holds a complete checkpoint (a save cut short removes what it wrote)
_INTERRUPTED = "jaxpt.hf: interrupted (SIGINT); --out is as it was: run the command again."

with exit_at_once_on_interrupt(_INTERRUPTED):  # jax and the rest import for seconds
    import jax
    from absl import app, flags, logging

    from jaxpt import data, models, train
    from jaxpt.config import check_new_directory, define_config_flag, parse_flags
    from jaxpt.hf._convert import config_to_hf
    from jaxpt.hf._files import Pretrained, checkpoint_directory, from_pretrained, save_pretrained
    from jaxpt.hf._layouts import CheckpointError, layout_of


def _check_out(out: str | os.PathLike) -> None:
    """ConfigError unless ``out`` is a new or empty directory outside every run's
    checkpoints (a directory written there would read as one of that run's steps)."""
    train.check_outside_checkpoints(out, "--out")
    check_new_directory(out, "--out")


def _flag(name: str, value) -> str:
    """``--name=value`` as a shell reads it back: the value quoted where it needs it (a path
    with a space)."""
    return f"--{name}={shlex.quote(str(value))}"


def _launch_flags(config, out: Path) -> str:
    """launch.py overrides that make a preset's run start from the checkpoint in ``out``."""
    layout = layout_of(config)
    lines = [_flag("config.checkpoint.init_from", out)]
    fields = config.to_dict()
    lines += [_flag(f"config.model.{field}", fields[field]) for field in layout.keys]
    if (out / data.HFTokenizer.file).is_file():
        lines.append(_flag("config.data.tokenizer", out))
    return " \\\n    ".join(lines)


def import_checkpoint(source, out: str | os.PathLike) -> Pretrained:
    """``--to=jaxpt``: reads ``source`` and writes it to ``out`` (new or empty) as a directory
    that ``checkpoint.init_from`` (and transformers) reads: safetensors, with its tokenizer."""
    _check_out(out)
    config, params, tokenizer = pretrained = from_pretrained(source)
    out = save_pretrained(params, config, out, tokenizer=tokenizer, origin=source).absolute()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    preset = _flag("config", f"configs/{config.name}.py")
    launch = f"launch.py {preset} {_flag('workdir', f'runs/{out.name}')}"
    print(
        f"{out}: {config.name} layout, {n_params:,} parameters. Fine-tune or sample with\n"
        f"  uv run python {launch} \\\n    {_launch_flags(config, out)}",
        flush=True,
    )
    return pretrained


def export_checkpoint(config, workdir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """``--to=hf``: the latest checkpoint of a run in ``workdir`` as an HF directory ``out``
    (new or empty), with the run's tokenizer when it has an HF form (tokenizer.json or
    GPT-2's) and the special-token ids and generation defaults of its
    ``checkpoint.init_from``, if any."""
    _check_out(out)
    model_cfg = models.config_from(config.model)
    architecture = config_to_hf(model_cfg)["architectures"][0]  # fails before any reading
    origin = _origin(config.checkpoint.init_from)
    step, params = train.latest_params(config, workdir)
    print(f"exporting checkpoint {step} of {workdir}", flush=True)
    tokenizer = data.run_tokenizer(config.data)
    if not isinstance(tokenizer, (data.HFTokenizer, data.Gpt2Tokenizer)):
        print(f"the {type(tokenizer).__name__} has no Hugging Face form; not written", flush=True)
        tokenizer = None
    path = save_pretrained(params, model_cfg, out, tokenizer=tokenizer, origin=origin)
    print(f"wrote {path} ({architecture})", flush=True)
    return path


def _origin(init_from: str) -> Path | None:
    """The directory of the checkpoint a run's params came from (``checkpoint.init_from``),
    or None; ConfigError naming the field when it cannot be read (moved, or a hub model that is
    neither cached nor reachable), before the run's checkpoint is read."""
    if not init_from:
        return None
    try:
        return checkpoint_directory(init_from)
    except CheckpointError as error:
        raise ConfigError(
            f"checkpoint.init_from={init_from!r}, the checkpoint this run started from, whose "
            f"special-token ids and generation defaults the export keeps, cannot be read "
            f"({first_line(error)}); restore it, or export without them: "
            "--config.checkpoint.init_from=''."
        ) from None


def _main(argv) -> None:
    if len(argv) > 1:  # one sentence, as launch.py says it (a UsageError prints the help)
        sys.exit(
            f"jaxpt.hf: unexpected arguments {' '.join(argv[1:])!r}; pass each as --flag=value."
        )
    logging.set_verbosity(logging.WARNING)  # as launch.py: no absl/orbax narration at INFO
    f = flags.FLAGS
    try:
        _check_direction(f)
        if f.to == "jaxpt":
            if not f.source:
                raise ConfigError("--to=jaxpt needs --source=<checkpoint directory or hub name>.")
            import_checkpoint(f.source, f.out)
        else:
            if f.config is None or not f.workdir:
                raise ConfigError("--to=hf needs --config=<preset file> and --workdir=<run>.")
            export_checkpoint(f.config, f.workdir, f.out)
    except (ConfigError, DataError) as error:
        sys.exit(f"jaxpt.hf: {sentence(error)}")
    except KeyboardInterrupt:
        exit_interrupted(_interrupted(f.out))


_READS = {"jaxpt": ["source"], "hf": ["config", "workdir"]}  # the flags each direction reads


def _check_direction(f: flags.FlagValues) -> None:
    """ConfigError naming a flag given that ``--to``'s direction does not read (it would be
    ignored without a word), before anything is read or written."""
    other = "hf" if f.to == "jaxpt" else "jaxpt"
    for name in _READS[other]:
        if f[name].present:
            raise ConfigError(
                f"--to={f.to} does not read --{name}, which only --to={other} reads; leave it "
                f"out (--to={f.to} reads {', '.join(f'--{n}' for n in _READS[f.to])} and --out)."
            )


def _interrupted(out: str) -> str:
    """The line for Ctrl-C, which says what ``out`` holds: a save that finished (the command
    was printing its closing lines) has renamed config.json into it last."""
    if (Path(out) / "config.json").is_file():
        return (
            "jaxpt.hf: interrupted (SIGINT); --out holds a complete checkpoint: it is ready to use."
        )
    return _INTERRUPTED


def _define_flags() -> None:
    """The command line's flags (defined only when run as a script, never on import)."""
    flags.DEFINE_enum("to", None, ["jaxpt", "hf"], "jaxpt: import a checkpoint; hf: export a run.")
    flags.DEFINE_string("source", None, "--to=jaxpt: checkpoint directory or hub name.")
    flags.DEFINE_string("out", None, "Directory to write: new or empty.")
    flags.DEFINE_string("workdir", None, "--to=hf: the run's workdir (its latest checkpoint).")
    define_config_flag("jaxpt.hf", "--to=hf: the run's preset, e.g. configs/gpt.py:smoke.")
    flags.mark_flags_as_required(["to", "out"])


if __name__ == "__main__":
    _define_flags()
    app.run(_main, flags_parser=parse_flags("jaxpt.hf"))
