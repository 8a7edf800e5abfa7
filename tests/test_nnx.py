"""jaxpt.nnx, the original JaxPT's NNX API: parameter counts of the original, logits and
gradients equal to the functional model's, training in the original's style, the MoE flags,
the KV cache, checkpoints in the original's on-disk layout."""

import dataclasses
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxpt import data, generate, generation, hf, models, sharding
from jaxpt.errors import ConfigError
from jaxpt.nnx import checkpointers, infer, utils
from jaxpt.nnx import models as m
from jaxpt.nnx.models import gpt as gpt_module
from jaxpt.nnx.models import smol_lm

from . import nnx_reference

V, T = 64, 16
TINY = dict(block_size=T, vocab_size=V, n_layer=2, n_embed=32, n_head=4, n_mlp_hidden=64)
TINY_MOE = dict(TINY, n_kv_head=2, n_experts=4, dtype=jnp.float32)
TINY_CONFIGS = {
    m.GPT: m.GPTConfig(**TINY),
    m.NoPE_GPT: m.NoPE_GPTConfig(**TINY),
    m.GLU_GPT: m.GLU_GPTConfig(**TINY),
    m.RoPE_GPT: m.RoPE_GPTConfig(**TINY),
    m.GLU_RoPE_GPT: m.GLU_RoPE_GPTConfig(**TINY),
    m.GQA_GPT: m.GQA_GPTConfig(**TINY, n_kv_head=2),
    m.GQA_GLU_RoPE_GPT: m.GQA_GLU_RoPE_GPTConfig(**TINY, n_kv_head=2),
    m.SmolLM: m.SmolLM_Config(**TINY, n_kv_head=2),
    m.Tiny_MoE: m.Tiny_MoE_Config(**TINY_MOE),
    m.Tiny_MoE_2: m.Tiny_MoE_2_Config(**TINY_MOE),
    m.Tiny_MoE_3: m.Tiny_MoE_3_Config(**TINY_MOE),
}


def build(cls, seed=0, config=None):
    """A tiny model of ``cls`` (``config``, else its ``TINY_CONFIGS`` one) with random params,
    norm scales and biases included (numpy's: no init to compile)."""
    if cls is m.Bigram:
        return m.Bigram(V, nnx.Rngs(seed))
    if cls is m.Charformer:
        return m.Charformer(V, 32, 4, 2, T, nnx.Rngs(seed))
    config = TINY_CONFIGS[cls] if config is None else config
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: cls._abstract(config).functional_params())
    params = jax.tree.map(
        lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype), abstract
    )
    return cls.from_params(params, config, nnx.Rngs(seed))


def batch(seed=1, b=2):
    tokens = jax.random.randint(jax.random.key(seed), (b, T + 1), 0, V)
    return tokens[:, :-1], tokens[:, 1:]


def reference(model, x):
    """The functional model's ``(logits, aux)`` on the params ``model`` holds."""
    cfg = model.model_config()
    return models.get(cfg.name).apply(model.functional_params(), x, cfg)


@nnx.jit
def call_and_reference(model, x):
    """``model(x)`` and the functional model's output, in one compile."""
    return model(x), reference(model, x)


@pytest.mark.parametrize(
    "cls, config, count",
    [
        (m.GPT, m.GPTConfig(), 124_475_904),
        (m.SmolLM, m.SmolLM_Config(), 135_151_488),
        (m.SmolLM, m.SmolLM_Config(vocab_size=49152), 134_515_008),
        (m.Tiny_MoE, m.Tiny_MoE_Config(), 631_370_304),
        (m.Tiny_MoE_2, m.Tiny_MoE_2_Config(), 1_061_041_200),
        (m.Tiny_MoE_3, m.Tiny_MoE_3_Config(), 650_170_944),
    ],
)
def test_parameter_counts_are_the_originals(cls, config, count):
    model = nnx.eval_shape(lambda: cls(config, nnx.Rngs(0)))  # nothing allocated
    assert utils.count_params(model) == count
    assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == count


def test_count_params_by_layer_type_uses_the_originals_paths():
    model = nnx.eval_shape(lambda: m.GPT(m.GPTConfig(), nnx.Rngs(0)))
    d, layers = 768, 12
    attn = layers * (d * 3 * d + 3 * d + d * d + d)  # c_attn and c_proj, kernels and biases
    assert utils.count_params(model, "attn") == attn
    assert utils.count_params(model, "wpe") == 1024 * d


def test_bigram_counts_and_writes_the_originals_tree(tmp_path):
    bigram = m.Bigram(V, nnx.Rngs(0))  # its config has no heads
    assert utils.count_params(bigram) == V * V
    (table,) = jax.tree.leaves(bigram.functional_params())
    np.testing.assert_array_equal(bigram.original_tree()["embed"]["embedding"]["value"], table)
    bigram.save_checkpoint(tmp_path / "bigram")
    assert (tmp_path / "bigram").is_dir()


def test_from_params_of_another_config_is_one_sentence_naming_the_first_misfit():
    """Params of another size ran under the config (a wider MLP's silently, its checkpoint
    then not loading with that config), or raised jax's scan error or an AttributeError."""
    params, config = build(m.GPT).functional_params(), TINY_CONFIGS[m.GPT]
    needs = r"but GPT with this config needs \({}.*\): pass the config they were trained with"
    for field, value, want in [("n_mlp_hidden", 128, "2, 32, 128"), ("n_layer", 1, "1, ")]:
        with pytest.raises(ConfigError, match=r"^the params' blocks\.0\.\S+ has shape \(2, "):
            m.GPT.from_params(params, dataclasses.replace(config, **{field: value}))
        with pytest.raises(ConfigError, match=needs.format(want)):
            m.GPT.from_params(params, dataclasses.replace(config, **{field: value}))
    with pytest.raises(ConfigError, match=r"^the params have no \S+, which GPT with this config"):
        m.GPT.from_params(build(m.SmolLM).functional_params(), config)
    with pytest.raises(ConfigError, match=r"^the params hold wpe\.weight, which has no place in"):
        m.NoPE_GPT.from_params(params, TINY_CONFIGS[m.NoPE_GPT])


def test_init_stddev_scales_every_weight():
    config = m.GPTConfig(**{**TINY, "n_embed": 128, "n_mlp_hidden": 256}, init_stddev=0.1)
    tree = m.GPT(config, nnx.Rngs(0)).original_tree()["h"]["0"]  # the original: 0.02 for both
    for kernel in (tree["attn"]["c_attn"]["kernel"], tree["mlp"]["c_fc"]["kernel"]):
        assert float(jnp.std(kernel["value"])) == pytest.approx(0.1, rel=0.05)


def train_step(model, optimizer, x, y):
    """The original's train step (run under nnx.jit): cross-entropy plus the MoE losses the
    model returns; returns the logits and gradients too, for the comparison."""

    def loss_fn(model):
        out = model(x)
        logits, lb, z = out if isinstance(out, tuple) else (out, 0.0, 0.0)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + 1e-2 * lb + 1e-3 * z, logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, logits, grads


