"""Training: optimizer, gradient accumulation, the loop, checkpoints and exact resume."""

import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpt import data, evals, memory, models, nn, sharding, train
from jaxpt.config import preset_config
from jaxpt.errors import ConfigError, DataError
from jaxpt.train import _loop, _metrics
from jaxpt.train import _memory as train_memory

from .conftest import (
    FAST_COMPILE,
    interrupt_while_importing,
    run_in_repo,
    shared_book,
    use_devices,
)

ROOT = Path(__file__).resolve().parents[1]


def char_config(preset="gpt", **train_overrides):
    """A smoke config on the character-level embedded corpus (small vocab: fast)."""
    config = preset_config(preset, "smoke")
    config.data.tokenizer = "char"
    config.model.vocab_size = 128
    config.train.batch_size = 8
    config.log.every_steps = 1
    config.train.update(train_overrides)
    return config


def test_decay_mask_spares_norms_biases_and_embeddings():
    cfg = models.config_from(char_config().model)
    params = jax.eval_shape(lambda k: models.get("gpt").init(k, cfg), jax.random.key(0))
    mask = train.decay_mask(params, decay_embeddings=False)
    block = mask.blocks[0]
    assert block.attn.q.weight and block.mixer.fc.weight and block.mixer.proj.weight
    assert not block.attn.q.bias and not block.ln_1.scale and not block.ln_1.bias
    assert not mask.wte.weight and not mask.wpe.weight and not mask.ln_f.scale
    assert train.decay_mask(params, decay_embeddings=True).wte.weight


def test_decay_mask_spares_expert_biases():
    """An expert's bias is ``(E, F)``: a vector per expert, not a matrix."""
    cfg = models.config_from(char_config("tiny_moe").model)
    params = jax.eval_shape(lambda k: models.get("tiny_moe").init(k, cfg), jax.random.key(0))
    experts = train.decay_mask(params, decay_embeddings=False).blocks[0].mixer.experts
    assert experts.up.weight and experts.gate.weight and experts.down.weight
    assert not experts.up.bias and not experts.gate.bias and not experts.down.bias


def weights_of(params, kinds: tuple):
    """True for the ``weight`` of each layer of ``kinds`` in ``params``, False elsewhere."""
    is_weight = lambda layer, array, names: isinstance(layer, kinds) and array is layer.weight
    return nn.map_params(is_weight, params)


@pytest.mark.parametrize("name", models.names())
def test_weight_decay_takes_exactly_the_weights_of_linear_layers(name):
    """Over each registry model's whole param tree at full size: decayed are the weights of
    linear layers (attention, MLP, router, Soft MoE's phi, each layer's and expert's), not
    norms, biases (an expert's neither) nor, unless ``decay_embeddings``, embedding and
    read-out tables; Muon, which decays every array it trains, trains none of the others."""
    from jaxpt.train import _optimizer

    cfg = models.get(name).default_config()
    params = jax.eval_shape(lambda k: models.get(name).init(k, cfg), jax.random.key(0))
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree.leaves_with_path(params)]
    by_path = lambda tree: dict(zip(paths, jax.tree.leaves(tree), strict=True))
    linear = (nn.Linear, nn.ExpertLinear)
    mask = by_path(train.decay_mask(params, decay_embeddings=False))
    assert mask == by_path(weights_of(params, linear))
    with_tables = train.decay_mask(params, decay_embeddings=True)
    assert by_path(with_tables) == by_path(weights_of(params, (*linear, nn.Embedding, nn.ReadOut)))
    muon = by_path(_optimizer._muon_matrices(params))
    assert [path for path in paths if muon[path] and not mask[path]] == []


@pytest.mark.parametrize(
    "schedule, after_warmup",
    [
        ("cosine", {55: 0.1 + 0.9 * 0.5, 100: 0.1}),  # half way down at 55
        ("wsd", {50: 1.0, 80: 1.0, 90: 0.55, 100: 0.1}),
        ("inverse_sqrt", {40: 0.5, 90: 1 / 3, 1000: 0.1}),  # sqrt(10 / step), floor 0.1
    ],
)
def test_learning_rate_schedules(schedule, after_warmup):
    # decay_fraction unset: wsd decays over the last 0.2
    cfg = char_config(schedule=schedule, steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1).train
    lr = train.learning_rate(cfg)
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 0.5, 1.0], atol=1e-6)
    for step, want in after_warmup.items():
        np.testing.assert_allclose(lr(step), want, atol=1e-6, err_msg=f"step {step}")


@pytest.mark.parametrize("steps, decay_fraction", [(10, 0.9), (10, 0.8), (25, 0.56), (17, 0.2)])
def test_wsd_decays_over_the_last_decay_fraction_of_the_steps(steps, decay_fraction):
    """Over ``ceil(steps * decay_fraction)`` steps (4 of 17 at 0.2), also where the product
    is a whole number that floats miss (10 * (1 - 0.9) is 0.99999...)."""
    lr = train.learning_rate(
        char_config(
            schedule="wsd",
            steps=steps,
            warmup_steps=0,
            lr=1.0,
            min_lr_ratio=0.0,
            decay_fraction=decay_fraction,
        ).train
    )
    n = math.ceil(Fraction(steps) * Fraction(str(decay_fraction)))
    want = [min(1.0, (steps - s) / n) for s in range(steps + 1)]
    np.testing.assert_allclose([lr(s) for s in range(steps + 1)], want, atol=1e-6)


@functools.cache
def tiny_run(preset: str):
    """A one-layer smoke config of ``preset`` with dropout (and router noise for a MoE) on,
    and its initial params."""
    config = char_config(preset, warmup_steps=1)
    config.model.update(n_layer=1, block_size=16, dropout=0.1)
    if "moe" in config.model.mixer:
        config.model.router_noise = 0.01
    cfg = models.config_from(config.model)
    return config, models.get(preset).init(jax.random.key(0), cfg)


@pytest.mark.parametrize(
    "preset, optimizer",
    [
        ("tiny_moe_2", "adamw"),
        ("gpt", "adam"),
        ("gpt", "adafactor"),
        ("gpt", "lion"),
        ("tiny_moe_2", "muon"),  # Muon on the attention and the stacked expert matrices
    ],
)
def test_each_optimizer_lowers_the_loss_and_resumes_exactly(preset, optimizer, tmp_path):
    """Four steps straight, and two steps, a checkpoint, a restore and two more, with dropout
    (and router noise) on: the same state bit for bit."""
    config, params = tiny_run(preset)
    config = config.copy_and_resolve_references()
    config.train.optimizer = optimizer
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    abstract, shardings = train.abstract_state(config, mesh)
    tx = train.optimizer(config.train, abstract.params)
    state = jax.device_put(train.start_state(params, tx), shardings)
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 128)
    step = jax.jit(train.make_train_step(config, tx))
    losses = []
    for _ in range(4):
        state, metrics = step(state, tokens[:, :-1], tokens[:, 1:])
        losses.append(float(metrics["loss"]))
        if int(state.step) == 2:
            checkpoints = train.Checkpoints(tmp_path, keep=1)
            checkpoints.save(2, state, {}, config)
            checkpoints.wait()
    assert losses[-1] < losses[0], losses
    _, resumed, _ = checkpoints.restore_latest(abstract, shardings, config)
    checkpoints.close()
    for _ in range(2):
        resumed, _ = step(resumed, tokens[:, :-1], tokens[:, 1:])
    jax.tree.map(np.testing.assert_array_equal, resumed, state)


