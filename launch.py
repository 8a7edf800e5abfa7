"""jaxpt launcher.

uv run python launch.py --config=configs/gqa_glu_rope.py:smoke --workdir=runs/smoke
uv run python launch.py --config=configs/gpt.py --config.train.steps=100 --workdir=runs/gpt
uv run python launch.py --config=configs/gqa_glu_rope.py:smoke --workdir=runs/smoke \\
    --mode=generate --prompt="The" --num_samples=2 --max_new_tokens=40
uv run python launch.py --config=configs/gqa_glu_rope.py:smoke --workdir=runs/smoke \\
    --mode=eval --config.eval.tasks=val_loss,hellaswag
uv run python launch.py --config=configs/smollm_sft.py --workdir=runs/smollm-sft --mode=chat \\
    --system_prompt="You are a helpful assistant." --temperature=0.7 --top_k=50
"""

import sys

from jaxpt.errors import (  # imports nothing more
    ConfigError,
    DataError,
    exit_at_once_on_interrupt,
    exit_interrupted,
    sentence,
)

# Ctrl-C outside the training loop (imports, data, restore, other modes)
_INTERRUPTED = "launch.py: interrupted (SIGINT); run the command again to go on."

with exit_at_once_on_interrupt(_INTERRUPTED):  # jax and the rest import for seconds
    from absl import app, flags, logging

    from jaxpt import launcher, train
    from jaxpt.config import define_config_flag, parse_flags

_DEFAULTS = launcher.SampleOptions()

define_config_flag("launch.py", "Preset file, e.g. configs/gpt.py:smoke.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and plots.")
flags.DEFINE_enum("mode", "train", launcher.MODES, "What to run.")
flags.DEFINE_bool(
    "distributed",
    False,
    "One process of a multi-host run (one per host): jax.distributed.initialize() finds the "
    "cluster (TPU pod, SLURM, MPI) or reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
    "JAX_PROCESS_ID.",
)
flags.DEFINE_string(
    "prompt", _DEFAULTS.prompt, "generate: text to continue (empty: a new document)."
)
flags.DEFINE_integer("num_samples", _DEFAULTS.num_samples, "generate: samples of the prompt.")
flags.DEFINE_integer(
    "max_new_tokens",
    _DEFAULTS.max_new_tokens,
    f"generate, chat: the most tokens per sample or reply (0: as many as the block leaves after "
    f"the prompt, for chat half the block or what the system prompt and message leave, at most "
    f"{launcher.DEFAULT_NEW_TOKENS}).",
)
flags.DEFINE_float("temperature", _DEFAULTS.temperature, "generate, chat: 0 is greedy.")
flags.DEFINE_integer(
    "top_k", _DEFAULTS.top_k, "generate, chat: keep the k likeliest tokens (0: all)."
)
flags.DEFINE_float("top_p", _DEFAULTS.top_p, "generate, chat: nucleus mass to keep (1: all).")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "generate, chat: sampling seed.")
flags.DEFINE_string("system_prompt", _DEFAULTS.system_prompt, "chat: system message (none: '').")
flags.mark_flags_as_required(["config", "workdir"])
# the modes each sampling flag applies to (elsewhere it would be ignored: refused instead)
_FLAG_MODES = {
    "prompt": ("generate",),
    "num_samples": ("generate",),
    **dict.fromkeys(
        ["max_new_tokens", "temperature", "top_k", "top_p", "seed"], ("generate", "chat")
    ),
    "system_prompt": ("chat",),
}


def _check_flags_apply(mode: str) -> None:
    """Exits with one sentence when a sampling flag given is one ``mode`` ignores."""
    for name, modes in _FLAG_MODES.items():
        if flags.FLAGS[name].present and mode not in modes:
            sys.exit(
                f"launch.py: --{name} applies to --mode={' and --mode='.join(modes)}, not "
                f"--mode={mode}; leave it out."
            )


def main(argv):
    if len(argv) > 1:  # e.g. a flag without its dashes, which would be ignored
        sys.exit(
            f"launch.py: unexpected arguments {' '.join(argv[1:])!r}; pass each as --flag=value."
        )
    logging.set_verbosity(logging.WARNING)  # orbax and absl narrate every save at INFO
    f = flags.FLAGS
    _check_flags_apply(f.mode)
    options = launcher.SampleOptions(
        prompt=f.prompt,
        num_samples=f.num_samples,
        max_new_tokens=f.max_new_tokens,
        temperature=f.temperature,
        top_k=f.top_k,
        top_p=f.top_p,
        seed=f.seed,
        system_prompt=f.system_prompt,
    )
    try:
        launcher.run(
            f.config,
            workdir=f.workdir,
            mode=f.mode,
            sample_options=options,
            distributed=f.distributed,
        )
    except (ConfigError, DataError, train.NonFiniteError) as error:  # one sentence, no traceback
        sys.exit(f"launch.py: {sentence(error)}")
    except train.Interrupted as stop:  # saved; the shell's status for death by that signal
        sys.exit(128 + stop.signal)
    except KeyboardInterrupt:  # XLA may still be compiling: no interpreter finalization
        exit_interrupted(_INTERRUPTED, at_once=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags("launch.py"))