def functional_loss(params, x, y, cfg, with_aux):
    logits, aux = models.get(cfg.name).apply(params, x, cfg)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    extra = 1e-2 * aux["load_balance_loss"] + 1e-3 * aux["z_loss"] if with_aux else 0.0
    return ce + extra, logits


@nnx.jit(static_argnums=4)
def train_step_and_reference(model, optimizer, x, y, with_aux):
    """The functional model's loss, logits and gradients at the params before the step, and
    the step (one compile per class)."""
    params, cfg = model.functional_params(), model.model_config()
    want = jax.value_and_grad(functional_loss, has_aux=True)(params, x, y, cfg, with_aux)
    return train_step(model, optimizer, x, y), want


def by_path(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): v for p, v in flat}


@pytest.mark.parametrize("cls", [*TINY_CONFIGS, m.Bigram, m.Charformer], ids=lambda c: c.__name__)
def test_trains_in_the_original_style_with_the_functional_models_logits_and_grads(cls):
    model = build(cls)
    model.eval()  # Charformer's dropout off: the functional reference is deterministic
    with_aux = cls in (m.Tiny_MoE, m.Tiny_MoE_2)
    if with_aux:
        model.train(load_balance_loss=True, z_loss=True)
    x, y = batch()
    optimizer = nnx.Optimizer(model, optax.sgd(0.3), wrt=nnx.Param)
    (loss, logits, grads), ((want_loss, want_logits), want_grads) = train_step_and_reference(
        model, optimizer, x, y, with_aux
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(logits, want_logits.astype(logits.dtype), rtol=1e-5, atol=1e-5)
    got = {".".join(map(str, p[1:])): v.get_value() for p, v in grads.flat_state()}
    want = by_path(want_grads)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)
    for _ in range(4):
        (last, _, _), _ = train_step_and_reference(model, optimizer, x, y, with_aux)
    assert last < loss


def test_moe_flags_choose_what_the_model_returns():
    """The return conventions, traced without compiling (the values: the training test)."""
    x, _ = batch()
    returns = lambda model: nnx.eval_shape(lambda model: model(x), model)
    tiny_moe = build(m.Tiny_MoE)
    assert returns(tiny_moe).shape == (2, T, V)  # logits alone while both flags are off
    tiny_moe.train(load_balance_loss=True)  # on every block in the original; here one flag
    tiny_moe.eval()  # keeps the flags
    logits, lb, z = returns(tiny_moe)
    assert logits.shape == (2, T, V) and lb.dtype == jnp.float32 and lb.shape == ()
    assert z.dtype == jnp.int32  # a disabled term is the int 0
    _, lb, z = returns(build(m.Tiny_MoE_2))  # always a triple
    assert lb.dtype == z.dtype == jnp.int32
    soft_moe = build(m.Tiny_MoE_3)
    soft_moe.config = dataclasses.replace(soft_moe.config, use_cache=True)
    with pytest.raises(ConfigError, match="'tiny_moe_3' cannot be cached"):
        soft_moe(x)


@pytest.mark.parametrize("cls", [m.Tiny_MoE_Config, m.Tiny_MoE_3_Config])
def test_moe_configs_refuse_a_glu_activation_their_experts_would_not_have(cls):
    """The original's experts gate with SiLU whatever glu_activation says (NNX_API.md §6);
    only its GLU layers follow it, and the core's experts share the GLU layers' gate."""
    assert cls(**TINY_MOE).model_config().activation == "silu"
    for activation in ("gelu", "sigmoid"):
        with pytest.raises(ConfigError, match=f"glu_activation='{activation}' would gate"):
            cls(**TINY_MOE, glu_activation=activation).model_config()


def test_moe_padding_takes_no_slot_and_no_part_in_the_losses():
    model = build(m.Tiny_MoE_2)
    model.train(load_balance_loss=True, z_loss=True)
    x, _ = batch(b=1)
    n = 10  # real tokens, then padding
    logits, lb, z = model(x, jnp.arange(T)[None] < n)
    alone, lb_alone, z_alone = model(x[:, :n])
    np.testing.assert_allclose(logits[:, :n], alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([lb, z], [lb_alone, z_alone], rtol=1e-5)


@pytest.mark.parametrize(
    "mask",
    [np.ones((2, 3), bool), np.ones((2, T), np.int32), np.ones(T, bool)],
    ids=["narrow", "int", "unbatched"],
)
def test_a_mask_not_shaped_as_the_tokens_or_not_bool_is_one_sentence(mask):
    """jax's TypeError ('incompatible shapes for broadcasting') or ValueError ('mask dtype
    should be bool') came through."""
    shape, dtype = re.escape(str(mask.shape)), mask.dtype
    with pytest.raises(ConfigError, match=rf"^mask has shape {shape} and dtype {dtype}: it must"):
        build(m.SmolLM)(batch()[0], mask=mask)


def test_moe_classes_cache_only_when_no_choice_can_be_dropped():
    x, _ = batch()
    for cls, load_factor in [(m.Tiny_MoE_2, 1.25), (m.Tiny_MoE_2, 2.0), (m.Tiny_MoE_3, None)]:
        model = build(cls)
        config = model.config
        if load_factor is not None:
            config = dataclasses.replace(config, load_factor=load_factor)
        model.config = dataclasses.replace(config, use_cache=True)
        if load_factor != 2.0:  # 1.25 * 2 < 4 experts: a choice can be dropped
            with pytest.raises(ConfigError, match="cannot be cached"):
                model(x)
            continue
        first, second = model(x[:, :6])[0], model(x[:, 6:])[0]
        full = cls.from_params(model.functional_params(), config)(x)[0]
        np.testing.assert_allclose(jnp.concatenate([first, second], 1), full, atol=1e-5)


@pytest.mark.parametrize("flag", ["add_noise", "load_balance_loss", "z_loss"])
def test_moe_training_flags_with_the_cache_on_are_one_sentence(flag):
    """The cache decodes without router noise or losses: lb and z came out 0.0 and the noise
    was left out."""
    model = build(
        m.Tiny_MoE_2,
        config=dataclasses.replace(TINY_CONFIGS[m.Tiny_MoE_2], load_factor=2.0, use_cache=True),
    )
    model.train(**{flag: True})
    with pytest.raises(ConfigError, match=rf"^use_cache=True with {flag} on: the cache serves"):
        model(batch()[0])
    model.train(**{flag: False})
    assert model(batch()[0])[1:] == (0, 0)


@pytest.mark.parametrize("cls", [m.GQA_GPT, m.GQA_GLU_RoPE_GPT])
def test_cached_decoding_equals_the_full_pass(cls):
    model = build(cls)
    tokens, _ = batch()
    _, (full, _) = call_and_reference(model, tokens)
    model.config = dataclasses.replace(model.config, use_cache=True)  # read on every call
    step = nnx.jit(lambda model, idx: model(idx))
    pieces = [step(model, tokens[:, :13])]  # prefill
    pieces.append(step(model, tokens[:, 13:15]))  # two tokens in one call
    pieces.append(step(model, tokens[:, 15:]))  # one token
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="reset it"):
        step(model, tokens[:, :1])  # past block_size
    model.reset_cache()
    np.testing.assert_allclose(step(model, tokens[:, :13]), full[:, :13], rtol=1e-4, atol=1e-4)


