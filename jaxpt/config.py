"""Run configs: the sections every preset shares, the ``:arg`` parser and the smoke shrink;
and the command-line checks ``launch.py`` and ``python -m jaxpt.hf`` share.

A preset file ``configs/<name>.py`` is ``get_config(arg) -> preset_config("<name>", arg)``
plus its own overrides. Sections: ``model`` (exactly what ``init``/``apply`` take), ``data``,
``train``, ``mesh``, ``checkpoint``, ``eval``, ``log``. Their range checks live beside the code
that reads them; ``jaxpt.train.validate_config`` runs them all.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags

from jaxpt import models, sharding
from jaxpt.errors import ConfigError, did_you_mean, first_line, sentence

SECTIONS = ("model", "data", "train", "mesh", "checkpoint", "eval", "log")  # of a run config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses a config argument such as ``"smoke"`` or ``"smoke,steps=50"``.

    Bare words set a boolean default to True; ``key=value`` takes the type of the default.
    Unknown keys, a key given twice (``smoke,smoke=false``) and values that do not parse
    raise ConfigError.
    """
    parsed, given = ml_collections.ConfigDict(defaults), set()
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ConfigError(
                f"config argument {key!r} is not one of {sorted(defaults)}; pass one of them "
                f"after the file's colon (e.g. :{min(defaults)}), or none."
            )
        if key in given:
            raise ConfigError(f"config argument {key!r} is given twice; give it once.")
        given.add(key)
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ConfigError(f"config argument {key!r} needs a value: {key}=...")
            parsed[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"config argument {key}={value!r} must be true or false.")
            parsed[key] = value.lower() == "true"
        else:
            try:
                parsed[key] = type(default)(value)
            except ValueError:
                raise ConfigError(
                    f"config argument {key}={value!r} is not a {type(default).__name__}."
                ) from None
    return parsed