def test_a_resumed_run_says_which_update_settings_changed(tmp_path, capsys):
    """A Lion checkpoint of before Lion's own default (it took AdamW's b2 0.95, stored in its
    config) resumed with b2 unset went on at 0.99 without a word; so did one resumed with
    another learning rate, or with a decay fraction it had left unset."""
    config = char_config(optimizer="lion", steps=2, warmup_steps=0, b2=0.95)
    config.eval.batches = 1
    train.train(config, tmp_path)
    for change, note in [
        (dict(b2=0.95), None),
        (dict(b2=None), "train.b2=0.99 (checkpoint 3: 0.95); pass --config.train.b2=0.95"),
        (
            dict(lr=1e-3, schedule="wsd", decay_fraction=0.5),
            "train.lr=0.001 (checkpoint 4: 0.003), train.schedule=wsd (checkpoint 4: cosine), "
            "train.decay_fraction=0.5 (checkpoint 4: unset); pass --config.train.lr=0.003 "
            "--config.train.schedule=cosine and leave --config.train.decay_fraction out",
        ),
    ]:
        config.train.update(steps=config.train.steps + 1, **change)
        capsys.readouterr()
        train.train(config, tmp_path)
        notes = [line for line in capsys.readouterr().out.splitlines() if "note:" in line]
        expected = f"note: this run goes on with {note} to train on as before"
        assert notes == ([] if note is None else [expected])


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "lion", "muon"])
def test_decoupled_weight_decay_is_lr_times_weight_decay(optimizer):
    """With zero gradients a step shrinks each decayed matrix by ``1 - lr * weight_decay``, as
    AdamW does, and leaves the rest alone."""
    config = char_config(optimizer=optimizer, warmup_steps=0, lr=1e-2, weight_decay=0.1)
    config.model.n_layer = 1
    cfg = models.config_from(config.model)
    params = models.get("gpt").init(jax.random.key(0), cfg)
    tx = train.optimizer(config.train, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    old, new = params.blocks[0], new.blocks[0]
    np.testing.assert_allclose(new.mixer.fc.weight, old.mixer.fc.weight * (1 - 1e-3), rtol=1e-6)
    np.testing.assert_array_equal(new.ln_1.scale, old.ln_1.scale)


@pytest.mark.parametrize(
    "device_kind, tflops",  # jax's device_kind strings and the datasheets' dense bf16 peaks
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),  # was the SXM's 989.4: MFU 0.76 times the true one
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-40GB", 312),
        ("TPU v4", 275),
        ("TPU v5 lite", 197),  # v5e
        ("TPU v5", 459),  # v5p: was None, so a v5p run reported no MFU
        ("TPU v6 lite", 918),  # v6e
        ("cpu", None),
    ],
)
def test_peak_flops_by_device_kind(device_kind, tflops):
    peak = train.peak_flops(device_kind)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))


def reference_steps(optimizer: str, t, params: list, grads: list, arrays: list) -> list:
    """A float64 numpy re-implementation of ``len(grads)`` steps of ``train.optimizer`` with
    the train config ``t`` (schedule, global-norm clipping, ``b1``, ``b2``, ``eps``, decoupled
    or L2 decay) on lists of arrays; ``arrays[i]`` is ``(decayed, muon, n_stacked)`` of array
    ``i``, whose ``n_stacked`` leading axes are layers, each its own matrix (Muon's
    orthogonalisation, Adafactor's RMS)."""
    p = [np.asarray(x, np.float64) for x in params]
    m, v = [np.zeros_like(x) for x in p], [np.zeros_like(x) for x in p]
    for k, g in enumerate(grads, start=1):
        norm = math.sqrt(sum(np.sum(np.square(x)) for x in g))
        g = [x * min(1.0, t.grad_clip / norm) if t.grad_clip else x for x in g]
        lr = float(train.learning_rate(t)(k - 1))
        for i, (decayed, muon, n_stacked) in enumerate(arrays):
            x, gi = p[i], g[i]
            decay = t.weight_decay * decayed * x
            if optimizer == "adam":  # L2: the decay joins the gradient
                gi, decay = gi + decay, 0.0
            if optimizer in ("adam", "adamw") or (optimizer == "muon" and not muon):
                m[i] = t.b1 * m[i] + (1 - t.b1) * gi
                v[i] = t.b2 * v[i] + (1 - t.b2) * gi**2
                u = m[i] / (1 - t.b1**k) / (np.sqrt(v[i] / (1 - t.b2**k)) + t.eps)
            elif optimizer == "lion":
                u = np.sign(t.b1 * m[i] + (1 - t.b1) * gi)
                m[i] = t.b2 * m[i] + (1 - t.b2) * gi
            elif optimizer == "adafactor":  # optax's defaults; no dimension reaches 128: unfactored
                rate = 1 - k**-0.8
                v[i] = rate * v[i] + (1 - rate) * (gi**2 + 1e-30)
                u = layers(gi / np.sqrt(v[i]), n_stacked)
                u = u / np.maximum(1.0, rms(u)) * np.maximum(rms(layers(x, n_stacked)), 1e-3)
            else:  # Muon: Nesterov momentum 0.95, orthogonalised, scaled to AdamW's RMS
                m[i] = 0.95 * m[i] + 0.05 * gi
                nesterov = 0.95 * m[i] / (1 - 0.95 ** (k + 1)) + 0.05 * gi / (1 - 0.95**k)
                u = np.stack([newton_schulz(a) for a in layers(nesterov, n_stacked)])
                u = u * math.sqrt(max(x.shape[-2:])) * 0.2
            p[i] = x - lr * (u.reshape(x.shape) + decay)
    return p


def layers(x, n_stacked: int):
    """``(L..., ...)`` -> ``(prod(L...), ...)``: one row per layer of ``n_stacked`` axes."""
    return x.reshape(-1, *x.shape[n_stacked:])


def rms(x):
    """``(L, ...)`` -> ``(L, 1, ...)``: each layer's root mean square."""
    return np.sqrt(np.mean(np.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))