# Off the defaults, so that each shows: epsilon 1e-2, biases where a config has them, a GELU
# gate, RoPE base 1000; MoE capacity for every choice (load_factor * top_k = n_experts).
REF = dict(TINY, ln_epsilon=1e-2)
REF_ROPE = dict(REF, rope_theta=1e-3)
REF_MOE = dict(TINY_MOE, ln_epsilon=1e-2, rope_theta=1e-3, load_factor=2.0)
REFERENCE_CASES = {
    "GPT": (m.GPT, m.GPTConfig(**REF), "wpe"),
    "NoPE_GPT": (m.NoPE_GPT, m.NoPE_GPTConfig(**REF), None),
    "GLU_GPT": (m.GLU_GPT, m.GLU_GPTConfig(**REF, mlp_bias=True, glu_activation="gelu"), "wpe"),
    "RoPE_GPT": (m.RoPE_GPT, m.RoPE_GPTConfig(**REF_ROPE), "rope"),
    "GLU_RoPE_GPT": (m.GLU_RoPE_GPT, m.GLU_RoPE_GPTConfig(**REF_ROPE, mlp_bias=True), "rope"),
    "GQA_GPT": (m.GQA_GPT, m.GQA_GPTConfig(**REF, n_kv_head=2, attention_bias=True), "wpe"),
    "GQA_GLU_RoPE_GPT": (
        m.GQA_GLU_RoPE_GPT,
        m.GQA_GLU_RoPE_GPTConfig(**REF_ROPE, n_kv_head=1, attention_bias=True, mlp_bias=True),
        "rope",
    ),
    "SmolLM": (
        m.SmolLM,
        m.SmolLM_Config(**REF_ROPE, n_kv_head=2, attention_bias=True, mlp_bias=True),
        "rope",
    ),
    "Tiny_MoE": (m.Tiny_MoE, m.Tiny_MoE_Config(**REF_MOE, mlp_bias=True), "rope"),
    "Tiny_MoE_2": (m.Tiny_MoE_2, m.Tiny_MoE_2_Config(**REF_MOE), "rope"),
}


@pytest.mark.parametrize("cls, config, positions", REFERENCE_CASES.values(), ids=REFERENCE_CASES)
def test_logits_and_losses_equal_a_numpy_forward_of_the_originals_tree(cls, config, positions):
    """The original's semantics (NNX_API.md §4-§6) in float64 numpy, on the tree the adapter
    writes: layouts, splits, RoPE, norms, epsilon, MoE routing and losses."""
    model = build(cls, config=config)
    assert model.model_config().is_cacheable  # the reference's MoE has no capacity to drop at
    if cls in (m.Tiny_MoE, m.Tiny_MoE_2):
        model.train(load_balance_loss=True, z_loss=True)
    x, _ = batch()
    out = model(x)
    logits, lb, z = out if isinstance(out, tuple) else (out, 0.0, 0.0)
    want, want_lb, want_z = nnx_reference.forward(
        model.original_tree(), np.asarray(x), config, positions
    )
    assert logits.dtype == jnp.float32
    assert np.abs(logits - want).max() <= 1e-5 * np.abs(want).max()
    np.testing.assert_allclose([lb, z], [want_lb, want_z], rtol=1e-5)


def original_tree(cls, cfg, seed=0):
    """A checkpoint tree as the original's save_checkpoint writes it, built from the paths
    and shapes of NNX_API.md §4 and §8 (random values)."""
    rng = np.random.default_rng(seed)
    d, f, hd = cfg.n_embed, cfg.n_mlp_hidden, cfg.n_embed // cfg.n_head

    def arr(*shape):
        return {"value": (0.1 * rng.standard_normal(shape)).astype(np.float32)}

    def linear(d_in, d_out, bias):
        return {"kernel": arr(d_in, d_out), **({"bias": arr(d_out)} if bias else {})}

    if cls is m.GPT:
        tree = {"wte": {"embedding": arr(V, d)}, "wpe": {"embedding": arr(T, d)}}
        tree["ln_f"] = {"scale": arr(d), "bias": arr(d)}
        block = lambda: {
            "ln_1": {"scale": arr(d), "bias": arr(d)},
            "attn": {"c_attn": linear(d, 3 * d, True), "c_proj": linear(d, d, True)},
            "ln_2": {"scale": arr(d), "bias": arr(d)},
            "mlp": {"c_fc": linear(d, f, True), "c_proj": linear(f, d, True)},
        }
        tree["h"] = {str(i): block() for i in range(cfg.n_layer)}
        return tree
    # Tiny_MoE: MoE blocks at even indices, GLU blocks at odd ones; mlp_bias biases the
    # router and the GLU layers
    e, kv = cfg.n_experts, 2 * cfg.n_kv_head * hd
    tree = {"wte": {"embedding": arr(V, d)}, "rms_n_f": {"scale": arr(d)}, "h": {}}
    for i in range(cfg.n_layer):
        block = {
            "rms_n_1": {"scale": arr(d)},
            "rms_n_2": {"scale": arr(d)},
            "attn": {
                "wq": linear(d, d, False),
                "wkv": linear(d, kv, False),
                "wproj": linear(d, d, False),
            },
        }
        if i % 2 == 0:
            experts = {"w_gate": arr(e, d, f), "w_c_fc": arr(e, d, f), "w_c_proj": arr(e, f, d)}
            experts.update(b_gate=arr(e, 1, f), b_c_fc=arr(e, 1, f), b_c_proj=arr(e, 1, d))
            block["moe"] = {"router_gate": linear(d, e, cfg.mlp_bias), "experts": experts}
        else:
            block["glu"] = {
                "c_fc": linear(d, f, cfg.mlp_bias),
                "gate": linear(d, f, cfg.mlp_bias),
                "c_proj": linear(f, d, cfg.mlp_bias),
            }
        tree["h"][str(i)] = block
    tree["h"]["0"]["attn"]["omega"] = {"value": original_omega(cfg, jnp.bfloat16)}
    return tree


def original_omega(cfg, dtype):
    """The original's calc_rope_omega_llama: its table ``(S, hd)`` computed in ``dtype``,
    every step rounded there (in bfloat16, positions above 256 too [D12])."""
    hd = cfg.n_embed // cfg.n_head
    inv_freq = cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=dtype) / hd)
    positions = jnp.arange(cfg.block_size, dtype=dtype)[:, None]
    return np.asarray(jnp.concatenate([inv_freq, inv_freq]) * positions)


