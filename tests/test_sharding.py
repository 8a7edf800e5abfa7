"""Sharded train steps (data, FSDP, tensor and expert parallel, alone and mixed, on up to 8 CPU
devices) against the same steps on one device; a checkpoint written under FSDP resumed on
other meshes; the mesh's DCN axes and the sharding report."""

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding

from jaxpt import models, nn, sharding, train
from jaxpt.config import preset_config
from jaxpt.errors import ConfigError, DataError
from jaxpt.nn import _attention
from tests import test_moe

STEPS = 4
DENSE = "gqa_glu_rope_gpt"  # grouped-query heads: tensor parallelism splits K and V too
RESUME_AT = 2  # the elastic-resume test checkpoints after this many steps


# training randomness: the same dropout masks and router noise on every mesh
RANDOM = (("dropout", 0.1), ("router_noise", 0.01))


def small_config(preset: str, model: tuple = (), **mesh):
    config = preset_config(preset, "smoke")
    config.model.update({"vocab_size": 512, "block_size": 32, **dict(model)})
    # a small lr: Adam turns float noise in near-zero gradients into steps of about lr;
    # micro-batches of 8 rows split over up to 8 batch devices
    config.train.update(batch_size=16, grad_accum_steps=2, lr=1e-3, warmup_steps=1)
    config.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    config.mesh.update(mesh)
    return config


def batches(config):
    rng = np.random.default_rng(0)
    shape = (STEPS, config.train.batch_size, config.model.block_size + 1)
    return rng.integers(0, config.model.vocab_size, shape, dtype=np.int32)


@functools.cache
def compiled(preset: str, mesh: tuple[tuple[str, int], ...], model: tuple = ()):
    """``(config, mesh, state shardings, jitted step)`` for ``preset`` (with the ``model``
    field overrides) on the mesh ``mesh`` (axis sizes) over the first devices; ``()``: one
    device."""
    config = small_config(preset, model, **dict(mesh))
    n_devices = int(np.prod([size for _, size in mesh]))
    device_mesh = sharding.make_mesh(config.mesh, jax.devices()[:n_devices])
    abstract, shardings = train.abstract_state(config, device_mesh)
    tx = train.optimizer(config.train, abstract.params)
    batch = sharding.batch_sharding(device_mesh, config.mesh.rules)
    step = jax.jit(
        train.make_train_step(config, tx),
        in_shardings=(shardings, batch, batch),
        out_shardings=(shardings, sharding.replicated(device_mesh)),
    )
    return config, device_mesh, shardings, step


@functools.cache
def fresh_state(preset: str, model: tuple = ()):
    """Step 0 of ``preset`` on one device, the start of every mesh's run."""
    config = small_config(preset, model)
    cfg = models.config_from(config.model)
    params = jax.eval_shape(lambda k: models.get(cfg.name).init(k, cfg), jax.random.key(0))
    tx = train.optimizer(config.train, params)
    return jax.jit(lambda k: train.init_state(k, cfg, tx))(jax.random.key(0))


def run_steps(preset: str, mesh: tuple, state=None, first: int = 0, model: tuple = ()):
    """States after each step and the losses of steps ``first..STEPS-1`` of ``preset`` on
    ``mesh``, from ``state`` (default: ``fresh_state``)."""
    config, device_mesh, shardings, step = compiled(preset, mesh, model)
    if state is None:
        state = jax.device_put(fresh_state(preset, model), shardings)
    states, losses = [], []
    with activations(device_mesh, config.mesh.rules):
        for tokens in batches(config)[first:]:
            state, metrics = step(state, tokens[:, :-1], tokens[:, 1:])
            states.append(state)
            losses.append(float(metrics["loss"]))
    return states, losses


@functools.cache
def trajectory(preset: str, mesh: tuple = (), model: tuple = ()):
    """``run_steps`` from a fresh state, once per preset and mesh (the one-device runs and
    the FSDP run serve several tests)."""
    return run_steps(preset, mesh, model=model)


@contextlib.contextmanager
def activations(mesh, rules):
    """The train loop's activation constraints, checking that attention asks for them and
    that every block boundary does."""
    asked = []
    resolved = sharding.activation_rules(rules)

    def sharding_of(shape, names):
        asked.append(names)
        return NamedSharding(mesh, sharding.spec_for(shape, names, mesh, resolved))

    with nn.shard_activations(sharding_of):
        yield
    if asked:  # the step traced in here
        assert ("batch", None, "kv_heads", None) in asked
        assert asked.count(("batch", None, None)) > 1  # the residual stream