def newton_schulz(x):
    """Muon's five quintic Newton-Schulz iterations on one matrix (Jordan et al., 2024)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = x if x.shape[0] <= x.shape[1] else x.T
    wide = wide / (np.linalg.norm(wide) + 1e-8)
    for _ in range(5):
        gram = wide @ wide.T
        wide = a * wide + (b * gram + c * gram @ gram) @ wide
    return wide if x.shape[0] <= x.shape[1] else wide.T


# b1, b2 and eps as each optimizer's authors (and optax) define them, or for AdamW as GPT-2
# trained; what a run that leaves them unset must use. Adafactor reads none of them.
PUBLISHED = {
    "adamw": dict(b1=0.9, b2=0.95, eps=1e-8),
    "adam": dict(b1=0.9, b2=0.95, eps=1e-8),
    "adafactor": {},
    "lion": dict(b1=0.9, b2=0.99),  # Chen et al., 2023; optax.lion's defaults
    "muon": dict(b1=0.9, b2=0.95, eps=1e-8),  # its AdamW part's
}


@pytest.mark.parametrize("unset", [False, True], ids=["set", "defaults"])
@pytest.mark.parametrize("optimizer", list(train.OPTIMIZERS))
def test_each_optimizer_matches_a_float64_reference(optimizer, unset):
    """Four steps on random gradients of a two-layer GPT's params, whose layers differ in
    scale, against ``reference_steps``: the warmup's first step (lr 0), the cosine, clipping,
    non-default ``b1``, ``b2`` and ``eps`` (those the optimizer reads) or, left unset, the
    published ones (Lion's b2 was AdamW's 0.95), the decay mask. Adafactor clipped and scaled a
    stacked array by the RMS of all its layers together, not by each layer's."""
    config = char_config(optimizer=optimizer, steps=4, warmup_steps=2, lr=0.1, grad_clip=1.0)
    config.train.update(weight_decay=0.1, min_lr_ratio=0.1)
    chosen = {k: v for k, v in dict(b1=0.8, b2=0.9, eps=1e-3).items() if k in PUBLISHED[optimizer]}
    config.train.update({} if unset else chosen)
    reference = config.train.copy_and_resolve_references()
    reference.update(PUBLISHED[optimizer] if unset else {})
    config.model.update(n_layer=2, n_embed=8, n_head=2, n_kv_head=2, n_mlp_hidden=16)
    params = models.get("gpt").init(jax.random.key(0), models.config_from(config.model))
    n_stacked = nn.map_params(lambda layer, array, names: array.ndim - len(names), params)
    layer_scales = lambda x, n: 4.0 ** np.arange(x.shape[0] if n else 1)  # layer i: 4 ** i
    params = jax.tree.map(
        lambda x, n: x * layer_scales(x, n).reshape(-1, *[1] * (x.ndim - 1)), params, n_stacked
    )
    is_weight = lambda layer, array, names: isinstance(layer, nn.Linear) and array is layer.weight
    muon = nn.map_params(is_weight, params)
    decayed = train.decay_mask(params, decay_embeddings=False)
    rng = np.random.default_rng(0)
    leaves, treedef = jax.tree.flatten(params)
    grads = [[rng.normal(size=x.shape) * 0.3 for x in leaves] for _ in range(4)]
    tx = train.optimizer(config.train, params)
    state, new, update = tx.init(params), params, jax.jit(tx.update)
    for g in grads:
        updates, state = update(jax.tree.unflatten(treedef, list(map(jnp.float32, g))), state, new)
        new = optax.apply_updates(new, updates)
    arrays = list(zip(*map(jax.tree.leaves, (decayed, muon, n_stacked)), strict=True))
    want = reference_steps(optimizer, reference, leaves, grads, arrays)
    for got, expected in zip(jax.tree.leaves(new), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "shape, n_sliced",  # n_sliced: leading layer (and expert) axes
    [
        ((130, 8, 160), 1),  # a layer's (8, 160) is not factored; optax factored (L, 160)
        ((130, 160), 1),  # stacked biases: a vector is never factored; optax factored them
        ((2, 130, 160), 2),  # an expert's bias of 130 experts: optax factored (E, F)
        ((3, 256, 130), 1),  # each layer factored, as optax factors the stack
        ((2, 3, 130, 140), 2),  # each expert factored, as optax factors the stack
        ((3, 8, 16), 1),  # nothing factored
    ],
)
def test_adafactor_factors_each_layer_and_expert_as_its_own_param(shape, n_sliced):
    """Three steps of Adafactor's factored second-moment scaling on a stacked array against
    ``optax.scale_by_factored_rms`` on each slice alone, in a python loop. optax chose the
    factored dims from the whole stack's shape: over the layer or expert axis once it has 128
    or more, where a slice alone is not factored (or not over it)."""
    from jaxpt.train import _optimizer

    rng = np.random.default_rng(0)
    scales = rng.lognormal(size=shape[-1])  # columns of different sizes: factoring shows
    grads = [jnp.asarray(rng.normal(size=shape) * scales, jnp.float32) for _ in range(3)]
    param = jnp.zeros(shape)
    tx = _optimizer._factored_rms_per_slice(n_sliced)
    state, update = tx.init(param), jax.jit(tx.update)
    reference = optax.scale_by_factored_rms()
    reference_update = jax.jit(reference.update)
    slices = list(np.ndindex(shape[:n_sliced]))
    reference_states = [reference.init(param[i]) for i in slices]
    for g in grads:
        got, state = update(g, state, param)
        want = []
        for k, i in enumerate(slices):
            slice_update, reference_states[k] = reference_update(
                g[i], reference_states[k], param[i]
            )
            want.append(slice_update)
        np.testing.assert_allclose(got, np.reshape(want, shape), rtol=1e-5)
    assert int(state.count) == 3


@pytest.mark.parametrize("preset", ["gpt", "tiny_moe"])
def test_adafactor_state_keeps_optaxs_shapes_where_it_factored_each_layer(preset):
    """At a preset's full size (fewer than 128 layers and experts) optax factored each layer's
    and expert's matrices and nothing else: the state's tree and shapes are
    ``optax.scale_by_factored_rms``'s on the stacked params, so checkpoints resume."""
    config = preset_config(preset, None)
    config.train.optimizer = "adafactor"
    cfg = models.config_from(config.model)
    params = jax.eval_shape(lambda k: models.get(preset).init(k, cfg), jax.random.key(0))
    state = jax.eval_shape(train.optimizer(config.train, params).init, params)
    is_factored = lambda x: isinstance(x, optax.FactoredState)
    (factored,) = [x for x in jax.tree.leaves(state, is_leaf=is_factored) if is_factored(x)]
    want = jax.eval_shape(optax.scale_by_factored_rms().init, params)
    assert jax.tree.structure(factored) == jax.tree.structure(want)
    assert jax.tree.leaves(jax.tree.map(jnp.shape, factored)) == jax.tree.leaves(
        jax.tree.map(jnp.shape, want)
    )
    assert any(len(x.shape) >= 2 for x in jax.tree.leaves(want.v_row))  # some were factored


