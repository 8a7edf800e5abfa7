"""Run configs: the sections every preset shares, the ``:arg`` parser and the smoke shrink.

A preset file ``configs/<name>.py`` is ``get_config(arg) -> preset_config("<name>", arg)``
plus its own overrides. Sections: ``model`` (exactly what ``init``/``apply`` take), ``data``,
``train``, ``mesh``, ``checkpoint``, ``eval``, ``log``.
"""

from __future__ import annotations

import ml_collections

from jaxpt import models, sharding


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses a config argument such as ``"smoke"`` or ``"smoke,steps=50"``.

    Bare words set a boolean default to True; ``key=value`` takes the type of the default.
    Unknown keys raise ValueError.
    """
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"Config argument {key!r} is not one of {sorted(defaults)}.")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"Config argument {key!r} needs a value: {key}=...")
            parsed[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false"):
                raise ValueError(f"Config argument {key}={value!r} must be true or false.")
            parsed[key] = value.lower() == "true"
        else:
            parsed[key] = type(default)(value)
    return parsed


def base_config(model_name: str) -> ml_collections.ConfigDict:
    """Every section with its defaults, the model section from the registry preset."""
    config = ml_collections.ConfigDict()
    config.model = models.get(model_name).default_config().to_dict()
    # An HF checkpoint directory or hub name a run starts from when its workdir has no
    # checkpoint yet (see jaxpt.hf); "" for none. A run setting: models.config_from skips it.
    config.model.init_from = ""

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "HuggingFaceFW/fineweb-edu"  # HF name, local path or "embedded"
    config.data.tokenizer = "gpt2"  # gpt2 | char | a directory with tokenizer.json

    config.train = ml_collections.ConfigDict()
    config.train.steps = 19073  # ~10B tokens at 512 x 1024 tokens per step
    config.train.batch_size = 512  # global, in sequences of model.block_size tokens
    config.train.grad_accum_steps = 1  # micro-batches per step; must divide batch_size
    config.train.lr = 6e-4  # peak learning rate
    config.train.min_lr_ratio = 0.1  # final lr = lr * min_lr_ratio
    config.train.warmup_steps = 715
    config.train.schedule = "cosine"  # cosine | wsd (warmup-stable-decay)
    config.train.decay_fraction = 0.2  # wsd: the last fraction of steps decays linearly
    config.train.weight_decay = 0.1
    config.train.b1 = 0.9
    config.train.b2 = 0.95
    config.train.eps = 1e-8
    config.train.decay_embeddings = False  # weight decay on embedding tables too
    config.train.grad_clip = 1.0  # global-norm clip
    config.train.on_nonfinite = "stop"  # non-finite loss: stop | skip (the update)
    config.train.seed = 0
    config.train.load_balance_loss_coeff = 0.0  # times aux["load_balance_loss"] (MoE)
    config.train.z_loss_coeff = 0.0  # times aux["z_loss"] (MoE router z-loss)

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1: all devices left over
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    config.mesh.expert = 1
    config.mesh.rules = sharding.default_rules()  # logical axis name -> mesh axes

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.keep = 3

    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 250
    config.eval.batches = 20  # validation batches per evaluation

    config.log = ml_collections.ConfigDict()
    config.log.every_steps = 10
    return config


def shrink_for_smoke(config: ml_collections.ConfigDict) -> None:
    """Makes ``config`` a tiny CPU run on the embedded corpus (about a minute on a laptop).

    The model keeps its architecture (pattern, head ratio, norms, positions) at width <= 128,
    block 64 and one or two repeats of its mixer pattern.
    """
    model = config.model
    preset = models.config_from(model)
    model.block_size = 64
    model.dtype = "float32"
    if isinstance(preset, models.ModelConfig):
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