def base_config(model_name: str) -> ml_collections.ConfigDict:
    """Every section with its defaults, the model section from the registry preset."""
    config = ml_collections.ConfigDict()
    config.model = models.get(model_name).default_config().to_dict()

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "HuggingFaceFW/fineweb-edu"  # HF name, local path or "embedded"
    config.data.tokenizer = "gpt2"  # gpt2 | char | a directory with tokenizer.json
    # A hub dataset is prepared into $JAXPT_CACHE_DIR on first use: this many tokens (val +
    # train); 0 or -1: exactly what train.steps and eval.batches read.
    config.data.max_tokens = 0

    config.train = ml_collections.ConfigDict()
    config.train.steps = 19073  # ~10B tokens at 512 x 1024 tokens per step
    config.train.batch_size = 512  # global, in sequences of model.block_size tokens
    config.train.grad_accum_steps = 1  # micro-batches per step; must divide batch_size
    config.train.lr = 6e-4  # peak learning rate
    config.train.min_lr_ratio = 0.1  # final lr = lr * min_lr_ratio
    config.train.warmup_steps = 715
    config.train.optimizer = "adamw"  # adamw | adam | adafactor | lion | muon
    config.train.schedule = "cosine"  # cosine | wsd (warmup-stable-decay) | inverse_sqrt
    # wsd: the last fraction of steps decays linearly (None: jaxpt.train.WSD_DECAY_FRACTION,
    # 0.2); setting it for another schedule, which does not read it, is refused
    config.train.decay_fraction = ml_collections.config_dict.placeholder(float)
    config.train.weight_decay = 0.1
    # None: the optimizer's own (jaxpt.train.OPTIMIZER_DEFAULTS: AdamW's 0.9, 0.95, 1e-8 as
    # GPT-2 trained; Lion's 0.9, 0.99); setting one the optimizer does not read is refused
    config.train.b1 = ml_collections.config_dict.placeholder(float)
    config.train.b2 = ml_collections.config_dict.placeholder(float)
    config.train.eps = ml_collections.config_dict.placeholder(float)
    config.train.decay_embeddings = False  # weight decay on embedding tables too
    config.train.grad_clip = 1.0  # global-norm clip
    config.train.on_nonfinite = "stop"  # non-finite loss: stop | skip (the update)
    config.train.seed = 0
    config.train.load_balance_loss_coeff = 0.0  # times aux["load_balance_loss"] (MoE)
    config.train.z_loss_coeff = 0.0  # times aux["z_loss"] (MoE router z-loss)

    config.mesh = ml_collections.ConfigDict()
    # Sizes within one slice (a TPU slice, a GPU host; a process on CPU)
    config.mesh.data = -1  # -1: all devices left over
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    config.mesh.expert = 1
    # Slices the data / FSDP axes span (their product: the number of slices; -1: the slices
    # the other leaves); the mesh's data axis is data x dcn_data, its fsdp axis fsdp x dcn_fsdp
    config.mesh.dcn_data = -1
    config.mesh.dcn_fsdp = 1
    config.mesh.rules = sharding.default_rules()  # logical axis name -> mesh axes
    # ZeRO-1: the optimizer moments are split over the data axis too (after fsdp), so each
    # data-parallel device keeps and updates its share (the params stay as the rules say)
    config.mesh.shard_optimizer = False

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.keep = 3
    # An HF checkpoint directory or hub name a run starts from when its workdir has no
    # checkpoint yet (see jaxpt.hf); "" for none.
    config.checkpoint.init_from = ""

    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 250
    config.eval.batches = 20  # validation batches per evaluation
    # What --mode=eval reports, comma-separated: val_loss, hellaswag, harness:TASK (any
    # lm-evaluation-harness task or task YAML file; needs the `harness` extra).
    config.eval.tasks = "val_loss,hellaswag"
    config.eval.hellaswag_path = ""  # a HellaSwag jsonl file; "": the hub's validation split
    config.eval.hellaswag_every_steps = 0  # HellaSwag while training: every N steps; 0: never

    config.log = ml_collections.ConfigDict()
    config.log.every_steps = 10
    config.log.shardings = False  # print the mesh and every param's PartitionSpec at start
    # Trace log.profile_steps steps with jax.profiler from this step on (0: never), into
    # WORKDIR/profile (TensorBoard's profile plugin or Perfetto open it).
    config.log.profile_from_step = 0
    config.log.profile_steps = 5
    return config


def shrink_for_smoke(config: ml_collections.ConfigDict) -> None:
    """Makes ``config`` a tiny CPU run on the embedded corpus (200 steps: minutes on 2 cores).

    The model keeps its architecture (pattern, head ratio, norms, positions) at width <= 128,
    block 64 and one or two repeats of its mixer pattern.
    """
    model = config.model
    preset = models.config_from(model)
    model.block_size = 64
    model.dtype = "float32"
    if isinstance(preset, models.ModelConfig):
        model.logits_dtype = "float32"
        group = model.n_head // model.n_kv_head
        model.n_kv_head = 2 if group > 1 else 4
        model.n_head = model.n_kv_head * group
        model.n_embed = 16 * model.n_head  # head width 16
        model.n_mlp_hidden = 4 * model.n_embed
        model.n_layer = max(2, len(preset.mixer_pattern))
    config.data.dataset = "embedded"
    config.train.steps = 200
    config.train.batch_size = 16
    config.train.lr = 3e-3
    config.train.warmup_steps = 20
    config.checkpoint.every_steps = 100
    config.eval.every_steps = 100
    config.eval.batches = 4
    config.log.every_steps = 10


def preset_config(model_name: str, arg: str | None) -> ml_collections.ConfigDict:
    """The run config of a registry preset; ``arg`` ``"smoke"`` shrinks it to a CPU run."""
    args = parse_arg(arg, smoke=False)
    config = base_config(model_name)
    if args.smoke:
        shrink_for_smoke(config)
    return config