def test_adafactor_on_130_stacked_layers_is_optax_adafactor_on_each_layer():
    """Two steps of ``train.optimizer``'s Adafactor (no clipping, no decay) on a 130-layer
    GPT against ``optax.adafactor`` on each layer's arrays alone and the unstacked ones: optax
    factored the stacked ``(130, 8, 160)`` MLP weights and ``(130, 160)`` biases over the
    layers, where one layer's are not factored."""
    config = char_config(optimizer="adafactor", warmup_steps=0, lr=0.1, grad_clip=0.0)
    config.train.weight_decay = 0.0
    config.model.update(n_layer=130, n_embed=8, n_head=2, n_kv_head=2, n_mlp_hidden=160)
    cfg = models.config_from(config.model)
    rng = np.random.default_rng(0)
    random_like = lambda x: rng.normal(size=x.shape).astype(np.float32)
    params = jax.eval_shape(lambda k: models.get("gpt").init(k, cfg), jax.random.key(0))
    params = jax.tree.map(random_like, params)
    grads = [jax.tree.map(random_like, params) for _ in "ab"]
    tx = train.optimizer(config.train, params)
    state, new, update = tx.init(params), params, jax.jit(tx.update)
    for g in grads:
        updates, state = update(g, state, new)
        new = optax.apply_updates(new, updates)
    n_stacked = jax.tree.leaves(
        nn.map_params(lambda layer, array, names: array.ndim - len(names), params)
    )

    def groups(tree):  # the unstacked arrays, then each layer's
        arrays = list(zip(map(np.asarray, jax.tree.leaves(tree)), n_stacked, strict=True))
        layer = lambda i: [x[i] for x, n in arrays if n]
        return [[x for x, n in arrays if not n]] + [layer(i) for i in range(130)]

    reference = optax.adafactor(train.learning_rate(config.train))

    @jax.jit
    def reference_step(group, grad, state):
        updates, state = reference.update(grad, state, group)
        return optax.apply_updates(group, updates), state

    want = groups(params)
    states = list(map(jax.jit(reference.init), want))
    for g in grads:
        for k, grad in enumerate(groups(g)):
            want[k], states[k] = reference_step(want[k], grad, states[k])
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7)
    jax.tree.map(close, groups(new), want)


def keep_gradients() -> optax.GradientTransformation:
    """An optimizer whose state is the last gradient it was given (at lr 1 of a schedule, which
    the train step reads for its ``lr``): the step's gradient, read exactly."""
    keep = optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda updates, state, params=None: (updates, updates),
    )
    return optax.chain(optax.scale_by_schedule(lambda count: 1.0), keep)


@pytest.mark.parametrize("masked", [False, True], ids=["text", "chat"])
def test_gradient_accumulation_equals_one_big_step(masked):
    """The gradient of a step over 4 micro-batches is, element by element, the whole batch's
    (``jax.grad`` of its loss, within 1e-6 of the largest gradient: float32 sums in another
    order), and so are its loss and grad_norm; on chat data the loss is the mean over every
    masked target of the batch, whose micro-batches hold 20, 0, 0 and 9 of them. (A first
    AdamW step after the preset's warmup start at lr 0 left the params equal whatever the
    gradient, which is what this test compared before.)"""
    config = char_config(batch_size=8)
    config.model.update(n_layer=1, block_size=16)
    cfg = models.config_from(config.model)
    params = models.get("gpt").init(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 128)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = np.zeros((8, 16), np.int32)
    mask[0, 2:], mask[4, 10:], mask[3, 7], mask[7, 8:] = 1, 1, 1, 1  # micro-batch i: rows i, i + 4
    batch = (inputs, targets) + ((jnp.asarray(mask),) if masked else ())
    loss_mask = jnp.asarray(mask) if masked else None
    loss = lambda p: train.loss_fn(p, inputs, targets, cfg, loss_mask=loss_mask)
    (want_loss, _), want = jax.value_and_grad(loss, has_aux=True)(params)
    config.train.grad_accum_steps = 4
    tx = keep_gradients()
    state, metrics = jax.jit(train.make_train_step(config, tx))(
        train.start_state(params, tx), *batch
    )
    got = state.opt_state[1]
    largest = max(np.abs(g).max() for g in jax.tree.leaves(want))
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6 * largest)
    jax.tree.map(close, got, want)
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(want), rtol=1e-6)


def test_the_loss_follows_model_kernels():
    """``model.kernels="pallas"`` (interpreted here) takes the loss's kernel: the same loss and
    gradients as XLA's, for the bigram's config class too."""
    config = char_config("bigram")
    config.model.block_size = 16
    cfg = models.config_from(config.model)
    params = models.get("bigram").init(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 128)

    def loss_and_grads(kernels):
        loss = functools.partial(train.loss_fn, cfg=dataclasses.replace(cfg, kernels=kernels))
        return jax.value_and_grad(lambda p: loss(p, tokens[:, :-1], tokens[:, 1:])[0])

    assert "pallas_call" in str(jax.make_jaxpr(loss_and_grads("pallas"))(params))
    (loss, grads), (want_loss, want_grads) = (
        jax.jit(loss_and_grads(kernels))(params) for kernels in ("pallas", "xla")
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, want_grads)


def test_training_keys_differ_by_seed_step_and_micro_batch():
    keys = [train.training_key(*args) for args in [(0, 3, 1), (1, 3, 1), (0, 4, 1), (0, 3, 0)]]
    assert len({tuple(np.asarray(jax.random.key_data(k))) for k in keys}) == 4


def test_non_finite_step_leaves_state_unchanged_and_the_logged_lr_is_the_applied_one():
    config = char_config(warmup_steps=4)
    cfg = models.config_from(config.model)
    tx = train.optimizer(
        config.train, jax.eval_shape(lambda k: models.get("gpt").init(k, cfg), jax.random.key(0))
    )
    state = train.init_state(jax.random.key(0), cfg, tx)
    poisoned = eqx.tree_at(
        lambda s: s.params.wte.weight, state, state.params.wte.weight.at[3, 0].set(jnp.nan)
    )
    tokens = jnp.full((8, 65), 3)
    step = jax.jit(train.make_train_step(config, tx))
    new, metrics = step(poisoned, tokens[:, :-1], tokens[:, 1:])
    assert not metrics["finite"]
    assert int(new.step) == 1
    jax.tree.map(np.testing.assert_array_equal, new.params, poisoned.params)
    jax.tree.map(np.testing.assert_array_equal, new.opt_state, poisoned.opt_state)
    # the optimizer's count lags the step by the skip: the logged lr was the schedule at the
    # step (0.25, 0.5 of the warmup below), not the lr the updates applied
    schedule = train.learning_rate(config.train)
    state = train.TrainState(new.step, state.params, new.opt_state)  # finite params again
    for updates_applied in range(2):
        state, metrics = step(state, tokens[:, :-1], tokens[:, 1:])
        assert metrics["finite"]
        np.testing.assert_allclose(metrics["lr"], schedule(updates_applied), rtol=1e-6)
    assert int(state.step) == 3


def tensorboard_events(directory: Path):
    """The ``Event`` protos of the event files under ``directory``, file after file in name
    order (TensorBoard's), read by their TFRecord framing (length, its CRC, the record, its
    CRC) and TensorBoard's protobuf ``Event``."""
    from tensorboardX.proto.event_pb2 import Event

    for path in sorted(directory.iterdir()):
        raw = path.read_bytes()
        while raw:
            (length,) = struct.unpack("<Q", raw[:8])
            yield Event.FromString(raw[12 : 12 + length])
            raw = raw[16 + length :]