@pytest.mark.parametrize(
    "cls, config",
    [
        (m.GPT, TINY_CONFIGS[m.GPT]),
        (m.Tiny_MoE, TINY_CONFIGS[m.Tiny_MoE]),
        (m.Tiny_MoE, m.Tiny_MoE_Config(**TINY_MOE, mlp_bias=True)),  # the router's bias too
    ],
    ids=["GPT", "Tiny_MoE", "Tiny_MoE-mlp_bias"],
)
def test_a_checkpoint_in_the_originals_layout_loads_and_converts_back(cls, config, tmp_path):
    import orbax.checkpoint as ocp

    tree = original_tree(cls, config)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "original", tree)
    checkpointer.wait_until_finished()

    model = cls.from_checkpoint(str(tmp_path / "original"), nnx.Rngs(0), config)
    p, h, d = model.functional_params(), tree["h"], config.n_embed
    if cls is m.GPT:  # c_attn's columns are [q|k|v]; layer i is row i of the stack
        np.testing.assert_array_equal(
            p.blocks[0].attn.k.weight[1], h["1"]["attn"]["c_attn"]["kernel"]["value"][:, d : 2 * d]
        )
        np.testing.assert_array_equal(
            p.blocks[0].attn.v.bias[0], h["0"]["attn"]["c_attn"]["bias"]["value"][2 * d :]
        )
    else:  # wkv's columns are [k|v]; MoE layers 0, 2, ... and GLU layers 1, 3, ...
        kv = config.n_kv_head * d // config.n_head
        np.testing.assert_array_equal(
            p.blocks[0].attn.v.weight[0], h["0"]["attn"]["wkv"]["kernel"]["value"][:, kv:]
        )
        np.testing.assert_array_equal(
            p.blocks[0].mixer.experts.down.bias[0],
            h["0"]["moe"]["experts"]["b_c_proj"]["value"][:, 0],
        )
        np.testing.assert_array_equal(
            p.blocks[1].mixer.gate.weight[0], h["1"]["glu"]["gate"]["kernel"]["value"]
        )
    logits, (want, _) = call_and_reference(model, batch()[0])
    np.testing.assert_array_equal(logits, want)

    back = dict(jax.tree_util.tree_flatten_with_path(model.original_tree())[0])
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if "omega" not in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(back[path], value, err_msg=jax.tree_util.keystr(path))
    assert len(back) == len(jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "sdpa, dtype", [("slow", jnp.float32), ("slow", jnp.bfloat16), ("einsum", jnp.float32)]
)
def test_a_slow_attention_save_opens_as_the_original_restores_it(sdpa, dtype, tmp_path):
    """The original's CausalSelfAttention keeps a causal mask Variable per layer when its
    sdpa_implementation is "slow" (NNX_API.md §4; any other value runs its slow path without
    one), and its from_checkpoint restores into a target that holds exactly its Variables."""
    import orbax.checkpoint as ocp

    config = dataclasses.replace(TINY_CONFIGS[m.GPT], sdpa_implementation=sdpa, dtype=dtype)
    m.GPT.from_params(build(m.GPT).functional_params(), config).save_checkpoint(tmp_path / "ckpt")
    target = original_tree(m.GPT, config)  # the original's tree, and its masks:
    for block in target["h"].values():
        if sdpa == "slow":
            block["attn"]["mask"] = {"value": np.zeros((1, 1, T, T), dtype)}
    restored = ocp.StandardCheckpointer().restore(tmp_path / "ckpt", target)
    tril = np.tril(np.ones((T, T)))[None, None]  # (1, 1, S, S): the original's value
    for block in restored["h"].values() if sdpa == "slow" else ():
        assert block["attn"]["mask"]["value"].dtype == dtype
        np.testing.assert_array_equal(np.asarray(block["attn"]["mask"]["value"], float), tril)


def test_save_checkpoint_round_trip_and_misfits(tmp_path):
    model = build(m.SmolLM)
    path = tmp_path / "smol"
    model.save_checkpoint(str(path))
    with pytest.raises(ConfigError, match=rf"^{path} exists already, and a checkpoint is never"):
        model.save_checkpoint(str(path))  # orbax's ValueError said nothing to do
    loaded = m.SmolLM.from_checkpoint(str(path), nnx.Rngs(1), TINY_CONFIGS[m.SmolLM])
    loaded = nnx.merge(*nnx.split(loaded))
    np.testing.assert_array_equal(
        loaded.functional_params().wte.weight, model.functional_params().wte.weight
    )
    x, _ = batch()
    np.testing.assert_array_equal(call_and_reference(loaded, x)[0], call_and_reference(model, x)[0])

    wider = dataclasses.replace(TINY_CONFIGS[m.SmolLM], n_mlp_hidden=96)
    with pytest.raises(
        ConfigError,
        match=r"'h\.0\.mlp\.gate\.kernel' gives shape \(32, 64\), but SmolLM with this "
        r"config needs \(32, 96\)",
    ):
        m.SmolLM.from_checkpoint(str(path), nnx.Rngs(1), wider)
    shallower = dataclasses.replace(TINY_CONFIGS[m.SmolLM], n_layer=1)
    with pytest.raises(ConfigError, match=r"holds 'h\.1\."):
        m.SmolLM.from_checkpoint(str(path), nnx.Rngs(1), shallower)


def test_from_checkpoint_of_a_missing_or_damaged_directory_is_one_sentence(tmp_path):
    """Orbax's FileNotFoundError and tensorstore's ValueError ("DATA_LOSS: ...") came through."""
    path = tmp_path / "smol"
    build(m.SmolLM).save_checkpoint(str(path))
    truncated = shutil.copytree(path, tmp_path / "truncated")
    for file in truncated.rglob("*"):
        if file.is_file() and file.stat().st_size > 100:
            file.write_bytes(file.read_bytes()[:50])
    for broken in (tmp_path / "missing", truncated):
        with pytest.raises(ConfigError, match=rf"^{broken} cannot be read as a checkpoint \("):
            m.SmolLM.from_checkpoint(str(broken), nnx.Rngs(1), TINY_CONFIGS[m.SmolLM])


def test_from_checkpoint_of_a_tree_with_lists_names_what_does_not_fit(tmp_path):
    """A tree holding a list (a jaxpt run's train state, say) raised AttributeError
    ('SequenceKey' object has no attribute 'key')."""
    model = build(m.SmolLM)
    tree = {**model.original_tree(), "opt_state": [np.zeros(2)]}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "listed", tree)
    checkpointer.wait_until_finished()
    with pytest.raises(ConfigError, match=r"holds 'opt_state\.0'"):
        m.SmolLM.from_checkpoint(str(tmp_path / "listed"), nnx.Rngs(1), TINY_CONFIGS[m.SmolLM])