def mesh_key(**sizes) -> tuple[tuple[str, int], ...]:
    return tuple(sizes.items())


@pytest.mark.parametrize(
    ("preset", "mesh", "model"),
    [
        (DENSE, mesh_key(data=2), ()),  # on 2 devices
        (DENSE, mesh_key(fsdp=8), ()),
        (DENSE, mesh_key(tensor=2), ()),  # on 2 devices
        (DENSE, mesh_key(fsdp=4, tensor=2), ()),
        (DENSE, mesh_key(data=2, fsdp=2, tensor=2), ()),
        (DENSE, mesh_key(data=2, fsdp=2), (("kernels", "pallas"),)),  # per-device kernels
        (DENSE, mesh_key(data=2, fsdp=2, shard_optimizer=True), ()),  # ZeRO-1
        # ZeRO-1 where the width 36 divides by fsdp (2) but not by fsdp x data (8)
        (DENSE, mesh_key(data=4, fsdp=2, shard_optimizer=True), (("n_embed", 36),)),
        ("tiny_moe_2", mesh_key(expert=8), ()),  # top-2 of 8 experts
        ("tiny_moe_2", mesh_key(data=2, tensor=2, expert=2), RANDOM),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{a}={n}" for a, n in v),
)
def test_sharded_steps_equal_one_device(preset, mesh, model, capfd):
    config, _, shardings, _ = compiled(preset, mesh, model)
    specs = {s.spec for s in jax.tree.leaves(shardings.params)}
    for axis, size in mesh:  # every mesh axis in use splits some weight
        if size > 1 and axis != "data":
            assert any(axis in jax.tree.leaves(tuple(spec)) for spec in specs), axis
    axes_of = lambda spec: set(jax.tree.leaves(tuple(spec)))
    for moment in ("mu", "nu"):  # optimizer moments are sharded like their params ...
        moments = jax.tree.leaves(optax.tree.get(shardings.opt_state, moment))
        params = jax.tree.leaves(shardings.params)
        if config.mesh.shard_optimizer:  # ... or, ZeRO-1, over the data axis too
            pairs = zip(params, moments, strict=True)
            assert all(axes_of(p.spec) <= axes_of(m.spec) for p, m in pairs)
            assert any("data" in axes_of(m.spec) for m in moments)
            assert not any("data" in axes_of(spec) for spec in specs)
        else:
            assert moments == params
    sharded, sharded_losses = trajectory(preset, mesh, model)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    single, single_losses = trajectory(preset, (), model)
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        jax.device_get(sharded[-1].params),
        jax.device_get(single[-1].params),
    )


def sharding_constraints(jaxpr) -> list[tuple[tuple[int, ...], tuple]]:
    """``(shape, PartitionSpec)`` of every ``with_sharding_constraint`` in ``jaxpr`` and the
    jaxprs inside it (jit, scan, remat, custom derivatives)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            found.append((eqn.invars[0].aval.shape, tuple(eqn.params["sharding"].spec)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr):
                    found += sharding_constraints(getattr(sub, "jaxpr", sub))
    return found


def test_cudnn_attention_gets_q_sharded_like_k_and_v_where_the_kv_heads_stay_whole(monkeypatch):
    """cuDNN's partitioner refuses q, k and v sharded differently ("Query, key and value
    should have same sharding": on two GPUs a step whose tensor axis split the query heads
    but not the key/value heads did not compile). With 6 query and 3 key/value heads on
    tensor=2, the cuDNN step (XLA's attention stands in for its kernel on the CPU) keeps q's
    heads whole like k's and v's, and its losses equal one device's."""
    monkeypatch.setattr(_attention, "_best_implementation", lambda q, mask: "cudnn")  # a GPU's
    xla = jax.nn.dot_product_attention
    monkeypatch.setattr(
        jax.nn,
        "dot_product_attention",
        lambda *args, implementation, **kwargs: xla(*args, implementation="xla", **kwargs),
    )
    model, mesh = (("n_kv_head", 3),), mesh_key(data=2, tensor=2)
    _, sharded_losses = trajectory(DENSE, mesh, model)
    config, device_mesh, shardings, step = compiled(DENSE, mesh, model)
    tokens = batches(config)[0]
    state = jax.device_put(fresh_state(DENSE, model), shardings)
    with activations(device_mesh, config.mesh.rules):
        jaxpr = jax.make_jaxpr(step)(state, tokens[:, :-1], tokens[:, 1:])
    micro_batch, t, head_dim = 8, 32, 16
    heads = {  # heads -> the specs of the (B, T, heads, Dh) activations
        shape[2]: spec
        for shape, spec in sharding_constraints(jaxpr.jaxpr)
        if shape[:2] == (micro_batch, t) and len(shape) == 4 and shape[3] == head_dim
    }
    assert set(heads) == {6, 3}
    assert heads[6] == heads[3] == ("data", None, None, None)
    _, single_losses = trajectory(DENSE, (), model)
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)