def tensorboard_scalars(directory: Path, tag: str) -> dict[int, float]:
    """``step -> value`` of the scalar ``tag`` in the event files under ``directory``."""
    return {
        event.step: value.simple_value
        for event in tensorboard_events(directory)
        for value in event.summary.value
        if value.tag == tag
    }


def tensorboard_view(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value), ...]`` of the scalars under ``directory`` as TensorBoard's
    EventAccumulator keeps them (``purge_orphaned_data``, its default): in a run whose events
    are of ``file_version`` 2, each ``SessionLog.START`` after the run's first is a restart,
    which drops every value logged before it at its step or later."""
    from tensorboardX.proto.event_pb2 import SessionLog

    view, version_2, started = {}, False, False
    for event in tensorboard_events(directory):
        version_2 = version_2 or event.file_version == "brain.Event:2"
        if version_2 and event.session_log.status == SessionLog.START:
            if started:
                view = {
                    tag: [(step, v) for step, v in values if step < event.step]
                    for tag, values in view.items()
                }
            started = True
        for value in event.summary.value:
            view.setdefault(value.tag, []).append((event.step, value.simple_value))
    return view


def test_tensorboard_after_a_resume_holds_what_metrics_jsonl_keeps(tmp_path):
    """A run killed after logging steps past its last checkpoint (4), resumed there, logs
    those steps anew (other values here): metrics.jsonl drops the killed run's records of
    them, and TensorBoard, reading the old event file (left as it was) and the new one, shows
    the same scalars, one value per tag and step, train, validation and task alike."""
    workdir = tmp_path / "run"
    sizes = dict(total_steps=8, tokens_per_step=16, flops_per_token=1.0, print_every=100)

    def log_steps(first_step: int, last_step: int, offset: float) -> None:
        log = _metrics.MetricsLog(workdir, first_step=first_step, **sizes)
        for step in range(first_step + 1, last_step + 1):
            record = {"step": step, "loss": offset + step, "grad_norm": 1.0, "lr": 0.1}
            log.train_steps([record], time.perf_counter())
            if step % 3 == 0:
                log.eval(step, {"loss": offset - step})
                log.task(step, "hellaswag", {"acc": offset / step})
        log.close()

    workdir.mkdir()
    log_steps(0, 7, offset=10.0)  # killed after logging step 7; checkpoint 4
    killed_files = {p.name: p.read_bytes() for p in (workdir / "tensorboard").iterdir()}
    time.sleep(1.05 - time.time() % 1)  # an event file is named by the second it is opened in
    log_steps(4, 8, offset=20.0)
    for name, content in killed_files.items():
        assert (workdir / "tensorboard" / name).read_bytes() == content
    want = {}
    for record in train.read_metrics(workdir / "metrics.jsonl"):
        for key, value in record.items():
            group = next((g for g in ("val", "hellaswag") if key.startswith(g)), "train")
            if key != "step" and value is not None:
                want.setdefault(f"{group}/{key}", []).append((record["step"], value))
    view = tensorboard_view(workdir / "tensorboard")
    assert sorted(view) == sorted(want)
    for tag, values in want.items():
        assert [step for step, _ in view[tag]] == [step for step, _ in values], tag
        np.testing.assert_allclose([v for _, v in view[tag]], [v for _, v in values], rtol=1e-6)
    assert [step for step, _ in want["val/val_loss"]] == [3, 6]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_training_logs_to_tensorboard_without_importing_torch(tmp_path):
    """tensorboardX imports torch where it is installed, which took longer than jax's import at
    the start of every run; jaxpt logs floats, and keeps torch out."""
    code = (
        "import sys; from jaxpt.train import _metrics; "
        "_metrics._summary_writer(sys.argv[1], 0).close(); print('torch' in sys.modules)"
    )
    result = run_in_repo([sys.executable, "-c", code, str(tmp_path)])
    assert result.stdout.split() == ["False"], result.stderr
    assert list(tmp_path.iterdir())


def test_smoke_run_writes_metrics_plot_checkpoint_and_profile(tmp_path, capsys):
    config = char_config(steps=6, warmup_steps=4)
    config.checkpoint.every_steps = 3
    config.eval.every_steps = 3
    config.eval.batches = 2
    config.log.every_steps = 2  # log steps are fetched a step late
    config.log.profile_from_step, config.log.profile_steps = 2, 2
    train.train(config, tmp_path)
    records = train.read_metrics(tmp_path / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in steps)
    schedule = train.learning_rate(config.train)
    want = [schedule(s - 1) for s in range(1, 7)]  # warmup, then cosine: six different rates
    np.testing.assert_allclose([r["lr"] for r in steps], want, rtol=1e-6)
    assert len(list((tmp_path / "profile").rglob("perfetto_trace.json.gz"))) == 1
    assert (tmp_path / "loss.png").stat().st_size > 0
    logged = tensorboard_scalars(tmp_path / "tensorboard", "train/loss")
    np.testing.assert_allclose(list(logged.values()), [r["loss"] for r in steps], rtol=1e-6)
    assert list(logged) == [1, 2, 3, 4, 5, 6]
    assert sorted(
        int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()
    ) == [3, 6]
    config.train.steps = 7  # resumed at step 6, after profile_from_step: said, not traced
    train.train(config, tmp_path)
    assert "log.profile_from_step=2 is not after step 6" in capsys.readouterr().out
    assert len(list((tmp_path / "profile").rglob("perfetto_trace.json.gz"))) == 1


def test_a_profile_cut_short_names_the_steps_it_traced(tmp_path, capsys):
    """A run that ended (its last step, SIGTERM) inside the traced steps said it had traced
    every one of them: 'profile of steps 2-6' for a run of 3 steps."""
    config = char_config()
    config.log.profile_from_step, config.log.profile_steps = 2, 5
    profiler = _loop._StepProfiler(tmp_path, config.log, start_step=0)
    for step in (1, 2, 3):
        profiler.before(step)
        profiler.after(step, {})
    profiler.stop()
    assert capsys.readouterr().out == f"profile of steps 2-3 in {tmp_path / 'profile'}\n"


def test_evaluation_time_is_not_counted_in_the_next_steps_throughput(tmp_path, monkeypatch):
    """``tokens_per_s`` (and MFU) is a training step's: the steps logged after a validation
    (or HellaSwag) counted its time as theirs, so a slow evaluation showed as a slow step."""
    use_devices(monkeypatch, 1)
    evaluation_seconds = 1.0
    validation_loss = evals.validation_loss

    def slow_validation_loss(*args):
        time.sleep(evaluation_seconds)
        return validation_loss(*args)

    monkeypatch.setattr(evals, "validation_loss", slow_validation_loss)
    config = char_config(steps=3)
    config.eval.every_steps, config.eval.batches = 1, 1
    config.checkpoint.every_steps = 1000
    train.train(config, tmp_path)
    steps = [r for r in train.read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    tokens_per_step = config.train.batch_size * models.config_from(config.model).block_size
    seconds = {r["step"]: tokens_per_step / r["tokens_per_s"] for r in steps}
    assert seconds[2] < evaluation_seconds and seconds[3] < evaluation_seconds, seconds


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(batch_size=8, grad_accum_steps=3),
            "train.batch_size=8 is not divisible by train.grad_accum_steps=3",
        ),
        (dict(batch_size=4), "does not divide over the 8 devices"),
        (dict(schedule="linear"), "train.schedule='linear' is not one of"),
        (dict(optimizer="sgd"), "train.optimizer='sgd' is not one of"),
    ],
)
def test_config_errors_come_before_compiling(tmp_path, overrides, message):
    config = char_config(**overrides)
    with pytest.raises(ConfigError, match=message):
        train.train(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_too_little_validation_data_is_reported_before_compiling(tmp_path):
    config = char_config(steps=3)
    config.eval.batches = 10_000
    fields = (  # the config fields to change, not "the batch size or sequence length"
        r"too few for 10000 batch\(es\) of 8 \(eval\.batches of train\.batch_size\); lower "
        r"eval\.batches to at most \d+, or train\.batch_size or model\.block_size, or use more"
    )
    with pytest.raises(DataError, match=fields):
        train.train(config, tmp_path)
    assert not list((tmp_path / "checkpoints").glob("*"))  # nothing trained, nothing saved


def test_a_batch_no_data_holds_is_refused_before_its_rows_are_listed(tmp_path, monkeypatch):
    """train.batch_size=10**12 was killed for memory (exit 137): ``process_rows`` listed every
    row of the batch before the loader found that no split holds it."""
    list_rows = data.process_rows

    def rows_of_a_batch_the_data_holds(batch_sharding, global_shape):
        assert global_shape[0] < 10**6, "the rows of a batch no data holds were listed"
        return list_rows(batch_sharding, global_shape)

    monkeypatch.setattr(data, "process_rows", rows_of_a_batch_the_data_holds)
    config = char_config(steps=3, batch_size=10**12)
    message = r"'train' split .* too few for 1 batch\(es\) of 1000000000000 \(train\.batch_size\)"
    with pytest.raises(DataError, match=message):
        train.train(config, tmp_path)
    assert not list((tmp_path / "checkpoints").glob("*"))


def launch(workdir, *overrides, devices: int = 1, env: dict | None = None):
    """launch.py on the char-level GPT smoke config, on ``devices`` CPU devices."""
    args = [
        sys.executable,
        str(ROOT / "launch.py"),
        "--config=configs/gpt.py:smoke",
        f"--workdir={workdir}",
        "--config.data.tokenizer=char",
        "--config.model.vocab_size=128",
        "--config.train.batch_size=8",
        "--config.log.every_steps=1",
        "--config.eval.every_steps=1000",
        *overrides,
    ]
    xla_flags = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    env = {**os.environ, "XLA_FLAGS": xla_flags, **(env or {})}
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def final_params(workdir, step):
    """The params arrays of checkpoint ``step`` as numpy, read without a template."""
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(
        Path(workdir) / "checkpoints" / str(step) / "state"
    )
    return jax.tree.leaves(restored["params"])


def train_losses(workdir):
    return {
        r["step"]: r["loss"]
        for r in train.read_metrics(Path(workdir) / "metrics.jsonl")
        if "loss" in r
    }


def test_sigterm_saves_then_exits_143(tmp_path):
    run = launch(
        tmp_path,
        "--config.train.steps=100000",
        "--config.checkpoint.every_steps=1000",
        "--config.eval.every_steps=1000",
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or not metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, out  # 143: a scheduler sees preemption
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    last = max(r["step"] for r in map(json.loads, metrics.read_text().splitlines()))
    assert saved == [last]
    # the saved step's progress line, then the save's (which came first, the step's line after)
    lines = out.splitlines()
    saving = lines.index(f"SIGTERM: saving step {last} before exiting")
    assert lines[saving - 1].startswith(f"step {last:>6}/100000 loss "), out


# What launch.py's data preparation does instead, for the test below, once it has printed
# "preparing": take long in short sleeps (a signal another thread takes interrupts no sleep,
# and the main thread sees it after its own), or compile (on XLA's own threads, which Ctrl-C
# leaves running; traced and lowered first, so that the signal finds the compile under way).
_SLOW_PREPARATIONS = {
    "sleeping": "[print('preparing', flush=True)] + [time.sleep(0.05) for _ in range(2000)]",
    "compiling": "[lowered := jax.jit(lambda x: functools.reduce(lambda y, i: jnp.sin(y @ y) + "
    "i, range(100), x)).lower(jnp.ones((64, 64))), print('preparing', flush=True), "
    "lowered.compile()]",
}


@pytest.mark.parametrize("preparation", sorted(_SLOW_PREPARATIONS))
def test_ctrl_c_before_the_training_loop_is_one_line_and_exits_130(preparation, tmp_path):
    """Ctrl-C while the data was prepared or a checkpoint restored, before the loop handles
    SIGINT, printed a KeyboardInterrupt traceback; while the train step compiled, the
    interpreter's exit crashed in XLA's compiling threads (exit status 139), as it may
    whenever it runs after the line (the handler registered here says when it does)."""
    preparing = (  # launch.py, with data preparation that takes long
        "import atexit, functools, runpy, sys, time, jax, jax.numpy as jnp; "
        "from jaxpt import data; atexit.register(print, 'finalizing', file=sys.stderr); "
        f"data.ensure_prepared = lambda *a, **k: {_SLOW_PREPARATIONS[preparation]}; "
        f"sys.argv[0] = 'launch.py'; runpy.run_path({str(ROOT / 'launch.py')!r}, "
        "run_name='__main__')"
    )
    run = subprocess.Popen(
        [
            sys.executable,
            "-c",
            preparing,
            "--config=configs/bigram.py:smoke",
            f"--workdir={tmp_path}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while run.stdout.readline() not in ("preparing\n", ""):
        pass
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGINT
    assert err == "launch.py: interrupted (SIGINT); run the command again to go on.\n"


def test_a_signal_the_process_ignores_does_not_stop_training():
    """A shell's background job ignores SIGINT, so Ctrl-C at that terminal leaves it running;
    the loop's handler replaced that, and such a run saved and exited 130 at the first Ctrl-C."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop = _loop._StopRequest(mesh)
        os.kill(os.getpid(), signal.SIGINT)
        stop.restore()
        assert not stop.after_step()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_launch_py_imports_is_one_line_and_exits_130(tmp_path):
    """Ctrl-C in the seconds jax and the rest import, before main runs, printed a
    KeyboardInterrupt traceback."""
    status, said, imported = interrupt_while_importing(
        ["launch.py", "--config=configs/bigram.py:smoke", f"--workdir={tmp_path}"]
    )
    assert "jaxpt.launcher" not in imported  # the interrupt came while it imported
    assert (status, said) == (
        128 + signal.SIGINT,
        ["launch.py: interrupted (SIGINT); run the command again to go on.\n"],
    )