@nnx.jit
def twice_and_reference(model, x):
    """Two calls of ``model``, each drawing its own key from the model's rngs, and the
    deterministic functional logits."""
    return model(x), model(x), reference(model, x)[0]


@pytest.mark.parametrize("cls", [m.Charformer, m.Tiny_MoE])
def test_dropout_and_router_noise_draw_from_the_modules_rngs(cls):
    model = build(cls)  # Charformer: dropout on until eval(), as in the original
    if cls is m.Tiny_MoE:
        model.train(add_noise=True)
    first, second, clean = twice_and_reference(model, batch()[0])
    assert not np.allclose(first, second) and not np.allclose(first, clean)
    if cls is m.Tiny_MoE:  # the router logits move by 1%: the outputs stay close
        np.testing.assert_allclose(first, clean, rtol=0.2, atol=0.2)


def test_generate_samples_every_row_and_infer_uses_the_core_sampler():
    bigram = m.Bigram(V, nnx.Rngs(0))
    out = bigram.generate(jax.random.key(0), jnp.zeros((3, 2), jnp.int32), max_new_tokens=2)
    assert out.shape == (3, 4)  # the original's categorical(shape=(B, 1)) needs B = 1 [D22]

    enc = data.CharTokenizer.from_texts(["the quick brown fox jumps over a lazy dog"])
    texts = infer.generate_completions(
        bigram, enc, prefix="the fox", num_completions=2, max_length=T
    )
    assert [t[:7] for t in texts] == ["the fox"] * 2
    assert all(len(t) >= T for t in texts)  # a char or end-of-text per token
    ids, key = infer.top_k_sampling(jnp.arange(8.0)[None].repeat(4, 0), jax.random.key(0), k=2)
    assert ids.shape == (4, 1) and set(np.asarray(ids).ravel()) <= {6, 7}
    assert not np.array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(0)))


def test_top_k_beyond_a_small_vocabulary_samples_from_all_of_it():
    """generate_completions' fixed top-50 refused every model whose tokenizer has fewer than
    50 ids ('top_k=50 must be an integer in [1, 17]', an argument it does not take), and
    top_k_sampling raised jax's errors for k above V or below 1."""
    enc = data.CharTokenizer.from_texts(["the quick brown fox"])  # 17 ids
    bigram, key = m.Bigram(enc.vocab_size, nnx.Rngs(0)), jax.random.key(3)
    texts = infer.generate_completions(bigram, enc, "the", num_completions=3, max_length=9, key=key)
    unfiltered = generate(
        bigram.functional_params(),
        [enc.encode("the")] * 3,
        bigram.model_config(),
        max_new_tokens=6,
        temperature=0.2,
        key=key,
        n_tokens=enc.vocab_size,
    )
    assert texts == [enc.decode(row) for row in np.asarray(unfiltered.tokens).tolist()]
    logits = jax.random.normal(jax.random.key(0), (4, 10))
    ids, _ = infer.top_k_sampling(logits, key, k=11)
    every_id = jax.random.categorical(jax.random.split(key)[1], logits)  # the key split first
    np.testing.assert_array_equal(ids[:, 0], every_id)
    for k in (0, -1):
        with pytest.raises(ConfigError, match=f"^k={k} must be an integer >= 1\\.$"):
            infer.top_k_sampling(logits, key, k=k)


def test_a_tokenizer_with_more_ids_than_the_model_is_one_sentence_naming_both():
    """GPT-2's default tokenizer on a 64-id model said 'n_tokens=50257 must be from 1 to
    model.vocab_size=64', an argument none of these take."""
    gpt, enc = build(m.GPT), data.get_tokenizer("gpt2")
    want = r"^the tokenizer has 50257 ids, more than the model's vocab_size=64: pass the model's"
    for call in (
        lambda: infer.generate_completions(gpt, max_length=20),
        lambda: infer.generate_completion_slow(gpt, enc, "Hi", max_length=6),
        lambda: infer.generate_chat(gpt, question="Hi"),
    ):
        with pytest.raises(ConfigError, match=want):
            call()


def test_a_max_length_within_the_prefix_is_one_sentence_naming_it():
    """It was 'max_new_tokens=-4 must be an integer >= 1', an argument these do not take."""
    enc = data.CharTokenizer.from_texts(["the quick brown fox"])
    bigram = m.Bigram(enc.vocab_size, nnx.Rngs(0))
    for complete in (infer.generate_completions, infer.generate_completion_slow):
        for length in (3, 7):
            with pytest.raises(ConfigError, match=rf"^max_length={length} leaves no room .* 7 "):
                complete(bigram, enc, "the fox", max_length=length)


def test_completion_slow_and_fast_leave_masked_prefix_tokens_out():
    bigram, key = m.Bigram(V, nnx.Rngs(0)), jax.random.key(3)
    enc = data.CharTokenizer.from_texts(["the quick brown fox jumps over a lazy dog"])
    mask = np.array([c != " " for c in "the fox"])  # the space: a padding token
    slow = infer.generate_completion_slow(
        bigram, enc, "the fox", attn_mask=mask, num_completions=2, max_length=T, key=key
    )
    unmasked = infer.generate_completions(
        bigram, enc, "thefox", num_completions=2, max_length=T - 1, key=key
    )
    assert slow == unmasked and all(t.startswith("thefox") for t in slow)
    assert infer.generate_completion_fast is infer.generate_completion_slow
    plain = dict(num_completions=2, max_length=T, key=key)
    assert infer.generate_completion_slow(bigram, enc, "the fox", **plain) == (
        infer.generate_completions(bigram, enc, "the fox", **plain)
    )
    with pytest.raises(ConfigError, match=r"attn_mask has shape \(3,\): it must be \(7,\)"):
        infer.generate_completion_slow(bigram, enc, "the fox", attn_mask=mask[:3])


def test_generate_chat_writes_chatml_and_stops_at_a_stop_strings_first_token(capsys):
    model = m.GPT(dataclasses.replace(TINY_CONFIGS[m.GPT], block_size=256), nnx.Rngs(0))
    chatml = (  # the original's chatml.py, written out
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    )
    enc = data.CharTokenizer.from_texts([chatml + "Because."])
    kwargs = dict(enc=enc, system_prompt="Be brief.", format="chatml", key=jax.random.key(0))
    first = np.asarray(infer.generate_chat(model, question="Why?", **kwargs))
    prompt = enc.encode(chatml)
    assert first.shape[0] == 1 and first[0, : len(prompt)].tolist() == prompt
    reply = first[0, len(prompt) :].tolist()
    # the random model drew "<", the first token of "<|im_end|>", before the block was full
    assert 0 < len(reply) < 256 - len(prompt) and enc.encode("<")[0] not in reply
    assert capsys.readouterr().out == enc.decode(reply) + "\n"
    second = np.asarray(infer.generate_chat(model, first, question="Why?", **kwargs))
    follow_up = enc.encode("<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n")
    assert second[0, : first.shape[1] + len(follow_up)].tolist() == [
        *first[0].tolist(),
        *follow_up,
    ]  # no system prompt in a conversation that has begun
    plain = np.asarray(infer.generate_chat(model, question="Why?", enc=enc, key=jax.random.key(0)))
    assert plain[0, :4].tolist() == enc.encode("Why?")
    with pytest.raises(ConfigError, match="format='xml' is not one of 'completion', 'chatml'"):
        infer.generate_chat(model, enc=enc, format="xml")
    with pytest.raises(ConfigError, match=r"x_prev has shape \(2, 3\): a chat continues one"):
        infer.generate_chat(model, np.zeros((2, 3), int), enc=enc)