def test_fsdp_checkpoint_resumes_on_two_devices_and_on_one(tmp_path):
    """FSDP over 8 devices, checkpointed after RESUME_AT steps, resumed with data parallelism
    on 2 devices and on 1 device: the losses of the uninterrupted run, within float noise."""
    fsdp = mesh_key(fsdp=8)
    states, losses = trajectory(DENSE, fsdp)
    config = compiled(DENSE, fsdp)[0]
    checkpoints = train.Checkpoints(tmp_path / "checkpoints", keep=1)
    checkpoints.save(RESUME_AT, states[RESUME_AT - 1], {"step": RESUME_AT}, config)
    checkpoints.wait()
    for mesh in (mesh_key(data=2), ()):
        _, device_mesh, shardings, _ = compiled(DENSE, mesh)
        abstract, _ = train.abstract_state(config, device_mesh)
        step, state, loader = checkpoints.restore_latest(abstract, shardings, config)
        assert (step, loader) == (RESUME_AT, {"step": RESUME_AT})
        assert state.params.wte.weight.sharding == shardings.params.wte.weight
        saved = jax.device_get(states[RESUME_AT - 1])
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), saved)  # bitwise
        _, resumed = run_steps(DENSE, mesh, state, first=RESUME_AT)
        np.testing.assert_allclose(resumed, losses[RESUME_AT:], rtol=1e-6)
    checkpoints.close()


def test_expert_parallel_moe_moves_tokens_by_all_to_all_and_equals_one_device(capfd):
    mesh = mesh_key(data=2, tensor=2, expert=2)  # tiny_moe: GLU experts with biases
    config, device_mesh, shardings, step = compiled("tiny_moe", mesh)
    state = jax.device_put(fresh_state("tiny_moe"), shardings)
    tokens = batches(config)[0]  # micro-batches of 8: one sequence per device
    with activations(device_mesh, config.mesh.rules):
        executable = step.lower(state, tokens[:, :-1], tokens[:, 1:]).compile()
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    hlo = executable.as_text()
    assert "all-to-all(" in hlo  # tokens go to their experts' devices and back
    assert "all-gather(" not in hlo and "collective-permute(" not in hlo  # nothing else moves
    losses = []
    for batch in batches(config):  # the executable checked above, not a second compile
        state, metrics = executable(state, batch[:, :-1], batch[:, 1:])
        losses.append(float(metrics["loss"]))
    single, single_losses = trajectory("tiny_moe")
    np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        jax.device_get(state.params),
        jax.device_get(single[-1].params),
    )


@pytest.mark.parametrize(
    "preset, model",  # a tied table and learned positions at GPT-2's width and heads; GLU
    [("gpt", (("n_embed", 768), ("n_head", 12), ("n_kv_head", 12))), (DENSE, ())],
)
def test_fsdp_gathers_weights_and_never_activations(preset, model, capfd):
    """FSDP splits the table's rows and the output projections' inputs. Each device computes
    its own sequences with the weights gathered whole: left to itself, the partitioner split
    attention's heads like the output projection's rows (all-to-alls there and back) and
    kept the table's rows split, gathering every device's sequences for the lookup and the
    read-out (``(B, T, D)`` all-gathers of the whole batch)."""
    config, device_mesh, shardings, step = compiled(preset, mesh_key(fsdp=2), model)
    state = jax.device_put(fresh_state(preset, model), shardings)
    tokens = batches(config)[0]
    with activations(device_mesh, config.mesh.rules):
        hlo = step.lower(state, tokens[:, :-1], tokens[:, 1:]).compile().as_text()
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    gathered = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)
    whole_batch = "{},{},".format(*tokens[:, :-1].shape)  # (B, T, ...)
    assert gathered and [shape for shape in gathered if shape.startswith(whole_batch)] == []
    assert "all-to-all" not in hlo