def load_config(path: Path, arg: str):
    """``get_config(arg)`` of a config file, loaded the way config_flags loads it."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


CONFIG_FILES = sorted((ROOT / "configs").glob("*.py"))


def test_every_registry_preset_has_a_config_file():
    covered = {load_config(path, "smoke").model.name for path in CONFIG_FILES}
    assert covered == set(models.names())


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_preset_smoke_config_trains(path, tmp_path, monkeypatch):
    """Two steps of every preset's smoke config through ``train.train``, data parallel over
    two devices (the batch split, the gradients reduced over both); the mesh tests in
    test_sharding.py train on up to eight, and with FSDP, tensor and expert parallelism."""
    two = use_devices(monkeypatch, 2)
    config = load_config(path, "smoke")
    config.train.steps = 2
    config.eval.batches = 1
    config.log.every_steps = 1
    state = train.train(config, tmp_path)
    assert int(state.step) == 2
    assert all(p.sharding.device_set == set(two) for p in jax.tree.leaves(state.params))
    assert all(
        np.isfinite(r["loss"])
        for r in train.read_metrics(tmp_path / "metrics.jsonl")
        if "loss" in r
    )


def files_and_contents(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directory``: its bytes and modification time (ns), by relative path."""
    return {
        str(path.relative_to(directory)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_a_run_already_at_train_steps_says_so_and_writes_nothing(tmp_path, capsys):
    """Resumed at or below its checkpoint's step, a run printed "resumed from checkpoint 3",
    trained nothing without saying why, and rewrote loss.png and a TensorBoard file."""
    config = char_config(steps=3, warmup_steps=0)
    config.model.update(n_layer=1, block_size=16)
    config.eval.batches = 1
    config.checkpoint.keep = 1
    train.train(config, tmp_path)
    before = files_and_contents(tmp_path)
    for steps in (3, 2):
        config.train.steps = steps
        capsys.readouterr()
        state = train.train(config, tmp_path)
        out = capsys.readouterr().out
        assert int(state.step) == 3
        assert f"already at step 3 >= train.steps={steps}" in out, out
        assert "raise --config.train.steps to train further" in out
        assert "resumed from" not in out
        assert files_and_contents(tmp_path) == before


def char_data(directory: Path, characters: slice) -> Path:
    """``characters`` of a real English text (ASCII, so within a vocab of 128), prepared with
    the char tokenizer into ``directory``."""
    text = shared_book().read_text()
    source = directory.with_suffix(".txt")
    source.write_text(text.encode("ascii", "ignore").decode()[characters])
    kw = {"tokenizer": "char", "shard_tokens": 4000, "workers": 1, "progress": False}
    data.prepare_dataset(str(source), directory, **kw)
    return directory


def test_a_run_resumes_on_its_data_however_named_and_refuses_other_data(tmp_path, monkeypatch):
    """Resumed on another prepared dataset at least as large, a run went on mid-epoch with
    the old data's order and positions; the same data named another way must still resume."""
    first = char_data(tmp_path / "first", slice(0, 16_000))
    other = char_data(tmp_path / "other", slice(16_000, 40_000))
    config = char_config(steps=2, warmup_steps=0)
    config.model.update(n_layer=1, block_size=16)
    config.eval.batches = 1
    config.data.dataset = str(first)
    workdir = tmp_path / "run"
    train.train(config, workdir)
    before = files_and_contents(workdir)
    config.train.steps = 3
    config.data.dataset = str(other)
    with pytest.raises(ConfigError) as refused:
        train.train(config, workdir)
    assert f"data.dataset='{other}'" in str(refused.value)
    assert f"--config.data.dataset={first} to resume it" in str(refused.value)
    assert "another --workdir (nothing was changed)" in str(refused.value)
    assert files_and_contents(workdir) == before
    (tmp_path / "link").symlink_to(first)
    monkeypatch.chdir(tmp_path)
    config.data.dataset = "link"  # relative, through a symlink
    train.train(config, workdir)
    assert sorted(train_losses(workdir)) == [1, 2, 3]


class Stats(NamedTuple):
    """The fields of a compiled step's ``memory_analysis()`` that ``check_step_fits`` reads."""

    argument_size_in_bytes: int
    output_size_in_bytes: int
    alias_size_in_bytes: int
    temp_size_in_bytes: int
    generated_code_size_in_bytes: int = 0


GiB = 2**30
HOLDS = "its allocator holds"  # a GPU's limit, as memory.memory_limit words it


def smollm_sft_on(n_devices: int, accum: int = 1):
    config = load_config(ROOT / "configs" / "smollm_sft.py", None)
    config.train.grad_accum_steps = accum
    return config, sharding.make_mesh(config.mesh, jax.devices()[:n_devices])


def test_a_step_too_large_for_a_device_names_the_accumulation_measured_to_fit():
    """One H200 (2026-11-29, its allocator's bytes_limit 104.85 GiB) ran SmolLM-135M's train
    step at 64 x 2048 a step (88.1 GiB: 86.6 temporaries) and ran out of memory at 128 x 2048
    (152.4 GiB: 150.9 temporaries, 1.5 state donated) with an allocator's report; at 128 the
    step is now refused before it runs, naming the accumulation that ran."""
    config, mesh = smollm_sft_on(1)
    at_128 = Stats(1.51 * GiB, 1.50 * GiB, 1.50 * GiB, 150.9 * GiB)
    with pytest.raises(ConfigError) as error:
        train_memory.check_step_fits(at_128, int(104.85 * GiB), HOLDS, config, mesh)
    assert str(error.value) == (
        "the train step needs 152.4 GiB on each device, more than the 104.8 GiB its allocator "
        "holds, at 128 sequences of 2048 tokens a device at a time (train.batch_size=128, "
        "train.grad_accum_steps=1): set --config.train.grad_accum_steps=2 (or recompute "
        "activations, model.remat_policy=full, or spread the batch over more devices)."
    )
    config.train.grad_accum_steps = 2
    at_64 = Stats(1.51 * GiB, 1.50 * GiB, 1.50 * GiB, 86.6 * GiB)
    train_memory.check_step_fits(at_64, int(104.85 * GiB), HOLDS, config, mesh)


@pytest.mark.parametrize("devices", [1, 8])
def test_the_suggested_accumulation_keeps_whole_micro_batches_on_every_shard(devices):
    """By the estimate 3 micro-batches would do, but 128 sequences do not split in 3: the next
    that divides is 4. Over 8 batch shards, micro-batches of fewer than 8 sequences (an
    accumulation above 16) leave a shard without a row, so none is suggested there."""
    config, mesh = smollm_sft_on(devices)
    per_device = 128 // devices
    stats = Stats(GiB, GiB, GiB, temp_size_in_bytes=per_device * 3 * GiB // 2)
    with pytest.raises(ConfigError, match=r"grad_accum_steps=4 \(or recompute"):
        train_memory.check_step_fits(stats, per_device * 3 * GiB // 4, HOLDS, config, mesh)
    at_32 = GiB + stats.temp_size_in_bytes // 32  # the estimate at 32 micro-batches
    with pytest.raises(ConfigError) as error:
        train_memory.check_step_fits(stats, int(at_32 / 0.85) + 1, HOLDS, config, mesh)
    if devices == 1:
        assert "grad_accum_steps=32 (or" in str(error.value)
    else:  # micro-batches of 4 sequences over 8 shards
        assert "fewer sequences at a time would not fit either" in str(error.value)


def test_a_state_too_large_for_a_device_says_to_shard_it():
    """Params and optimizer state alone over the device's memory: no accumulation helps."""
    config, mesh = smollm_sft_on(1)
    with pytest.raises(ConfigError, match=r"fewer sequences at a time would not fit either: shard"):
        train_memory.check_step_fits(Stats(90 * GiB, 0, 0, 10 * GiB), 80 * GiB, HOLDS, config, mesh)


def test_a_state_too_large_for_the_memory_stops_before_anything_is_made(tmp_path, monkeypatch):
    """A model of 2**40 params hung in init on the CPU, after checkpoints/ was made (one past
    2**63 params was a TypeError as the state was lowered). The state's bytes on a device, from
    its shapes, are now held against the memory first: they are the bytes of the shards the
    init makes on a device (here over mesh.fsdp=2), and one byte less memory is refused."""
    devices = use_devices(monkeypatch, 2)
    config = char_config()
    config.mesh.update(data=1, fsdp=2)
    mesh = sharding.make_mesh(config.mesh, devices)
    abstract, shardings = train.abstract_state(config, mesh)
    tx = train.optimizer(config.train, abstract.params)
    model_cfg, key = models.config_from(config.model), jax.random.key(0)
    state = _loop.fresh_state(model_cfg, tx, shardings, key, None)
    made = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(state))
    monkeypatch.setattr(memory, "device_memory_limit", lambda: made)
    train_memory.check_state_fits(abstract, shardings, mesh)
    monkeypatch.setattr(memory, "device_memory_limit", lambda: made - 1)
    with pytest.raises(ConfigError, match=r"^the params \([\d,]+ of them\) and optimizer state"):
        train_memory.check_state_fits(abstract, shardings, mesh)
    monkeypatch.setattr(memory, "device_memory_limit", lambda: None)  # the host's memory
    config.model.update(n_layer=2**12, n_embed=2**14, n_mlp_hidden=2**16)  # 12 * 2**40 params
    with pytest.raises(ConfigError) as error:
        train.train(config, tmp_path / "run")
    # 4 bytes of param and 8 of AdamW's moments each, half on a device
    assert re.match(
        r"the params \(13,195,\d{3},\d{3},\d{3} of them\) .* need 72.0 TiB on", str(error.value)
    )
    assert str(error.value).endswith(
        "train a smaller model (model.n_layer, model.n_embed), or shard the state over more "
        "devices (mesh.fsdp)."
    )
    assert not (tmp_path / "run").exists()


def test_a_run_whose_step_does_not_fit_stops_before_it_runs(tmp_path, monkeypatch):
    """Through the loop: the step compiled for the first batch is measured against the device's
    allocator before it runs (a CPU reports none, so a GPU's is put in its place); the run
    stops in the sentence, having written no step's metrics, plot or checkpoint. At the
    accumulation the sentence names for 0.8 of the step's need, with that memory, it trains."""
    measured = []
    check = train_memory.check_step_fits

    def recording(stats, limit, what, config, mesh):
        measured.append(stats)
        check(stats, limit, what, config, mesh)

    monkeypatch.setattr(train_memory, "check_step_fits", recording)
    monkeypatch.setattr(_loop, "check_state_fits", lambda *_: None)  # the state's: above
    use_devices(monkeypatch, 1)
    config = char_config(steps=1)
    config.train.batch_size = 32
    monkeypatch.setattr(memory, "device_memory_limit", lambda: 1)
    with pytest.raises(ConfigError, match=r"^the train step needs .* would not fit either: "):
        train.train(config, tmp_path / "run")
    assert train.read_metrics(tmp_path / "run" / "metrics.jsonl") == []
    assert not (tmp_path / "run" / "loss.png").exists()
    assert not train.has_checkpoint(tmp_path / "run")
    limit = int(memory.program_bytes(measured[0]) * 0.8)
    mesh = sharding.make_mesh(config.mesh, jax.devices())
    with pytest.raises(ConfigError, match=r"set --config.train.grad_accum_steps=\d+ ") as error:
        check(measured[0], limit, HOLDS, config, mesh)
    config.train.grad_accum_steps = int(re.search(r"steps=(\d+) ", str(error.value)).group(1))
    monkeypatch.setattr(memory, "device_memory_limit", lambda: limit)
    train.train(config, tmp_path / "run")
    assert memory.program_bytes(measured[-1]) <= limit and train.has_checkpoint(tmp_path / "run")


def test_a_cpu_step_is_held_against_the_hosts_memory(tmp_path, monkeypatch):
    """A CPU reports no allocator's limit, and its step went unchecked (a step past the host's
    memory was the kernel's out-of-memory kill, no sentence): it is held against the host's
    physical memory, an equal share for each of this process's devices."""
    pages = lambda name: 1024 if name == "SC_PHYS_PAGES" else real_sysconf(name)
    real_sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", pages)  # a host of 1024 pages
    monkeypatch.setattr(_loop, "check_state_fits", lambda *_: None)  # the state's: above
    use_devices(monkeypatch, 2)
    host = 1024 * real_sysconf("SC_PAGE_SIZE")
    with pytest.raises(ConfigError) as error:
        train.train(char_config(steps=1), tmp_path / "run")
    share = f"{memory.size_text(host / 2)} a CPU device may take (the host's "
    assert f"more than the {share}{memory.size_text(host)} over 2), at " in str(error.value)
    assert train.read_metrics(tmp_path / "run" / "metrics.jsonl") == []
    assert not train.has_checkpoint(tmp_path / "run")


def test_the_logged_throughput_of_a_stretch_ending_the_run_is_its_steps_own(tmp_path, monkeypatch):
    """Where dispatching a step blocks the host until it has run (XLA:GPU reads a while loop's
    condition on the host: gradient accumulation's), the loop fetched each step's metrics only
    once the next had run, and the last step's logged time was the host's few milliseconds
    after it: configs/smollm_sft.py's last step logged 2.4M tokens/s (MFU 294%) against 340K.
    Here dispatch blocks until the step is done; each logged step's throughput is within a
    factor of two of the median."""
    checked = train_memory.memory_checked

    def blocking(step, config, mesh):
        run = checked(step, config, mesh)
        return lambda *args: jax.block_until_ready(run(*args))

    monkeypatch.setattr(_loop, "memory_checked", blocking)
    use_devices(monkeypatch, 1)
    config = char_config(steps=6)
    config.train.batch_size = 16
    config.eval.every_steps, config.eval.batches = 3, 1  # a stretch ends at an eval point too
    train.train(config, tmp_path)
    records = train.read_metrics(tmp_path / "metrics.jsonl")
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # 1 compiles
    median = float(np.median(rates))
    assert all(median / 2 < rate < median * 2 for rate in rates), rates