def test_generate_chat_stops_decoding_at_the_first_of_several_stop_tokens(monkeypatch):
    # stop strings of different first tokens were cut from the reply after decoding ran on
    # until the block was full
    model = m.GPT(dataclasses.replace(TINY_CONFIGS[m.GPT], block_size=256), nnx.Rngs(0))
    enc = data.CharTokenizer.from_texts(["<|im_start|>user\nWhy?<|im_end|>\n Because."])
    drawn, generate_ = [], generation.generate

    def recorded(*args, **kwargs):
        out = generate_(*args, **kwargs)
        drawn.append(out.completions()[0])
        return out

    monkeypatch.setattr(generation, "generate", recorded)
    stops = ("<|im_end|>", "e")  # first tokens "<" and "e"
    kwargs = dict(enc=enc, question="Why?", stop_tokens=stops, key=jax.random.key(0))
    ids = np.asarray(infer.generate_chat(model, **kwargs))[0].tolist()
    first = {enc.encode(stop)[0] for stop in stops}
    [new] = drawn
    assert new[-1] in first and not first & set(new[:-1])  # decoding stopped at the first
    assert ids == enc.encode("Why?") + new[:-1]  # the reply without it


def test_get_and_update_param_walk_the_cores_dotted_paths():
    model = build(m.GPT)
    state = nnx.state(model)
    weight = utils.get_param(state, "params.blocks.0.attn.q.weight")
    np.testing.assert_array_equal(weight, model.functional_params().blocks[0].attn.q.weight)
    nnx.update(model, utils.update_param(state, "params.ln_f.scale", np.full(32, 2.0)))
    np.testing.assert_array_equal(model.functional_params().ln_f.scale, np.full(32, 2.0))
    for path, message in [
        ("params.blocks.0.atn.q.weight", r"params\.blocks\.0 holds \['attn', 'ln_1'"),
        ("params.ln_f", r"params\.ln_f holds several params \(\['bias', 'scale'\]\)"),
        ("params.ln_f.scale.x", r"params\.ln_f\.scale is a param already"),
    ]:
        with pytest.raises(ConfigError, match=message):
            utils.get_param(state, path)
    with pytest.raises(ConfigError, match=r"has shape \(32,\), the value \(3,\)"):
        utils.update_param(state, "params.ln_f.scale", np.zeros(3))


def test_checkpointers_and_hf_helpers_use_the_originals_paths_and_local_checkpoints(tmp_path):
    model = build(m.GPT)
    checkpointers.save_checkpoint(model, tmp_path, "run", 3)
    assert (tmp_path / "gpt" / "checkpoints" / "run" / "checkpoint-3.pt").is_dir()
    loaded = checkpointers.load_checkpoint(m.GPT, tmp_path, model.config, "run", 3)
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
    same(loaded.functional_params(), model.functional_params())

    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    checkpointers.save_optimizer_state(tmp_path, "run", model.config, optimizer)
    fresh = nnx.Optimizer(build(m.GPT, seed=1), optax.adam(1e-3), wrt=nnx.Param)
    checkpointers.load_optimizer_state(model.config, fresh, tmp_path, "run", 0)
    same(nnx.state(fresh.opt_state), nnx.state(optimizer.opt_state))

    hf.save_pretrained(model.functional_params(), model.model_config(), tmp_path / "gpt2")
    gpt = gpt_module.from_huggingface_pretrained(nnx.Rngs(0), tmp_path / "gpt2")
    same(gpt.functional_params(), model.functional_params())
    smol = build(m.SmolLM)
    hf.save_pretrained(smol.functional_params(), smol.model_config(), tmp_path / "smol")
    loaded = smol_lm.from_hf_pretrained(None, nnx.Rngs(0), tmp_path / "smol")
    assert loaded.config.rope_theta == pytest.approx(1e-4)
    same(loaded.functional_params(), smol.functional_params())
    fits = r"model\.n_kv_head=2 does not fit GPTConfig, which has n_kv_head=4"
    with pytest.raises(ConfigError, match=fits):
        m.GPTConfig.from_model_config(smol.model_config())


def test_from_hf_pretrained_keeps_the_configs_dtypes_and_attention(tmp_path):
    """The original builds SmolLM(config) and loads the weights into it; only name, dtype and
    use_cache were kept here, so param_dtype and sdpa_implementation were silently dropped."""
    smol = build(m.SmolLM)
    hf.save_pretrained(smol.functional_params(), smol.model_config(), tmp_path / "smol")
    config = m.SmolLM_Config(
        name="mine", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, sdpa_implementation="slow"
    )  # SmolLM-135M's shape: the checkpoint's comes from its config.json
    loaded = smol_lm.from_hf_pretrained(config, nnx.Rngs(0), tmp_path / "smol")
    fields = ("name", "dtype", "param_dtype", "sdpa_implementation", "vocab_size", "n_layer")
    want = ["mine", jnp.bfloat16, jnp.bfloat16, "slow", V, 2]
    assert [getattr(loaded.config, f) for f in fields] == want
    same = lambda got, saved: np.testing.assert_array_equal(
        np.asarray(got),
        np.asarray(saved).astype(jnp.bfloat16),
        strict=True,  # dtype too
    )
    jax.tree.map(same, loaded.functional_params(), smol.functional_params())


