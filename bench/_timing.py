"""Timing jaxpt's train step the way ``launch.py`` runs it, for every bench."""

import functools
import math
import statistics
import time

import jax
import numpy as np

from jaxpt import data, models, sharding, train

TOKEN_SOURCES = ("random", "text")


@functools.cache
def _embedded_gpt2_tokens() -> np.ndarray:
    """The embedded corpus in GPT-2's BPE, int32 (encoded once per process)."""
    gpt2 = data.get_tokenizer("gpt2")
    return np.array(gpt2.encode(" ".join(data.embedded_documents())), np.int32)


def token_sampler(source: str, vocab: int, seed: int = 0):
    """``sample(batch, length) -> int32 (batch, length)`` tokens: ``random`` (uniform below
    ``min(vocab, 50257)``) or ``text`` (windows at random offsets of the embedded corpus in
    GPT-2's BPE: real prose, whose frequent tokens collide in the embedding's gradient)."""
    rng = np.random.default_rng(seed)
    if source == "random":
        return lambda batch, length: rng.integers(0, min(vocab, 50257), (batch, length), np.int32)
    corpus = _embedded_gpt2_tokens()

    def windows(batch: int, length: int):
        starts = rng.integers(0, len(corpus) - length, batch)
        return np.stack([corpus[s : s + length] for s in starts])

    return windows


def set_mesh(config, axes: list[str]) -> int:
    """Sets ``config.mesh`` to ``["data=2", "fsdp=2", ...]`` (unnamed axes 1; none: one
    device) and returns its device count, the first that many of ``jax.devices()``."""
    sizes = {axis: 1 for axis in sharding.MESH_AXES}
    for pair in axes:
        name, _, size = pair.partition("=")
        if name not in sizes or not size.isdigit() or int(size) < 1:
            raise SystemExit(
                f"--mesh={pair!r} is not AXIS=N with AXIS one of {', '.join(sizes)} and N >= 1; "
                "write e.g. --mesh=data=2,fsdp=2"
            )
        sizes[name] = int(size)
    config.mesh.update(sizes)
    return math.prod(sizes.values())


def set_model_fields(config, **fields) -> None:
    """Sets the model fields given a value; None keeps the preset's (and leaves out a field
    the preset's model has not: the bigram's table has no layers, attention or remat)."""
    config.model.update({name: value for name, value in fields.items() if value is not None})


def train_step(config, extra_compiler_options=None):
    """``(model config, fresh state, jitted step, mesh)`` as ``launch.py`` builds them for the
    run config ``config`` on its mesh (``set_mesh``) over the first devices: the state sharded
    by the mesh rules, donated, the same compiler options plus ``extra_compiler_options``, no
    gradient accumulation (``config.train.grad_accum_steps`` is set to 1). Trace the step
    (its first call, or ``lower``) inside ``tracing(config, mesh)``."""
    config.train.grad_accum_steps = 1
    cfg = models.config_from(config.model)
    sizes = [config.mesh[axis] for axis in sharding.MESH_AXES]  # -1: every device
    devices = jax.devices() if -1 in sizes else jax.devices()[: math.prod(sizes)]
    if -1 not in sizes and len(devices) < math.prod(sizes):
        raise SystemExit(
            f"the mesh {dict(zip(sharding.MESH_AXES, sizes, strict=True))} needs "
            f"{math.prod(sizes)} devices but this machine has {len(devices)}; use a smaller --mesh"
        )
    mesh = sharding.make_mesh(config.mesh, devices)
    abstract, shardings = train.abstract_state(config, mesh)
    tx = train.optimizer(config.train, abstract.params)
    init = jax.jit(lambda k: train.init_state(k, cfg, tx), out_shardings=shardings)
    batch = sharding.batch_sharding(mesh, config.mesh.rules)
    step = jax.jit(
        train.make_train_step(config, tx),
        in_shardings=(shardings, batch, batch),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options={**train.STEP_COMPILER_OPTIONS, **(extra_compiler_options or {})},
    )
    return cfg, init(jax.random.key(0)), step, mesh


def tracing(config, mesh):
    """The context a sharded step is traced in (the layers' activation shardings)."""
    return sharding.activation_sharding(mesh, config.mesh.rules)


def time_train_step(
    config, *, warmup: int, steps: int, extra_compiler_options=None, tokens: str = "random"
) -> dict:
    """Median seconds of one train step of the run config ``config`` on ``tokens``
    (``token_sampler``'s source).

    The step ``launch.py`` runs (``train_step``: on ``config.mesh``, donated state, the same
    compiler options), global batch ``config.train.batch_size`` x ``config.model.block_size``,
    no accumulation; ``warmup`` untimed steps (compilation included), then ``steps`` timed
    ones, each waited for. MFU counts the active parameters (``flops_per_token``) against the
    peak of every device of the mesh.
    """
    cfg, state, step, mesh = train_step(config, extra_compiler_options)
    batch, seq = config.train.batch_size, cfg.block_size
    sample = token_sampler(tokens, cfg.vocab_size)
    times = []
    with tracing(config, mesh):
        for i in range(warmup + steps):
            window = sample(batch, seq + 1)
            start = time.perf_counter()
            state, metrics = step(state, window[:, :-1], window[:, 1:])
            jax.block_until_ready(metrics["loss"])
            if i >= warmup:
                times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tokens_per_s = batch * seq / median
    flops = cfg.flops_per_token * tokens_per_s
    peak = train.peak_flops(jax.devices()[0].device_kind)
    return dict(
        batch=batch,
        seq=seq,
        devices=mesh.size,
        median_step_s=median,
        min_step_s=min(times),
        tokens_per_s=tokens_per_s,
        model_flops_per_s=flops,
        mfu=None if peak is None else flops / (peak * mesh.size),
        final_loss=float(metrics["loss"]),
    )


def typed_pairs(pairs: list[str]) -> dict:
    """``["name=value", ...]`` -> ``{name: value}``, ``true``/``false`` and integers typed: XLA
    debug options (``xla_gpu_enable_cublaslt=true``, the dict ``jax.jit(compiler_options=...)``
    takes) or config fields (``n_layer=48``)."""
    return {name: _typed(value) for name, value in (pair.split("=", 1) for pair in pairs)}


def _typed(value: str) -> bool | int | str:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return int(value) if value.lstrip("-").isdigit() else value