def test_data_parallel_reduces_a_tied_tables_gradients_in_the_compute_dtype(tmp_path):
    """Under data=4 both ``(V, D)`` gradients of a tied table, the read-out's and the
    lookup's, cross the devices in bfloat16 (as every layer's weight gradient does): half the
    bytes of float32. Their sum equals the one-device gradient within bfloat16 rounding of
    the largest sums."""
    config = small_config(DENSE, data=4)
    device_mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
    rules = config.mesh.rules
    rng = np.random.default_rng(0)
    vocab, width = 64, 16
    table = nn.Embedding(
        jnp.asarray(rng.normal(size=(vocab, width)), jnp.float32), ("vocab", "embed")
    )
    ids = rng.integers(0, vocab, (8, 4))
    weights = rng.normal(size=(8, 4, vocab))

    def loss(table, ids, weights):
        hidden = nn.embed(table, ids, jnp.bfloat16)
        return (nn.unembed(table, hidden) * weights).sum()

    one_device = jax.jit(jax.grad(loss))(table, ids, weights)
    options = {"xla_dump_to": str(tmp_path), "xla_dump_hlo_pass_re": "spmd-partitioning"}
    grad = jax.jit(jax.grad(loss), compiler_options=options)
    batch = sharding.batch_sharding(device_mesh, rules)
    with sharding.activation_sharding(device_mesh, rules):
        sharded = grad(
            table,
            jax.device_put(ids, batch),
            jax.device_put(weights, sharding.batch_sharding(device_mesh, rules, 3)),
        )
    (partitioned,) = tmp_path.glob("*after_spmd-partitioning*")
    reduced = re.findall(r"= (\w+)\[(\d+),(\d+)\]\S* all-reduce\(", partitioned.read_text())
    assert reduced == [("bf16", str(vocab), str(width))] * 2, reduced
    scale = np.abs(one_device.weight).max()  # each device's sums are rounded at about it
    np.testing.assert_allclose(sharded.weight, one_device.weight, atol=2**-7 * scale)


def test_the_token_lookup_is_split_by_sequence_without_rematerializing(capfd, tmp_path):
    """Under data x fsdp x tensor (a table split over vocab and width, ids over the batch)
    each device looks up its own sequences' rows: XLA warned of an "involuntary full
    rematerialization" of the gather's output when the width stayed split. The rows and the
    table's gradient equal float64 numpy's."""
    config = small_config(DENSE, data=2, fsdp=2, tensor=2)
    mesh, rules = sharding.make_mesh(config.mesh), config.mesh.rules
    rng = np.random.default_rng(0)
    table = nn.Embedding(jnp.asarray(rng.normal(size=(64, 16)), jnp.float32), ("vocab", "embed"))
    ids, weights = rng.integers(0, 64, (8, 4)), rng.normal(size=(8, 4, 16))

    def loss(table, ids):
        rows = nn.constrain(nn.embed(table, ids, jnp.float32), ("batch", None, None))
        return (rows * weights).sum(), rows

    # a compile of its own: the dump folder keys it apart from the persistent cache's entries
    step = jax.jit(jax.grad(loss, has_aux=True), compiler_options={"xla_dump_to": str(tmp_path)})
    table = jax.device_put(table, sharding.param_shardings(table, mesh, rules))
    with sharding.activation_sharding(mesh, rules):
        grad, rows = step(table, jax.device_put(ids, sharding.batch_sharding(mesh, rules)))
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    reference = np.asarray(table.weight, np.float64)
    np.testing.assert_allclose(rows, reference[ids], rtol=1e-6)
    expected = np.zeros_like(reference)
    np.add.at(expected, ids, weights)
    np.testing.assert_allclose(grad.weight, expected, rtol=1e-5, atol=1e-6)


def test_soft_moe_sends_its_slots_to_their_experts_by_all_to_all(capfd, tmp_path):
    """Soft MoE under data x expert x tensor: each device computes its own sequences' slots
    and all-to-alls carry them to their experts' devices and back. Left to XLA, every device
    gathered every expert's weights (and a train step under data=2 x expert=4 replicated the
    ``(B, E, C, D)`` slots: an "involuntary full rematerialization"). The output equals
    float64 numpy's, the gradients one device's."""
    cfg = test_moe.moe_config(mixer="soft_moe", block_size=12)  # 4 experts of 3 slots
    params, x = test_moe.setup_soft_moe(cfg, seed=11, shape=(8, 12))
    valid = np.ones((8, 12), bool)
    valid[::2, :3] = False  # left padding
    weights = np.random.default_rng(0).normal(size=x.shape)

    def loss(params, x, valid):
        y = nn.soft_moe(params, x, activation=cfg.activation, mask=valid)
        return (y * weights).sum(), y

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    config = small_config(DENSE, data=2, expert=2, tensor=2)
    mesh, rules = sharding.make_mesh(config.mesh), config.mesh.rules
    sharded_params = jax.device_put(params, sharding.param_shardings(params, mesh, rules))
    inputs = (
        jax.device_put(x, sharding.batch_sharding(mesh, rules, 3)),
        jax.device_put(valid, sharding.batch_sharding(mesh, rules)),
    )
    # a compile of its own: the dump folder keys it apart from the persistent cache's entries
    step = jax.jit(grad, compiler_options={"xla_dump_to": str(tmp_path)})
    with sharding.activation_sharding(mesh, rules):
        compiled = step.lower(sharded_params, *inputs).compile()
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    assert "all-to-all(" in compiled.as_text() and "all-gather(" not in compiled.as_text()
    grads, y = compiled(sharded_params, *inputs)
    np.testing.assert_allclose(y, test_moe.np_soft_moe(params, x, valid, cfg)[0], atol=1e-4)
    one_device, _ = jax.jit(grad)(params, x, valid)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grads, one_device
    )