def adam_state_saved_after_a_step(model, output_dir):
    """An Adam optimizer of ``model`` after one update (nonzero moments), saved at step 1."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), nnx.state(model, nnx.Param))
    nnx.jit(lambda optimizer, model, grads: optimizer.update(model, grads))(optimizer, model, grads)
    checkpointers.save_optimizer_state(output_dir, "run", model.config, optimizer)
    return optimizer


def test_load_optimizer_state_of_an_unreadable_or_foreign_directory_is_one_sentence(tmp_path):
    """Orbax's FileNotFoundError, tensorstore's errors and orbax's tree-structure or shape
    ValueErrors (pages of metadata) came through, and another param dtype was cast silently;
    saving over a step saved already was orbax's ValueError, which said nothing to do."""
    model = build(m.GPT)
    saved = adam_state_saved_after_a_step(model, tmp_path)
    fresh = nnx.Optimizer(build(m.GPT, seed=1), optax.adam(1e-3), wrt=nnx.Param)
    checkpointers.load_optimizer_state(model.config, fresh, tmp_path, "run", 1)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(fresh), nnx.state(saved))
    runs = tmp_path / "gpt" / "optimizer_checkpoints" / "run"
    with pytest.raises(ConfigError, match=rf"^{runs / 'step-1'} exists already, and a checkpoint"):
        checkpointers.save_optimizer_state(tmp_path, "run", model.config, fresh)
    truncated = shutil.copytree(runs / "step-1", runs / "step-2")
    for file in truncated.rglob("*"):
        if file.is_file() and file.stat().st_size > 100:
            file.write_bytes(file.read_bytes()[:50])
    for step in (3, 2):  # missing, damaged
        with pytest.raises(ConfigError, match=rf"^{runs / f'step-{step}'} cannot be read as a"):
            checkpointers.load_optimizer_state(model.config, fresh, tmp_path, "run", step)
    deeper = dataclasses.replace(TINY_CONFIGS[m.GPT], n_layer=3)
    in_bf16 = dataclasses.replace(TINY_CONFIGS[m.GPT], param_dtype=jnp.bfloat16)
    its_bias = "its opt_state.0.mu.params.blocks.0.attn.k.bias is float32 (2, 32)"
    others = [
        (deeper, optax.adam(1e-3), f"{its_bias}, this optimizer's float32 (3, 32)"),
        (in_bf16, optax.adam(1e-3), f"{its_bias}, this optimizer's bfloat16 (2, 32)"),
        (
            deeper,
            optax.sgd(1e-3, momentum=0.9),
            "this optimizer's opt_state.0.trace.params.blocks.0.attn.k.bias (float32 (3, 32)) is "
            "not in it",
        ),
        (deeper, optax.sgd(1e-3), "it holds opt_state.0.count, which this optimizer has not"),
    ]
    for config, tx, difference in others:
        message = f"{runs / 'step-1'} holds the state of another model or optimizer ("
        with pytest.raises(ConfigError, match="^" + re.escape(f"{message}{difference}): load")):
            optimizer = abstract_optimizer(config, tx)
            checkpointers.load_optimizer_state(config, optimizer, tmp_path, "run", 1)


def abstract_optimizer(config, tx):
    """``nnx.Optimizer(GPT(config), tx)`` with nothing initialised."""
    return nnx.eval_shape(lambda: nnx.Optimizer(m.GPT(config, nnx.Rngs(0)), tx, wrt=nnx.Param))


def test_convert_to_hf_never_overwrites_a_directory_that_holds_files(tmp_path):
    """It wrote config.json and model.safetensors over those of the directory it was given."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my own")
    with pytest.raises(ConfigError, match=rf"^path={mine} already holds files \(config\.json\)"):
        smol_lm.convert_to_hf(build(m.SmolLM), mine)
    assert [p.name for p in mine.iterdir()] == ["config.json"]
    assert (mine / "config.json").read_text() == "my own"


@pytest.mark.parametrize("field, value", [("dtype", "float33"), ("param_dtype", None)])
def test_a_value_that_is_no_dtype_is_one_sentence_naming_it(field, value):
    """A misspelt dtype raised numpy's TypeError; None became float64, reported as such."""
    with pytest.raises(ConfigError, match=rf"^{field}={value!r} is not a dtype: use jnp"):
        m.GPTConfig(**TINY, **{field: value}).model_config()


@pytest.mark.parametrize("rope_theta", [0, -1e-4, float("nan")])
def test_a_rope_theta_without_a_base_is_one_sentence_naming_it(rope_theta):
    """rope_theta is the reciprocal of HF's base (NNX_API.md §5): 0 has none (it divided by
    zero), and a negative one was reported as the core's rope_base."""
    with pytest.raises(ConfigError, match=rf"^rope_theta={rope_theta!r} must be a positive"):
        m.RoPE_GPTConfig(**TINY, rope_theta=rope_theta).model_config()


@pytest.mark.parametrize("cls", [m.GPTConfig, m.SmolLM_Config, m.Tiny_MoE_Config])
def test_from_model_config_gives_the_originals_jnp_dtypes(cls):
    """The original's configs hold jax.numpy's scalar types (NNX_API.md §3: jnp.float32,
    jnp.bfloat16), not numpy's or ml_dtypes'."""
    original = cls()
    config = cls.from_model_config(original.model_config())
    for name in ("dtype", "param_dtype"):
        assert getattr(config, name) is getattr(original, name), name
    assert repr(config) == repr(original)


@nnx.jit
def original_train_step(model, optimizer, x, y):
    return train_step(model, optimizer, x, y)[0]


def test_create_sharded_model_places_params_by_the_core_rules_and_trains_as_one_device():
    """jax.make_mesh gives Explicit axes, on which the sharded model's first product raised
    ShardingTypeError ("Contracting dimensions are sharded"); a mesh without the rules' axes
    (the original's ("devices",)) raised KeyError: 'tensor'."""
    config, x, y = TINY_CONFIGS[m.GPT], *batch(b=4)
    mesh = jax.make_mesh((2, 2, 2, 1), sharding.MESH_AXES)  # data, fsdp, tensor, expert
    sharded = utils.create_sharded_model(m.GPT, config, nnx.Rngs(0), mesh)
    wte = sharded.functional_params().wte.weight  # (V, D): rows over tensor and fsdp
    assert wte.sharding.spec == jax.sharding.PartitionSpec(("tensor", "fsdp"), None)
    assert utils.count_params(sharded) == sharded.model_config().n_params
    one = m.GPT.from_params(jax.device_get(sharded.functional_params()), config)
    losses = [
        original_train_step(model, nnx.Optimizer(model, optax.sgd(0.3), wrt=nnx.Param), x, y)
        for model in (sharded, one)
    ]
    np.testing.assert_allclose(*losses, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        sharded.functional_params(),
        one.functional_params(),
    )
    devices = jax.sharding.Mesh(np.array(jax.devices()), ("devices",))
    with pytest.raises(ConfigError, match=r"^the mesh's axes are \('devices',\), but the sharding"):
        utils.create_sharded_model(m.GPT, config, nnx.Rngs(0), devices)


def original_charformer_logits(tree, idx, n_head):
    """The original Charformer's forward pass in numpy (its source, flax's LayerNorm
    epsilon 1e-6): per-head attention scaled by 1 / sqrt(features), ReLU MLP, biased head."""
    v = lambda node: np.asarray(node["value"], np.float64)

    def norm(p, x):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-6) * v(p["scale"]) + v(p["bias"])

    def linear(p, x):
        return x @ v(p["kernel"]) + (v(p["bias"]) if "bias" in p else 0)

    t = idx.shape[1]
    x = v(tree["embed"]["embedding"])[idx] + v(tree["pos_emb"]["embedding"])[:t]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(len(tree["blocks"])):
        block, h = tree["blocks"][str(i)], norm(tree["blocks"][str(i)]["ln1"], x)
        heads = []
        for j in range(n_head):
            head = block["heads"][str(j)]
            q, k = linear(head["query"], h), linear(head["key"], h)
            scores = np.where(causal, q @ k.transpose(0, 2, 1), -np.inf) * x.shape[-1] ** -0.5
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append(weights / weights.sum(-1, keepdims=True) @ linear(head["value"], h))
        x = x + linear(block["proj"], np.concatenate(heads, -1))
        ffwd = block["ffwd"]
        x = x + linear(
            ffwd["linear2"], np.maximum(linear(ffwd["linear1"], norm(block["ln2"], x)), 0)
        )
    return linear(tree["lm_head"], norm(tree["ln"], x))