# ----------------------------------------------------------------------------- command line


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """The config ``--config=<file>[:<arg>]`` names, loaded as ``config_flags`` loads it: the
    file's ``get_config(arg)``, or ``get_config()`` without a colon.

    Raises ConfigError for a file that does not exist, is not a preset file (Python with a
    ``get_config`` returning a run config of every section) or an argument ``get_config``
    rejects.
    """
    path, colon, arg = spec.partition(":")
    preset = "name a preset file such as configs/gpt.py"
    if not Path(path).is_file():
        raise ConfigError(
            f"--config={spec}: {path!r} is not a file; {preset}, or configs/gpt.py:smoke for "
            "its tiny CPU variant."
        )
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if module_spec is None:  # not a .py file
        raise ConfigError(f"--config={spec}: {path!r} is not a Python file; {preset}.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if "get_config" not in vars(module):
        raise ConfigError(f"--config={spec}: {path!r} defines no get_config(arg); {preset}.")
    try:
        config = module.get_config(*([arg] if colon else []))
    except ConfigError as error:
        raise ConfigError(f"--config={spec}: {error}") from None
    if not isinstance(config, ml_collections.ConfigDict) or any(s not in config for s in SECTIONS):
        raise ConfigError(
            f"--config={spec}: get_config did not return a run config with the sections "
            f"{', '.join(SECTIONS)}; build it with jaxpt.config.preset_config, as the files in "
            "configs/ do."
        )
    check_fields(config, f"--config={spec}: get_config")
    return config


def check_fields(config: ml_collections.ConfigDict, setter: str = "the run config") -> None:
    """Raises ConfigError naming the first field ``config`` sets (``setter`` says who) that a
    run config of its model (``base_config``) does not have, a misspelling no part of jaxpt
    would read, and the closest fields; nothing when ``model.name`` names no preset (said
    later)."""
    if config.model.get("name") not in models.names():
        return
    known = base_config(config.model.name)
    for path in _field_paths(config):
        section, _, key = path.rpartition(".")
        node = _field(known, section)
        if isinstance(node, ml_collections.ConfigDict) and key not in node:
            hint = did_you_mean(key, sorted(node), elsewhere=_fields_named(known, key))
            where = section or "a run config"
            raise ConfigError(f"{setter} sets {path}, but {where} has no such field; {hint}")


def _field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """The dotted paths of every field in ``config`` and in its sections, e.g. ``train.lr``."""
    paths = []
    for key, value in config.items():
        paths.append(f"{prefix}{key}")
        if isinstance(value, ml_collections.ConfigDict):
            paths += _field_paths(value, f"{prefix}{key}.")
    return paths


def check_override(config: ml_collections.ConfigDict, path: str) -> None:
    """Raises ConfigError unless ``--config.<path>`` (e.g. ``train.steps``) names a field of
    ``config``; only a list's element can be set alone (``mesh.rules.batch[0]``, of a tuple,
    cannot)."""
    node, where = config, "config"
    for key in path.split("."):
        key, bracket, _ = key.partition("[")
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{path}: {where} is a value, not a section.")
        if key not in node:  # train.block_size is model's: that, not the close batch_size
            hint = did_you_mean(key, sorted(node), elsewhere=_fields_named(config, key))
            raise ConfigError(f"--config.{path}: {where} has no field {key!r}; {hint}")
        node, where = node[key], f"{where}.{key}"
        if bracket and not isinstance(node, list):  # config_flags raised IndexError
            field = where.removeprefix("config.")
            shown = f'"{node!r}"' if isinstance(node, tuple) else node  # quoted for the shell
            raise ConfigError(
                f"--config.{path}: {where} has no elements to set one by one; set the whole "
                f"field, e.g. --config.{field}={shown}."
            )


def _fields_named(config: ml_collections.ConfigDict, name: str) -> list[str]:
    """The dotted paths of the fields and sections called ``name`` inside ``config``'s
    sections, e.g. ``["checkpoint.every_steps", "eval.every_steps", "log.every_steps"]``."""
    paths = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            paths += [f"{key}.{field}" for field in value if field == name]
            paths += [f"{key}.{path}" for path in _fields_named(value, name)]
    return paths


# How config_flags parses an override of a field of each type (the others cannot fail)
_OVERRIDE_PARSERS = {
    bool: (flags.BooleanParser(), "true or false"),
    int: (flags.IntegerParser(), "a whole number"),
    float: (flags.FloatParser(), "a number"),
}


def _field(config: ml_collections.ConfigDict, path: str):
    """The value of ``config``'s field at the dotted ``path`` (e.g. ``train.steps``)."""
    return functools.reduce(lambda node, key: node[key], filter(None, path.split(".")), config)


def check_override_value(config: ml_collections.ConfigDict, path: str, value: str) -> None:
    """Raises ConfigError unless ``--config.<path>=<value>`` parses as its field's type, e.g.
    ``train.steps=1e3`` (config_flags' message: ``invalid literal for int() with base 10``)."""
    section, _, name = path.rpartition(".")
    field = _field(config, path)
    declared = _field(config, section).get_type(name)  # a None placeholder's type too
    parser, kind = _OVERRIDE_PARSERS.get(declared, (None, None))
    if parser is None:
        return
    try:
        parser.parse(value)
    except ValueError:
        example = str(field).lower() if isinstance(field, bool) else field
        if field is None:  # printed as None at start, which no flag takes
            shown = f", or leave the flag out to keep {path} unset (None)"
        else:
            shown = f", e.g. --config.{path}={example}"
        raise ConfigError(f"--config.{path}={value!r} is not {kind}; write one{shown}.") from None


def check_config_flags(argv: Sequence[str]) -> None:
    """Loads the config ``--config=...`` in ``argv`` names and checks that every
    ``--config.<field>`` override names one of its fields, that its value parses as the
    field's type and that ``model.name`` keeps its preset; raises ConfigError where
    ``config_flags`` would print a traceback (a missing file, a bad ``:arg``, an unknown field)
    or Python's words for a value that does not parse, and that ``--config`` is given once
    (config_flags defined the overrides of each, an AttributeError traceback where the files'
    fields differ, else trained the last). Does nothing without the flag (absl reports a
    required one missing)."""
    specs, overrides = [], []
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--":  # absl parses no flags after it
            break
        flag, equals, value = arg.partition("=")
        if flag in ("-config", "--config"):
            specs.append(value if equals else (argv[i + 1] if i + 1 < len(argv) else None))
        elif match := re.fullmatch(r"--?(no)?config\.(.+)", flag):
            spaced = not equals and not match.group(1) and i + 1 < len(argv)
            following = argv[i + 1] if spaced else None  # absl's `--config.<field> <value>`
            overrides.append((match.group(2), value if equals else None, following))
    if len(specs) > 1:
        raise ConfigError(
            f"--config is given {len(specs)} times ({', '.join(map(str, specs))}); give one "
            "config file, and change its fields with --config.<field>=value."
        )
    if not specs or specs[0] is None:
        return
    config = load_config_file(specs[0])
    for path, value, following in overrides:
        check_override(config, path)
        if "[" in path:
            continue
        if value is None and following is not None and not isinstance(_field(config, path), bool):
            value = following  # not a switch, so absl takes the next argument as its value
        if value is not None:
            check_override_value(config, path, value)
        if path == "model.name" and value not in (None, config.model.name):
            raise ConfigError(
                f"--config.model.name={value} would only relabel the model section, which holds "
                f"{config.model.name}'s fields; start from {value}'s own file in configs/ "
                "instead (see jaxpt.models.names())."
            )


def parse_flags(program: str) -> Callable[[list[str]], list[str]]:
    """absl's flag parsing, for ``app.run(main, flags_parser=parse_flags("launch.py"))``: a bad
    flag, config file, config argument or config field ends the program with one sentence,
    ``<program>: ...``, and exit status 1, before anything else runs; so does one in a
    ``--flagfile``, which absl and config_flags read in its place."""

    def parse(argv: list[str]) -> list[str]:
        try:
            check_config_flags(read_flagfiles(argv))
            return flags.FLAGS(argv)
        except (ConfigError, flags.Error) as error:
            sys.exit(f"{program}: {sentence(error)}")

    return parse


def define_config_flag(program: str, help_text: str) -> None:
    """Defines ``--config`` (``config_flags.DEFINE_config_file``, locked), which reads every
    ``--flagfile`` of ``sys.argv`` as it is defined: one that cannot be read ends ``program``
    with one sentence (``read_flagfiles``), not absl's traceback."""
    try:
        config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)
    except flags.CantOpenFlagFileError as error:
        sys.exit(f"{program}: {_unreadable_flagfile(error)}")