def test_ragged_experts_split_over_the_mesh_are_one_sentence(tmp_path):
    config = small_config("tiny_moe", expert=8)
    config.model.moe_matmul = "ragged"
    with pytest.raises(ConfigError, match="moe_matmul='ragged' cannot split the experts"):
        # was said as the step traced, after init; the data (vocab 512 < GPT-2's) is refused
        # before that, so the check must come first
        train.train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    cfg = models.config_from(config.model)
    model = models.get(cfg.name)
    params = jax.eval_shape(lambda k: model.init(k, cfg), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((8, cfg.block_size), np.int32)
    mesh = sharding.make_mesh(config.mesh)
    with (
        sharding.activation_sharding(mesh, config.mesh.rules),
        pytest.raises(ConfigError, match="moe_matmul='ragged' cannot split the experts"),
    ):
        jax.eval_shape(lambda p, t: model.apply(p, t, cfg), params, tokens)


def test_ragged_experts_stored_split_over_fsdp_run_as_the_layer_does():
    """An ``expert`` rule naming fsdp splits the stored experts, which the layer gathers whole
    for its use (fsdp splits only the activations' batch): no expert parallelism, so ragged
    experts run, as on one device. The check before the run refused them (naming mesh.expert
    > 1, here 1): it read the params' rules, not the layer's."""
    config = small_config("tiny_moe", data=4, fsdp=2)
    config.mesh.rules.expert = ("expert", "fsdp")
    config.model.moe_matmul = "ragged"
    mesh = sharding.make_mesh(config.mesh)
    train.check_experts_fit_mesh(config, mesh)
    cfg = models.config_from(config.model)
    model = models.get(cfg.name)
    params = model.init(jax.random.key(0), cfg)
    tokens = batches(config)[0, :8, :-1]
    apply = jax.jit(lambda p, t: model.apply(p, t, cfg)[0])
    split = jax.device_put(params, sharding.param_shardings(params, mesh, config.mesh.rules))
    assert split.blocks[0].mixer.experts.up.weight.sharding.spec[1] == "fsdp"
    with sharding.activation_sharding(mesh, config.mesh.rules):
        sharded = apply(split, tokens)
    np.testing.assert_allclose(sharded, apply(params, tokens), rtol=1e-5, atol=1e-5)


def test_a_mesh_that_does_not_fit_the_devices_is_one_sentence():
    config = small_config("gpt", data=3)
    with pytest.raises(ConfigError, match="devices"):
        sharding.make_mesh(config.mesh)


def test_fixed_mesh_sizes_that_do_not_divide_the_devices_are_named():
    config = small_config("gpt", data=-1, fsdp=3)
    with pytest.raises(ConfigError) as caught:  # named no field and gave no remedy
        sharding.make_mesh(config.mesh)
    assert str(caught.value) == (
        "mesh.fsdp=3 (the sizes other than -1) multiply to 3, which does not divide the 8 "
        "devices; make their product a divisor of 8."
    )


def test_a_rule_that_names_a_mesh_axis_twice_is_one_sentence():
    config = small_config(DENSE, fsdp=2)
    config.mesh.rules.embed = ("fsdp", "fsdp")  # was a DuplicateSpecError from inside jax
    with pytest.raises(ConfigError) as caught:
        train.validate_config(config)
    assert str(caught.value) == (
        "mesh.rules.embed=('fsdp', 'fsdp') names 'fsdp' twice; name each mesh axis once."
    )


def test_a_rule_of_comma_separated_axes_shows_the_tuple_to_pass():
    """``--config.mesh.rules.batch=data,fsdp`` is the tuple ``('data,fsdp',)``: refused as one
    unknown axis, without the syntax that names two."""
    config = small_config(DENSE, fsdp=2)
    config.mesh.rules.batch = ("data,fsdp",)  # what config_flags makes of data,fsdp
    with pytest.raises(ConfigError) as caught:
        train.validate_config(config)
    assert str(caught.value) == (
        "mesh.rules.batch=('data,fsdp',) names 'data,fsdp', not one of the mesh axes ['data', "
        "'fsdp', 'tensor', 'expert']; to name several axes, pass a tuple: "
        """--config.mesh.rules.batch="('data', 'fsdp')"."""
    )
    config.mesh.rules.batch = ("data", "fsdp")
    train.validate_config(config)  # the tuple it shows is a valid rule


def test_dcn_axes_must_match_the_slices():
    config = small_config("gpt", data=-1, dcn_data=2)
    with pytest.raises(ConfigError) as caught:
        sharding.make_mesh(config.mesh)
    assert str(caught.value) == (
        "mesh.dcn_data=2 x mesh.dcn_fsdp=1 must equal the number of processes the 8 devices "
        "are in (1); set mesh.dcn_data=-1 (and mesh.dcn_fsdp=1) to put the slow links between "
        "them on the data axis."
    )


@pytest.mark.parametrize(
    "n_slices, dcn, expected",
    [
        (1, dict(), (1, 1, 1, 1)),  # the default: data spans every slice
        (4, dict(), (4, 1, 1, 1)),
        (4, dict(dcn_data=-1, dcn_fsdp=2), (2, 2, 1, 1)),
        (4, dict(dcn_data=1, dcn_fsdp=-1), (1, 4, 1, 1)),
        (2, dict(dcn_data=2, dcn_fsdp=1), (2, 1, 1, 1)),
        (4, dict(dcn_data=-1, dcn_fsdp=3), "mesh.dcn_data=-1 x mesh.dcn_fsdp=3 must equal"),
        (2, dict(dcn_data=-1, dcn_fsdp=-1), "are all -1 (mesh.dcn_data is -1 by default), but"),
    ],
)
def test_slice_counts_resolve_minus_one_to_the_slices_left(n_slices, dcn, expected):
    config = small_config("gpt", data=-1, **dcn)
    devices = jax.devices()
    size = len(devices) // n_slices
    groups = [devices[i * size : (i + 1) * size] for i in range(n_slices)]
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            sharding.dcn_shape(config.mesh, groups)
    else:
        assert sharding.dcn_shape(config.mesh, groups) == expected


def test_a_second_axis_of_minus_one_names_the_default_and_the_size_to_set():
    """``--config.mesh.fsdp=-1`` alone (FSDP over every device; ``dcn_fsdp=-1``: over every
    slice) leaves ``mesh.data`` (``dcn_data``) at its default -1 too: the sentence said only
    that at most one may be -1. It names the default and the setting, which works."""
    config = small_config("gpt", data=-1, fsdp=-1)
    with pytest.raises(ConfigError) as caught:
        sharding.make_mesh(config.mesh)
    assert str(caught.value) == (
        "mesh.data and mesh.fsdp are all -1 (mesh.data is -1 by default), but at most one "
        "takes the devices left over; set mesh.data=1 (or another size) to give mesh.fsdp "
        "the rest."
    )
    config.mesh.data = 1
    assert sharding.make_mesh(config.mesh).shape["fsdp"] == len(jax.devices())
    config = small_config("gpt", data=-1, dcn_fsdp=-1)
    with pytest.raises(ConfigError, match=r"set mesh\.dcn_data=1 \(or another size\) to give "):
        sharding.make_mesh(config.mesh)
    config.mesh.dcn_data = 1
    devices = jax.devices()
    two_slices = [devices[:4], devices[4:]]
    assert sharding.dcn_shape(config.mesh, two_slices) == (1, 2, 1, 1)


def test_the_report_names_every_spec_and_large_replicated_tensors():
    config = small_config("vgpt", data=2, fsdp=2, tensor=2)
    config.model = models.get("vgpt").default_config().to_dict()  # vocab 50257: odd
    mesh = sharding.make_mesh(config.mesh)
    params = train.abstract_state(config, mesh)[0].params
    rules = config.mesh.rules
    report = sharding.describe_shardings(params, mesh, rules).splitlines()
    mesh_line = "mesh (data=2, fsdp=2, tensor=2, expert=1) over 8 cpu devices"
    assert report[0] == f"{mesh_line}; param shardings:"
    assert len(report) == 1 + len(jax.tree.leaves(params))
    q = next(line for line in report if "blocks.0.attn.q.weight" in line).split()
    assert q[1:4] == ["(12,", "768,", "768)"] and " ".join(q[-3:]) == "P(None, 'fsdp', 'tensor')"
    assert sharding.replication_warnings(params, mesh, rules) == [
        "wte.weight (50257, 768) stays replicated over mesh axis 'tensor': its dimension 0 "
        "('vocab', 50257) does not divide by 2; make it a multiple of 2 or change "
        "mesh.rules.vocab."
    ]
    config.model.vocab_size = 50304
    params = train.abstract_state(config, mesh)[0].params
    assert sharding.replication_warnings(params, mesh, rules) == []
    report = sharding.describe_shardings(params, mesh, rules).splitlines()
    line_of = lambda name: next(line for line in report if f" {name} " in line)
    spec = lambda name: line_of(name)[line_of(name).index(" P(") + 1 :]
    assert spec("wte.weight") == "P(('tensor', 'fsdp'), None)"  # FSDP splits its rows
    for name in ("blocks.0.attn.o.weight", "blocks.0.mixer.proj.weight"):  # and their inputs
        assert spec(name) == "P(None, ('tensor', 'fsdp'), None)", name


@pytest.mark.parametrize("n_embed", [48, 36])  # 36: no split by fsdp x data, data's on mlp
def test_the_report_names_the_optimizer_moments_specs_the_step_uses_with_zero_1(n_embed):
    config = small_config("gqa_glu_rope_gpt", (("n_embed", n_embed),), data=4, fsdp=2)
    config.mesh.shard_optimizer = True
    mesh = sharding.make_mesh(config.mesh)
    abstract, shardings = train.abstract_state(config, mesh)
    rules = config.mesh.rules
    report = sharding.describe_shardings(abstract.params, mesh, rules, shard_optimizer=True)
    assert report.splitlines()[0].endswith("param shardings, then their optimizer moments':")
    moments = [line[line.rindex("P(") :] for line in report.splitlines()[1:]]
    mu = optax.tree_utils.tree_get(shardings.opt_state, "mu")  # Adam's first moments
    assert moments == [str(s.spec) for s in jax.tree.leaves(mu)]
    lines = report.splitlines()[1:]
    spec = lambda path: next(m for line, m in zip(lines, moments, strict=True) if path in line)
    assert spec("wte.weight") == "P(('fsdp', 'data'), None)"  # its rows (512) over both
    gate = "('fsdp', 'data'), None" if n_embed % 8 == 0 else "'fsdp', 'data'"  # (embed, mlp)
    assert spec("mixer.gate.weight") == f"P(None, {gate})"


def test_the_report_keeps_its_columns_aligned_for_long_shapes_and_specs():
    """Columns were padded to fixed widths (shape 20, spec 28): a 4-dimensional expert weight
    of a real size, or its moments' spec under ZeRO-1, pushed the columns after it out of line.
    Each column now starts at the same place on every line."""
    model = (("n_embed", 1536), ("n_mlp_hidden", 6144), ("n_experts", 128))
    config = small_config("tiny_moe", model, data=2, fsdp=2, expert=2, shard_optimizer=True)
    mesh = sharding.make_mesh(config.mesh)
    params = train.abstract_state(config, mesh)[0].params  # shapes only
    report = sharding.describe_shardings(params, mesh, config.mesh.rules, shard_optimizer=True)
    lines = report.splitlines()[1:]
    assert any("(1, 128, 1536, 6144)" in line for line in lines)  # longer than 20
    assert any("P(None, 'expert', ('fsdp', 'data'), None)" in line for line in lines)
    starts = {  # column -> where it starts on each line
        "shape": {line.index(" (") for line in lines},
        "axes": {line.index(" ('") if " ('" in line else line.index(" (None") for line in lines},
        "spec": {line.index(" P(") for line in lines},
        "moments": {line.rindex(" P(") for line in lines},
    }
    assert {column: len(where) for column, where in starts.items()} == dict.fromkeys(starts, 1)


@pytest.mark.parametrize(
    "n_head, n_kv_head, tensor",
    [(6, 2, 2), (6, 2, 4), (8, 2, 4), (8, 2, 8), (8, 8, 8), (9, 3, 2)],
)
def test_attention_heads_that_the_tensor_axis_cannot_split_are_one_warning(
    n_head, n_kv_head, tensor
):
    """The warning comes exactly when a head count does not divide by the tensor axis (the
    default rules split both head axes over it), and then the heads are whole on every device
    of the tensor axis."""
    config = small_config(DENSE, data=8 // tensor, tensor=tensor)
    mesh = sharding.make_mesh(config.mesh)
    rules = config.mesh.rules
    split = lambda heads, name: (
        "tensor" in sharding.spec_for((8, 32, heads, 16), ("batch", None, name, None), mesh, rules)
    )
    warnings = sharding.attention_warnings(n_head, n_kv_head, mesh, rules)
    q_split, kv_split = n_head % tensor == 0, n_kv_head % tensor == 0
    assert (split(n_head, "q_heads"), split(n_kv_head, "kv_heads")) == (q_split, kv_split)
    assert len(warnings) == (not (q_split and kv_split))
    if warnings:
        unsplit = ([f"model.n_head={n_head}"] if not q_split else []) + [
            f"model.n_kv_head={n_kv_head}"
        ]
        assert warnings[0].startswith(
            f"Attention is not split over mesh axis 'tensor': {' and '.join(unsplit)} "
        )
        assert f"choose mesh.tensor dividing model.n_kv_head={n_kv_head}, or" in warnings[0]


@pytest.mark.parametrize(
    "n_embed, whole",  # 36 divides by fsdp (2) but not by fsdp x data (8), 96 by both
    [(36, ("blocks.0.attn.k.weight", "blocks.0.attn.v.weight")), (96, ())],
)
def test_zero_1_moments_keep_their_params_split_where_the_data_axis_does_not_divide(n_embed, whole):
    """ZeRO-1 splits each moment over data (4) as well as fsdp, on the dimension fsdp splits
    where its size divides by both, else on a later one whose rule names fsdp: at width 36
    the MLP's on its hidden size (384), attention's q and o on their other 36 (divides by 4),
    but k's and v's ``(36, 12)``, ``('embed', 'kv_heads')``, on none."""
    config = small_config(DENSE, (("n_embed", n_embed),), data=4, fsdp=2, shard_optimizer=True)
    mesh = sharding.make_mesh(config.mesh)
    abstract, shardings = train.abstract_state(config, mesh)
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract.params)
    paths = [jax.tree_util.keystr(path, simple=True, separator=".") for path, _ in flat]
    params = [p for _, p in flat]
    axes = jax.tree.leaves(nn.logical_axes(abstract.params))
    per_device = lambda s, p: int(np.prod(s.shard_shape(p.shape)))
    for moment in ("mu", "nu"):
        moments = jax.tree.leaves(optax.tree.get(shardings.opt_state, moment))
        own = jax.tree.leaves(shardings.params)
        for path, p, names, o, m in zip(paths, params, axes, own, moments, strict=True):
            split = "norm" not in names and path not in whole  # a norm's scale stays whole
            assert per_device(m, p) == per_device(o, p) // (4 if split else 1), path
    warnings = sharding.replication_warnings(
        abstract.params, mesh, config.mesh.rules, shard_optimizer=True, min_size=500
    )
    assert [w.split()[0] for w in warnings] == list(whole)
    if warnings:
        assert warnings[0] == (
            "blocks.0.attn.k.weight (2, 36, 12) keeps its optimizer moments "
            "(mesh.shard_optimizer) replicated over mesh axis 'data': its dimension 1 ('embed', "
            "36) does not divide by 8; make it a multiple of 8 or change mesh.rules.embed."
        )


@pytest.mark.parametrize(
    "model, mesh, warning",
    [
        (
            (("vocab_size", 50304),),  # 6 query and 2 key/value heads
            dict(data=2, tensor=4),
            "Attention is not split over mesh axis 'tensor': model.n_head=6 and "
            "model.n_kv_head=2 do not divide by 4, so every device computes every head and the "
            "weights split part-way through one; choose mesh.tensor dividing "
            "model.n_kv_head=2, or change mesh.rules.q_heads and mesh.rules.kv_heads.",
        ),
        (
            (("n_embed", 36), ("vocab_size", 50257)),  # rows that fsdp cannot split
            dict(data=4, fsdp=2, shard_optimizer=True),
            "wte.weight (50257, 36) keeps its optimizer moments (mesh.shard_optimizer) "
            "replicated over mesh axis 'data': its dimension 0 ('vocab', 50257) does not "
            "divide by 4; make it a multiple of 4 or change mesh.rules.vocab.",
        ),
    ],
    ids=["heads", "zero_1"],
)
def test_the_run_warns_at_start(model, mesh, warning, tmp_path, caplog):
    config = small_config(DENSE, model, **mesh)
    config.eval.batches = 10_000  # refused after the start-of-run report: nothing compiles
    with pytest.raises(DataError, match="too few for 10000 batch"):
        train.train(config, tmp_path)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [warning]