def test_the_original_charformers_tree_loads_and_computes_the_originals_logits():
    f, n_head = 32, 4
    rng = np.random.default_rng(0)
    arr = lambda *shape: {"value": (0.3 * rng.standard_normal(shape)).astype(np.float32)}
    linear = lambda a, b: {"kernel": arr(a, b), "bias": arr(b)}
    norm = lambda: {"scale": arr(f), "bias": arr(f)}
    block = lambda: {
        "heads": {
            str(j): {name: {"kernel": arr(f, f // n_head)} for name in ("key", "query", "value")}
            for j in range(n_head)
        },
        "proj": linear(f, f),
        "ffwd": {"linear1": linear(f, 4 * f), "linear2": linear(4 * f, f)},
        "ln1": norm(),
        "ln2": norm(),
    }
    tree = {
        "embed": {"embedding": arr(V, f)},
        "pos_emb": {"embedding": arr(T, f)},
        "blocks": {str(i): block() for i in range(2)},
        "ln": norm(),
        "lm_head": linear(f, V),
    }
    model = build(m.Charformer)
    model.load_original_tree(tree)
    model.eval()
    x, _ = batch()
    logits, _ = call_and_reference(model, x)
    want = original_charformer_logits(tree, np.asarray(x), n_head)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    back = dict(jax.tree_util.tree_flatten_with_path(model.original_tree())[0])
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        np.testing.assert_allclose(back[path], value, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_from_hf_pretrained_without_a_path_reads_the_checkpoint_its_config_names(
    tmp_path, monkeypatch
):
    """The original loads ``config.name`` (NNX_API.md §3: SmolLM uses it as the HF model id;
    §9: ``load_hf_pretrained(model_name=config.name)``), the one way it has to choose a
    checkpoint. Here a call without ``path`` fetched SmolLM-135M whatever the config named, and
    the model it returned carried the config's name over another checkpoint's weights (online,
    SmolLM-360M's name over SmolLM-135M's)."""

    def no_hub(*args, **kwargs):
        raise OSError("no network in tests: the hub was asked for " + repr(args[:1]))

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_hub)
    smol = build(m.SmolLM)
    hf.save_pretrained(smol.functional_params(), smol.model_config(), tmp_path / "smol")
    config = m.SmolLM_Config(name=str(tmp_path / "smol"))
    loaded = smol_lm.from_hf_pretrained(config, nnx.Rngs(0))
    assert loaded.config.name == str(tmp_path / "smol")
    jax.tree.map(
        np.testing.assert_array_equal, loaded.functional_params(), smol.functional_params()
    )
    for default in (None, m.SmolLM_Config()):  # "SmolLM" names no checkpoint: SmolLM-135M's
        with pytest.raises(hf.CheckpointError, match="'HuggingFaceTB/SmolLM-135M'"):
            smol_lm.from_hf_pretrained(default, nnx.Rngs(0))


def test_a_rope_base_goes_through_from_hf_pretrained_and_convert_to_hf_unchanged(tmp_path):
    """rope_theta is the reciprocal of HF's base, and 1 / (1 / 100000) is 99999.99999999999 in
    floats: SmolLM2's rope_theta=100000 came back from ``convert_to_hf`` as 99999.99999999999 in
    config.json, and a jaxpt run started from that export with
    --config.model.rope_base=100000 was refused as a different model (``hf.check_fields``)."""
    smol = build(m.SmolLM)
    cfg = dataclasses.replace(smol.model_config(), rope_base=100000.0)
    hf.save_pretrained(smol.functional_params(), cfg, tmp_path / "smollm2")
    loaded = smol_lm.from_hf_pretrained(None, nnx.Rngs(0), tmp_path / "smollm2")
    assert loaded.model_config().rope_base == 100000.0
    smol_lm.convert_to_hf(loaded, tmp_path / "back")
    hf_config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert hf_config["rope_theta"] == 100000.0
    hf.check_init_from(cfg, str(tmp_path / "back"))  # a run at the source's base starts from it
    for base in (5000.0, 10000.0, 500000.0, 1e6, 12345.678):  # other bases, in memory
        back = m.SmolLM_Config.from_model_config(dataclasses.replace(cfg, rope_base=base))
        assert back.model_config().rope_base == base, base


def test_from_checkpoint_refuses_a_config_whose_rope_theta_is_not_the_checkpoints(tmp_path):
    """A checkpoint of a RoPE class holds its table ``h.0.attn.omega``, which the original
    restores with the params, so it computes with the rope_theta the checkpoint was saved at.
    Here the table was checked for its shape alone and the config's rope_theta used: a config
    at another base loaded without a word and computed other logits than the original would."""
    config = dataclasses.replace(TINY_CONFIGS[m.SmolLM], rope_theta=1e-4)
    build(m.SmolLM, config=config).save_checkpoint(tmp_path / "ckpt")
    other = dataclasses.replace(config, rope_theta=1e-2)
    with pytest.raises(ConfigError, match=r"rope_theta"):
        m.SmolLM.from_checkpoint(tmp_path / "ckpt", nnx.Rngs(0), other)
    m.SmolLM.from_checkpoint(tmp_path / "ckpt", nnx.Rngs(0), config)  # its own base loads


@pytest.mark.parametrize("head_width", [48, 64])
def test_the_originals_bfloat16_rope_table_loads_at_its_own_rope_theta(tmp_path, head_width):
    """The original computes its table in config.dtype: in bfloat16 each angle is off by up to
    2% (head width 48, 2048 positions), which is no other rope_theta."""
    import orbax.checkpoint as ocp

    config = dataclasses.replace(
        TINY_CONFIGS[m.SmolLM], block_size=2048, n_embed=2 * head_width, n_head=2, n_kv_head=1
    )
    tree = build(m.SmolLM, config=config).original_tree()
    tree["h"]["0"]["attn"]["omega"]["value"] = original_omega(config, jnp.bfloat16)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "original", tree)
    checkpointer.wait_until_finished()
    m.SmolLM.from_checkpoint(tmp_path / "original", nnx.Rngs(0), config)
    other = dataclasses.replace(config, rope_theta=1e-5)
    with pytest.raises(ConfigError, match=r"another rope_theta .* \(1e-05\)"):
        m.SmolLM.from_checkpoint(tmp_path / "original", nnx.Rngs(0), other)
