"""Timing jaxpt's train step the way ``launch.py`` runs it, for every bench."""

import statistics
import time

import jax
import numpy as np

from jaxpt import models, train


def train_step(config, extra_compiler_options=None):
    """``(model config, fresh state, jitted step)`` as ``launch.py`` builds them for the run
    config ``config`` on one device (donated state, the same compiler options plus
    ``extra_compiler_options``), with no gradient accumulation
    (``config.train.grad_accum_steps`` is set to 1)."""
    config.train.grad_accum_steps = 1
    cfg = models.config_from(config.model)
    model = models.get(cfg.name)
    abstract_params = jax.eval_shape(lambda k: model.init(k, cfg), jax.random.key(0))
    tx = train.optimizer(config.train, abstract_params)
    state = jax.jit(lambda k: train.init_state(k, cfg, tx))(jax.random.key(0))
    step = jax.jit(
        train.make_train_step(config, tx),
        donate_argnums=0,
        compiler_options={**train.STEP_COMPILER_OPTIONS, **(extra_compiler_options or {})},
    )
    return cfg, state, step


def time_train_step(config, *, warmup: int, steps: int, extra_compiler_options=None) -> dict:
    """Median seconds of one train step of the run config ``config`` on random tokens.

    The step ``launch.py`` runs (``train.make_train_step``, donated state, the same compiler
    options), micro-batch ``config.train.batch_size`` x ``config.model.block_size``, no
    accumulation; ``warmup`` untimed steps (compilation included), then ``steps`` timed
    ones, each waited for. MFU counts the active parameters (``flops_per_token``).
    """
    cfg, state, step = train_step(config, extra_compiler_options)
    batch, seq = config.train.batch_size, cfg.block_size
    rng = np.random.default_rng(0)
    times = []
    for i in range(warmup + steps):
        tokens = rng.integers(0, min(cfg.vocab_size, 50257), (batch, seq + 1), dtype=np.int32)
        start = time.perf_counter()
        state, metrics = step(state, tokens[:, :-1], tokens[:, 1:])
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
        median_step_s=median,
        min_step_s=min(times),
        tokens_per_s=tokens_per_s,
        model_flops_per_s=flops,
        mfu=None if peak is None else flops / peak,
        final_loss=float(metrics["loss"]),
    )


def compiler_options(pairs: list[str]) -> dict:
    """``["name=value", ...]`` (XLA debug options, e.g. ``xla_gpu_enable_cublaslt=true``) ->
    the dict ``jax.jit(compiler_options=...)`` takes, ``true``/``false`` and integers typed."""
    return {name: _typed(value) for name, value in (pair.split("=", 1) for pair in pairs)}


def _typed(value: str) -> bool | int | str:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return int(value) if value.lstrip("-").isdigit() else value