def read_flagfiles(argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``--flagfile=<file>`` replaced by the flags the file holds (absl's
    reading, files named inside files included); raises ConfigError naming a file that cannot
    be read (missing, a directory, not readable)."""
    try:
        return flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    except flags.CantOpenFlagFileError as error:
        raise _unreadable_flagfile(error) from None


def _unreadable_flagfile(error: flags.CantOpenFlagFileError) -> ConfigError:
    """The sentence for absl's ``error``, from the ``OSError`` of its ``open`` (which names the
    file) where it has one."""
    opened = error.__context__
    what = (
        f"--flagfile={opened.filename} cannot be read ({opened.strerror})"
        if isinstance(opened, OSError)
        else first_line(error)
    )
    return ConfigError(f"{what}; name a file of flags, one --flag=value a line.")


def config_text(config: ml_collections.ConfigDict) -> str:
    """``config`` as a run prints it at start: one ``name: value`` line per field, sorted,
    sections indented under their name, each value as a ``--config.<field>=`` flag takes it
    (``('data', 'fsdp')``, a string bare, an empty one ``''``), but ``None``, an unset field
    such as ``train.b1``, which no flag takes (it is the flag left out). ConfigDict's own
    text (YAML) tags tuples ``!!python/tuple`` and shows a tuple shared by several fields
    once, the others as ``*id001``."""
    return "\n".join(_field_lines(config.to_dict(), indent=""))


def _field_lines(fields: dict, indent: str) -> list[str]:
    lines = []
    for name, value in sorted(fields.items()):
        if isinstance(value, dict):
            lines += [f"{indent}{name}:", *_field_lines(value, indent + "  ")]
        else:
            shown = value if isinstance(value, str) and value else repr(value)
            lines.append(f"{indent}{name}: {shown}")
    return lines


def check_writable_directory(path: str | os.PathLike, flag: str) -> None:
    """Raises ConfigError naming ``flag`` (e.g. ``"--workdir"``) unless ``path`` is, or can be
    made, a directory this process writes into. Creates nothing."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if not existing.exists():  # mkdir raised FileExistsError there, after the data was read
        raise ConfigError(
            f"{flag}={path} cannot be made: {existing} is a symbolic link to "
            f"{os.readlink(existing)}, which does not exist; create that directory or choose "
            f"another {flag}."
        )
    if not existing.is_dir():
        raise ConfigError(
            f"{flag}={path} cannot be a directory: {existing} is a file; choose another {flag}."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{flag}={path} is not writable ({existing} is read-only for this user); choose "
            f"another {flag} or change its permissions."
        )


def check_new_directory(path: str | os.PathLike, flag: str) -> None:
    """Raises ConfigError naming ``flag`` unless ``path`` is absent or an empty directory (and
    writable): the command writes into it and must not overwrite a user's files."""
    check_writable_directory(path, flag)
    path = Path(path)
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if held:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise ConfigError(
            f"{flag}={path} already holds files ({shown}), which this command does not "
            f"overwrite: choose a new or empty {flag}."
        )
