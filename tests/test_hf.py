"""Hugging Face interop: logits and greedy generation against transformers, round trips,
errors that name the offending key, init_from for training and sampling, the command line.

Every model is a tiny random-init transformers model built here (no downloads), its weights
perturbed so that norms and biases are not at their init values.
"""

import dataclasses
import fnmatch
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="HF parity needs torch, which is not in the lock: see the README's Tests"
)
transformers = pytest.importorskip("transformers", reason="HF parity needs transformers")

from safetensors.numpy import load_file  # noqa: E402

from jaxpt import data, generate, hf, launcher, models, train  # noqa: E402
from jaxpt.errors import ConfigError  # noqa: E402
from jaxpt.hf import _files as hf_files  # noqa: E402
from jaxpt.hf.__main__ import export_checkpoint, import_checkpoint  # noqa: E402
from tests.conftest import interrupt_while_importing  # noqa: E402
from tests.test_models import perturbed, tiny_config  # noqa: E402
from tests.test_train import ROOT, char_config  # noqa: E402

NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def gpt2(**overrides):
    sizes = dict(vocab_size=99, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2Config(**{**sizes, **NO_SPECIAL_TOKENS, **overrides})


def llama(**overrides):
    sizes = dict(
        vocab_size=101,
        max_position_embeddings=32,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaConfig(**{**sizes, **NO_SPECIAL_TOKENS, **overrides})


HF_CONFIGS = {
    "gpt2": gpt2(),
    "gpt2_untied_relu": gpt2(tie_word_embeddings=False, activation_function="relu", n_inner=48),
    "llama_gqa_untied_biases": llama(
        rope_theta=5000.0, tie_word_embeddings=False, attention_bias=True, mlp_bias=True
    ),
    "llama_gqa_tied": llama(
        vocab_size=99,
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}


def hf_model(config, seed=0):
    """A float32 eval-mode model with every weight perturbed by N(0, 0.1)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()


def jaxpt_logits(cfg, params, tokens):
    apply = functools.partial(models.get(cfg.name).apply, cfg=cfg)
    return np.asarray(jax.jit(apply)(params, jnp.asarray(tokens))[0])


def random_tokens(cfg, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, cfg.block_size))


@pytest.mark.parametrize("case", HF_CONFIGS)
def test_imported_logits_match_transformers(case):
    model = hf_model(HF_CONFIGS[case])
    cfg, params, tokenizer = hf.from_pretrained(model)
    tokens = random_tokens(cfg)
    np.testing.assert_allclose(
        jaxpt_logits(cfg, params, tokens), hf_logits(model, tokens), atol=1e-4, rtol=0
    )
    assert tokenizer is None  # no tokenizer.json, and not GPT-2's vocabulary


def test_config_fields_come_from_the_hf_config():
    llama_cfg = hf.config_from_hf(HF_CONFIGS["llama_gqa_untied_biases"].to_dict())
    assert llama_cfg.name == "smollm" and llama_cfg.dtype == llama_cfg.param_dtype == "float32"
    assert (llama_cfg.n_head, llama_cfg.n_kv_head, llama_cfg.n_embed) == (4, 2, 64)
    assert (llama_cfg.vocab_size, llama_cfg.block_size, llama_cfg.rope_base) == (101, 32, 5000.0)
    assert not llama_cfg.tie_embeddings and llama_cfg.attention_bias and llama_cfg.mlp_bias
    gpt2_cfg = hf.config_from_hf(HF_CONFIGS["gpt2_untied_relu"].to_dict(), dtype="bfloat16")
    assert (gpt2_cfg.name, gpt2_cfg.activation, gpt2_cfg.n_mlp_hidden) == ("gpt", "relu", 48)
    assert not gpt2_cfg.tie_embeddings and gpt2_cfg.dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"model\.n_layer comes from the checkpoint \(n_layer=2"):
        hf.config_from_hf(HF_CONFIGS["gpt2"].to_dict(), n_layer=4)


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_scaling={"rope_type": "default"}),  # transformers: 10000, not 5000
        dict(rope_scaling={"type": "default", "rope_theta": 300.0}),
        dict(rope_scaling={"rope_type": "default"}, rope_theta=700.0),
        dict(rope_scaling=None, rope_theta=700.0),
    ],
)
def test_the_rope_base_is_the_one_transformers_reads(rope):
    """config.json's rope_scaling, where set, replaces its rope_parameters (transformers 5):
    rope_parameters' rope_theta was read instead."""
    hf_config = with_keys(llama(), rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    hf_config |= rope
    theirs = transformers.LlamaConfig.from_dict(hf_config).rope_parameters["rope_theta"]
    assert hf.config_from_hf(hf_config).rope_base == theirs


@pytest.mark.parametrize("case", HF_CONFIGS)
def test_hf_to_jaxpt_to_hf_gives_identical_tensors(case, tmp_path):
    model = hf_model(HF_CONFIGS[case])
    model.save_pretrained(tmp_path / "hf")
    cfg, params, _ = hf.from_pretrained(tmp_path / "hf")
    hf.save_pretrained(params, cfg, tmp_path / "back")
    want = load_file(tmp_path / "hf" / "model.safetensors")
    got = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "back", attn_implementation="eager"
    ).eval()
    tokens = random_tokens(cfg)
    np.testing.assert_array_equal(hf_logits(back, tokens), hf_logits(model, tokens))


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("gpt", {}),
        ("vgpt", {}),
        ("gpt", dict(activation="gelu", ln_epsilon=1e-2, tie_embeddings=False)),
        ("smollm", {}),
        ("smollm", dict(tie_embeddings=False)),
        (  # every field the Llama layout writes off its default
            "smollm",
            dict(n_kv_head=1, rope_base=50.0, ln_epsilon=1e-2, attention_bias=True, mlp_bias=True),
        ),
    ],
)
def test_saved_params_load_in_transformers_with_the_same_logits(preset, overrides, tmp_path):
    cfg = tiny_config(preset, **overrides)
    params = perturbed(models.get(preset).init(jax.random.key(0), cfg))
    hf.save_pretrained(params, cfg, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert type(model).__name__ == ("LlamaForCausalLM" if preset == "smollm" else "GPT2LMHeadModel")
    tokens = random_tokens(cfg)
    np.testing.assert_allclose(
        hf_logits(model, tokens), jaxpt_logits(cfg, params, tokens), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("case", ["gpt2", "llama_gqa_untied_biases"])
def test_greedy_generation_matches_transformers(case):
    model = hf_model(HF_CONFIGS[case])
    cfg, params, _ = hf.from_pretrained(model)
    prompts, new = [[5, 17, 3], [42, 7, 7, 1, 90]], 12
    ours = generate(params, prompts, cfg, max_new_tokens=new, temperature=0).completions()
    assert len({t for row in ours for t in row}) > 4  # not a degenerate repeat of one token
    longest = max(map(len, prompts))
    padded = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    greedy = functools.partial(model.generate, do_sample=False, max_new_tokens=new, pad_token_id=0)
    assert ours == greedy(padded, attention_mask=mask)[:, longest:].tolist()
    alone = torch.tensor([prompts[0]])
    assert ours[0] == greedy(alone, attention_mask=torch.ones_like(alone))[0, 3:].tolist()


def test_pytorch_weights_read_like_safetensors(tmp_path):
    model = hf_model(HF_CONFIGS["llama_gqa_tied"])
    model.save_pretrained(tmp_path / "st")
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    from_bin, from_st = hf.from_pretrained(tmp_path / "bin"), hf.from_pretrained(tmp_path / "st")
    jax.tree.map(np.testing.assert_array_equal, from_bin.params, from_st.params)
    for not_a_state_dict in (torch.zeros(3), {"lm_head.weight": [1.0]}):  # AttributeErrors
        torch.save(not_a_state_dict, tmp_path / "bin" / "pytorch_model.bin")
        with pytest.raises(hf.CheckpointError, match=r"pytorch_model\.bin holds a \w+, not a"):
            hf.from_pretrained(tmp_path / "bin")


def test_sharded_bfloat16_checkpoints_read_like_the_float32_model(tmp_path):
    model = hf_model(HF_CONFIGS["llama_gqa_untied_biases"])
    with torch.no_grad():
        for p in model.parameters():  # values bfloat16 holds exactly
            p.copy_(p.bfloat16().float())
    model.to(torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    from_sharded = hf.from_pretrained(tmp_path / "hf").params
    jax.tree.map(np.testing.assert_array_equal, from_sharded, hf.from_pretrained(model).params)
    cfg, params, _ = hf.from_pretrained(tmp_path / "hf", param_dtype="bfloat16")
    hf.save_pretrained(params, cfg, tmp_path / "back")
    got = load_file(tmp_path / "back" / "model.safetensors")
    for key, want in model.state_dict().items():  # bfloat16 bits, as torch holds them
        np.testing.assert_array_equal(got[key].view(np.int16), want.view(torch.int16).numpy())
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("case", ["gpt2_untied_relu", "llama_gqa_untied_biases"])
def test_a_tied_config_over_a_read_out_of_its_own_is_refused(case, tmp_path):
    """config.json says tie_word_embeddings=true over weights whose lm_head is not the
    embedding: transformers reads them untied, and the import read the embedding alone."""
    hf_model(HF_CONFIGS[case]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    read_out, embedding = theirs.lm_head.weight, theirs.get_input_embeddings().weight
    assert not torch.equal(read_out, embedding)  # what transformers computes with
    with pytest.raises(hf.CheckpointError, match=r"tie_word_embeddings=true, but .*'lm_head\."):
        hf.from_pretrained(tmp_path)


def test_base_model_keys_and_mask_buffers_of_older_gpt2_checkpoints(tmp_path):
    # The hub's gpt2 weights: keys without "transformer.", and causal-mask buffers
    model = hf_model(HF_CONFIGS["gpt2"])
    cfg, params, _ = hf.from_pretrained(model)
    state = {k.removeprefix("transformer."): v.numpy() for k, v in model.state_dict().items()}
    state |= {
        f"h.{i}.attn.{name}": np.ones((1, 1, 32, 32))
        for i in range(2)
        for name in ("bias", "masked_bias")
    }
    jax.tree.map(np.testing.assert_array_equal, hf.from_state_dict(state, cfg), params)


# SmolLM-135M's config.json as the hub serves it (transformers 4.x: rope_theta at the top)
SMOLLM_135M = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_act="silu",
    hidden_size=576,
    intermediate_size=1536,
    max_position_embeddings=2048,
    num_attention_heads=9,
    num_hidden_layers=30,
    num_key_value_heads=3,
    rms_norm_eps=1e-05,
    rope_scaling=None,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    vocab_size=49152,
    attention_bias=False,
    bos_token_id=0,
    eos_token_id=0,
)


def test_smollm_135m_config_is_the_smollm_preset():
    cfg = hf.config_from_hf(SMOLLM_135M)
    preset = models.get("smollm").default_config()
    for field in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embed", "n_mlp_hidden"):
        assert cfg.to_dict()[field] == preset.to_dict()[field], field
    assert (cfg.ln_epsilon, cfg.rope_base, cfg.tie_embeddings) == (1e-5, 10000.0, True)
    abstract = jax.eval_shape(lambda k: models.get("smollm").init(k, cfg), jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(abstract)) == 134_515_008
    assert hf.config_to_hf(cfg)["rope_theta"] == 10000.0


def word_tokenizer(directory, vocab_size):
    """A word-level tokenizer.json of ``vocab_size`` ids whose last is <|endoftext|>."""
    import tokenizers

    words = {f"w{i}": i for i in range(vocab_size - 1)} | {data.EOT: vocab_size - 1}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


def test_tokenizer_json_comes_along_and_goes_back(tmp_path):
    hf_model(HF_CONFIGS["llama_gqa_tied"]).save_pretrained(tmp_path / "hf")
    word_tokenizer(tmp_path / "hf", 99)
    cfg, params, tokenizer = hf.from_pretrained(tmp_path / "hf")
    assert isinstance(tokenizer, data.HFTokenizer) and tokenizer.eot_id == 98
    assert tokenizer.encode("w3 w5") == [3, 5]
    hf.save_pretrained(params, cfg, tmp_path / "back", tokenizer=tokenizer)
    tok_json = (tmp_path / "back" / "tokenizer.json").read_bytes()
    assert tok_json == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == 98


@pytest.mark.parametrize("companion", [None, {"eos_token": data.EOT}])
def test_a_gpt2_model_on_a_word_level_tokenizer_exports_one_transformers_reads(companion, tmp_path):
    """A tokenizer.json with no tokenizer_config.json (as ``tokenizers`` saves one), or one
    naming no class: transformers chose GPT2Tokenizer by the model_type, which reads only
    vocab.json and merges.txt, and encoded every text as []."""
    word_tokenizer(tmp_path, 99)
    if companion is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(companion))
    cfg = dataclasses.replace(tiny_config("gpt"), vocab_size=99)
    params = models.get("gpt").init(jax.random.key(0), cfg)
    tokenizer = data.get_tokenizer(tmp_path)
    hf.save_pretrained(params, cfg, tmp_path / "back", tokenizer=tokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert theirs.encode("w3 w5 w97", add_special_tokens=False) == [3, 5, 97]
    assert theirs.eos_token_id == (98 if companion else None)


def test_a_chat_template_in_its_own_file_goes_back(tmp_path):
    """transformers saves a tokenizer's chat template as chat_template.jinja: the imported
    tokenizer had no template, and an export left the file out."""
    hf_model(HF_CONFIGS["llama_gqa_tied"]).save_pretrained(tmp_path / "hf")
    word_tokenizer(tmp_path, 99)
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token=data.EOT
    )
    theirs.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    theirs.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "chat_template.jinja").is_file()
    cfg, params, tokenizer = hf.from_pretrained(tmp_path / "hf")
    assert tokenizer.chat_template == theirs.chat_template  # was None: only the config's read
    hf.save_pretrained(params, cfg, tmp_path / "back", tokenizer=tokenizer)
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back.chat_template == theirs.chat_template


def test_exported_bos_and_eos_ids_are_the_tokenizers(tmp_path):
    """A tokenizer whose bos differs from its eos (Llama's, SmolLM2's): config.json said
    bos_token_id = the eos id, which transformers' tokenizer of the same directory contradicts."""
    hf_model(HF_CONFIGS["llama_gqa_tied"]).save_pretrained(tmp_path / "hf")
    word_tokenizer(tmp_path / "hf", 99)
    special = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token="w1", eos_token=data.EOT)
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(special))
    cfg, params, tokenizer = hf.from_pretrained(tmp_path / "hf")
    hf.save_pretrained(params, cfg, tmp_path / "back", tokenizer=tokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 98)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (1, 98)


def special_ids_and_generation(path):
    """What transformers reads from ``path``: the model's and the tokenizer's special ids and
    the generation defaults."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    names = ("bos_token_id", "eos_token_id", "pad_token_id")
    return (
        [getattr(model.config, name) for name in names],
        [getattr(theirs, name) for name in names],
        model.generation_config.to_diff_dict(),
    )


def save_word_tokenizer(directory, **special_tokens):
    """``word_tokenizer`` of 99 ids as transformers saves it into ``directory``, with eos
    <|endoftext|> and ``special_tokens`` (``bos_token="w1"``, ...)."""
    word_tokenizer(directory, 99)
    transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"), eos_token=data.EOT, **special_tokens
    ).save_pretrained(directory)


def test_an_import_and_export_keep_the_pad_id_and_generation_defaults(tmp_path):
    """An import wrote pad_token_id=None and no generation_config.json: transformers then
    generated with no pad id and greedily, not with the source's sampling defaults."""
    model = hf_model(llama(vocab_size=99, bos_token_id=1, eos_token_id=98, pad_token_id=2))
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=1, eos_token_id=[98, 3], pad_token_id=2, do_sample=True, temperature=0.7
    )
    model.save_pretrained(tmp_path / "hf")
    save_word_tokenizer(tmp_path / "hf", bos_token="w1", pad_token="w2")
    source = special_ids_and_generation(tmp_path / "hf")
    assert source[0] == [1, 98, 2] and source[2]["temperature"] == 0.7
    cfg, params, _ = import_checkpoint(tmp_path / "hf", tmp_path / "imported")
    assert special_ids_and_generation(tmp_path / "imported") == source
    # the export of a run fine-tuned from the import (checkpoint.init_from=imported)
    tokenizer = data.get_tokenizer(tmp_path / "imported")
    tuned = hf.save_pretrained(
        params, cfg, tmp_path / "tuned", tokenizer=tokenizer, origin=tmp_path / "imported"
    )
    assert special_ids_and_generation(tuned) == source


def test_a_model_trained_on_an_imported_tokenizer_has_no_sampling_defaults_of_its_own(tmp_path):
    """A run from scratch on an imported model's tokenizer exported that model's
    generation_config.json (do_sample, temperature 0.7) as its own: generation defaults follow
    the model's weights in transformers (model.save_pretrained writes them, a tokenizer's
    save_pretrained does not)."""
    model = hf_model(llama(vocab_size=99))
    model.generation_config = transformers.GenerationConfig(do_sample=True, temperature=0.7)
    model.save_pretrained(tmp_path / "hf")
    save_word_tokenizer(tmp_path / "hf", bos_token="w1", pad_token="w2")
    tokenizer = data.get_tokenizer(tmp_path / "hf")
    cfg = hf.config_from_hf(model.config.to_dict())
    params = models.get(cfg.name).init(jax.random.key(0), cfg)
    hf.save_pretrained(params, cfg, tmp_path / "scratch", tokenizer=tokenizer)
    ids, tokenizer_ids, generation = special_ids_and_generation(tmp_path / "scratch")
    assert ids == tokenizer_ids == [1, 98, 2]
    # what transformers derives from config.json: the ids, and greedy search at temperature 1
    assert not {"do_sample", "temperature"} & set(generation)
    assert [generation["bos_token_id"], generation["eos_token_id"]] == [1, 98]


def test_an_import_keeps_every_eos_id_and_a_pad_id_only_config_json_sets(tmp_path):
    """Llama 3's config.json lists several eos ids, and a pad id may be set there alone: an
    import wrote the tokenizer's one eos id and no pad id, so transformers (which derives the
    generation defaults of a checkpoint without generation_config.json from config.json)
    generated past the second eos and with no pad id."""
    model = hf_model(llama(vocab_size=99, bos_token_id=1, eos_token_id=[98, 3], pad_token_id=5))
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").unlink()
    save_word_tokenizer(tmp_path / "hf", bos_token="w1")  # no pad_token
    source = special_ids_and_generation(tmp_path / "hf")
    assert source[0] == [1, [98, 3], 5] and source[2]["eos_token_id"] == [98, 3]
    import_checkpoint(tmp_path / "hf", tmp_path / "imported")
    imported = special_ids_and_generation(tmp_path / "imported")
    assert imported[:2] == source[:2]  # the model's and the tokenizer's ids
    generation_ids = [
        {k: v for k, v in g.items() if k.endswith("token_id")} for g in (imported[2], source[2])
    ]
    assert generation_ids[0] == generation_ids[1]  # was eos 98 alone, no pad


def test_a_gpt2_vocabulary_brings_gpt2s_tokenizer_and_exports_it(tmp_path):
    model = hf_model(gpt2(vocab_size=50257, n_embd=8, n_head=2, n_layer=1))
    cfg, params, tokenizer = hf.from_pretrained(model)
    assert isinstance(tokenizer, data.Gpt2Tokenizer)
    hf.save_pretrained(params, cfg, tmp_path, tokenizer=tokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world, said the tokenizer."
    assert theirs(text)["input_ids"] == tokenizer.encode(text)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 50256


def test_a_gpt2_vocabulary_beside_another_bpe_does_not_bring_gpt2s_tokenizer(tmp_path):
    """A GPT-2 of 50257 ids whose directory holds its own vocab.json and merges.txt (no
    tokenizer.json) came with GPT-2's BPE, which encodes text to other ids than the model's
    tokenizer, and --to=jaxpt wrote GPT-2's vocab.json over the model's own."""
    model = hf_model(gpt2(vocab_size=50257, n_embd=8, n_head=2, n_layer=1))
    model.save_pretrained(tmp_path / "gpt2")
    gpt2_files = hf_files._tokenizer_files(data.Gpt2Tokenizer())
    for name in ("vocab.json", "merges.txt"):  # GPT-2's own files: its BPE comes along
        (tmp_path / "gpt2" / name).write_bytes(gpt2_files[name])
    assert isinstance(hf.from_pretrained(tmp_path / "gpt2").tokenizer, data.Gpt2Tokenizer)
    vocab = json.loads(gpt2_files["vocab.json"])
    vocab["Hello"], vocab["world"] = vocab["world"], vocab["Hello"]  # another BPE's ids
    (tmp_path / "gpt2" / "vocab.json").write_text(json.dumps(vocab))
    text = "Hello world"
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "gpt2")(text)["input_ids"]
    assert theirs != data.Gpt2Tokenizer().encode(text)
    assert hf.from_pretrained(tmp_path / "gpt2").tokenizer is None


def test_a_llama_trained_on_gpt2s_tokenizer_exports_one_transformers_loads(tmp_path):
    """configs/smollm.py trains on GPT-2's BPE: with model_type llama and no tokenizer_config,
    AutoTokenizer looked for a SentencePiece file and raised."""
    cfg = dataclasses.replace(tiny_config("smollm"), vocab_size=50304)
    params = models.get("smollm").init(jax.random.key(0), cfg)
    tokenizer = data.get_tokenizer("gpt2")
    hf.save_pretrained(params, cfg, tmp_path, tokenizer=tokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world, said the tokenizer."
    assert theirs(text)["input_ids"] == tokenizer.encode(text)
    assert theirs.eos_token_id == tokenizer.eot_id


def test_saved_files_get_the_mode_of_any_new_file(tmp_path):
    """Under a umask of 027 every file is rw-r----- (safetensors alone would write 0600, which
    no one else may read)."""
    cfg = tiny_config("gpt")
    params = models.get("gpt").init(jax.random.key(0), cfg)
    previous = os.umask(0o027)
    try:
        hf.save_pretrained(params, cfg, tmp_path, tokenizer=data.get_tokenizer("gpt2"))
    finally:
        os.umask(previous)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in tmp_path.iterdir()}
    assert modes == dict.fromkeys(
        ["config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"],
        "0o640",
    )


def test_save_pretrained_never_overwrites_a_users_files(tmp_path):
    """Saving fine-tuned params back into the checkpoint directory they came from wrote over
    its config.json and model.safetensors."""
    model = hf_model(HF_CONFIGS["gpt2"])
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    cfg, params, _ = hf.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"already holds files \(config\.json, generation_"):
        hf.save_pretrained(jax.tree.map(lambda a: a + 1, params), cfg, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_an_empty_current_directory_is_an_out_like_any_other(tmp_path, monkeypatch):
    """`--out=.` in an empty directory passed the checks, read the whole checkpoint, then
    ended in a ValueError traceback ('PosixPath('.') has an empty name') naming its lock."""
    cfg = tiny_config("gpt")
    params = perturbed(models.get("gpt").init(jax.random.key(0), cfg))
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    hf.save_pretrained(params, cfg, ".")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # its lock went
    reloaded = hf.from_pretrained(tmp_path / "out")
    jax.tree.map(np.testing.assert_array_equal, reloaded.params, params)


@pytest.mark.parametrize("out_exists", [False, True])
def test_a_save_interrupted_mid_file_leaves_out_as_it_was(out_exists, tmp_path, monkeypatch):
    """Ctrl-C while the last file (config.json) was half-written left model.safetensors and the
    temporary in --out, which the command run again then refused (it holds files). What the
    save wrote goes: a new --out, and an empty one stays empty; the interrupt goes on."""
    cfg = tiny_config("gpt")
    params = models.get("gpt").init(jax.random.key(0), cfg)
    out, write_atomic = tmp_path / "parent" / "out", hf_files._write_atomic
    if out_exists:
        out.mkdir(parents=True)

    def interrupted_in_config(path, write):
        if path.name != "config.json":
            return write_atomic(path, write)

        def half_then_ctrl_c(tmp):
            tmp.write_bytes(b'{"architectures": ')
            raise KeyboardInterrupt

        write_atomic(path, half_then_ctrl_c)

    monkeypatch.setattr(hf_files, "_write_atomic", interrupted_in_config)
    with pytest.raises(KeyboardInterrupt):
        hf.save_pretrained(params, cfg, out)
    assert sorted(p.name for p in (tmp_path / "parent").iterdir()) == (
        ["out"] if out_exists else []
    )
    assert not out.exists() or not any(out.iterdir())
    monkeypatch.setattr(hf_files, "_write_atomic", write_atomic)  # run again: it writes
    hf.save_pretrained(params, cfg, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


COMMAND_CUT_SHORT = """
import sys
from absl import app
import jaxpt.hf.__main__ as command
where = sys.argv.pop(1)
def ctrl_c(*args, **kwargs):  # once: print is the builtin again
    del vars(command)[where]
    raise KeyboardInterrupt
setattr(command, where, ctrl_c)
command._define_flags()
app.run(command._main, flags_parser=command.parse_flags("jaxpt.hf"))
"""


def run_cut_short(cwd, where: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m jaxpt.hf <args>`` in ``cwd``, Ctrl-C pressed where it first calls the command
    module's ``where`` (``import_checkpoint``; ``print``: as it prints its closing lines)."""
    script = [sys.executable, "-c", COMMAND_CUT_SHORT, where, *args]
    return subprocess.run(script, cwd=cwd, capture_output=True, text=True)


def test_ctrl_c_in_the_command_is_one_line(tmp_path):
    result = run_cut_short(  # a KeyboardInterrupt traceback
        tmp_path, "import_checkpoint", "--to=jaxpt", "--source=gpt2", "--out=out"
    )
    assert result.returncode == 130
    assert result.stderr == (
        "jaxpt.hf: interrupted (SIGINT); --out is as it was: run the command again.\n"
    )


def test_ctrl_c_while_the_command_imports_is_one_line(tmp_path):
    """Ctrl-C in the seconds jax and the rest import, most of them the package's before its
    __main__ runs, printed a KeyboardInterrupt traceback."""
    status, said, imported = interrupt_while_importing(
        ["-m", "jaxpt.hf", "--to=jaxpt", "--source=gpt2", f"--out={tmp_path / 'out'}"]
    )
    assert "jaxpt.train" not in imported  # the interrupt came while it imported
    assert (status, said) == (
        130,
        ["jaxpt.hf: interrupted (SIGINT); --out is as it was: run the command again.\n"],
    )
    assert not (tmp_path / "out").exists()


def test_ctrl_c_after_the_command_wrote_out_says_out_is_complete(tmp_path):
    """Ctrl-C as the import printed its closing lines said that what it had written of --out was
    gone, which it was not: --out held the whole checkpoint."""
    cfg = tiny_config("gpt")
    source = hf.save_pretrained(models.get("gpt").init(jax.random.key(0), cfg), cfg, tmp_path / "a")
    result = run_cut_short(tmp_path, "print", "--to=jaxpt", f"--source={source}", "--out=b")
    assert (result.returncode, result.stdout) == (130, "")
    assert result.stderr == (
        "jaxpt.hf: interrupted (SIGINT); --out holds a complete checkpoint: it is ready to use.\n"
    )
    assert hf.from_pretrained(tmp_path / "b").config == cfg


def test_commands_writing_one_out_at_once_take_turns_and_the_later_writes_nothing(
    tmp_path, monkeypatch
):
    """`python -m jaxpt.hf ... --out=DIR` started on each host of a job at once: each found DIR
    new and wrote into it under the same temporary names (one could stop with a traceback, or
    rename another's half-written file under a complete config.json). Now the first writes; the
    second waits for it, then says in one sentence that another process wrote DIR, exit 1."""
    cfg = tiny_config("gpt")
    params = models.get("gpt").init(jax.random.key(0), cfg)
    source = hf.save_pretrained(params, cfg, tmp_path / "source")
    firsts = jax.tree.map(lambda a: a + 1, params)
    reference = hf.save_pretrained(firsts, cfg, tmp_path / "reference")
    out, second, write_atomic = tmp_path / "out", [], hf_files._write_atomic

    def first_file_starts_a_second_command(path, write):
        if not second:
            command = ["-m", "jaxpt.hf", "--to=jaxpt", f"--source={source}", f"--out={out}"]
            pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            second.append(subprocess.Popen([sys.executable, *command], cwd=ROOT, **pipes))
            second.append(second[0].stdout.readline())  # blocks until it waits, or ends
        write_atomic(path, write)

    monkeypatch.setattr(hf_files, "_write_atomic", first_file_starts_a_second_command)
    hf.save_pretrained(firsts, cfg, out)
    _, stderr = second[0].communicate(timeout=120)
    assert second[1] == f"waiting for another process to finish writing {out}\n"
    assert second[0].returncode == 1 and stderr == (
        f"jaxpt.hf: {out} was written meanwhile by another process (the same command started "
        "more than once at a time?); this one wrote nothing there.\n"
    )
    files = lambda directory: {p.name: p.read_bytes() for p in directory.iterdir()}
    assert files(out) == files(reference)  # the first's, each file whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference", "source"]


def with_keys(config, **entries):
    return {**config.to_dict(), **entries}


@pytest.mark.parametrize(
    ("hf_config", "message"),
    [
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "model_type='qwen2'"),
        (
            with_keys(llama(), rope_parameters={"rope_type": "linear", "factor": 2.0}),
            "rope_parameters=",
        ),
        (
            with_keys(llama(), rope_parameters=None, rope_scaling={"type": "dynamic"}),
            "rope_scaling=",
        ),
        (  # transformers 5 reads rope_scaling over a default rope_parameters
            with_keys(llama(), rope_scaling={"rope_type": "linear", "factor": 2.0}),
            "rope_scaling=",
        ),
        (with_keys(llama(), head_dim=32), "head_dim=32"),
        (  # was a TypeError traceback from float()
            with_keys(llama(), rope_parameters={"rope_type": "default", "rope_theta": None}),
            "config.json: rope_theta=None must be a number",
        ),
        (with_keys(llama(), hidden_act="gelu"), "hidden_act='gelu'"),
        (
            with_keys(gpt2(), scale_attn_by_inverse_layer_idx=True),
            "scale_attn_by_inverse_layer_idx",
        ),
        (with_keys(gpt2(), activation_function="tanh"), "activation_function='tanh'"),
    ],
)
def test_unsupported_hf_configs_name_the_key(hf_config, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        hf.config_from_hf(hf_config)


@pytest.mark.parametrize(
    "head, config",
    [
        ("LlamaForSequenceClassification", llama(num_labels=3)),
        ("LlamaForQuestionAnswering", llama(tie_word_embeddings=True)),
        ("GPT2ForTokenClassification", gpt2(num_labels=3)),
    ],
)
def test_a_task_head_checkpoint_is_one_sentence_naming_its_architecture(head, config, tmp_path):
    """A classifier's config.json has the model_type of its language model: the import failed
    on a symptom (no 'lm_head.weight', an extra 'score.weight', no 'model.embed_tokens.weight'
    for a QA model whose body is 'transformer.')."""
    model = getattr(transformers, head)(config)
    model.save_pretrained(tmp_path)
    sentence = rf"architectures \['{head}'\]: a {head} checkpoint holds a task head"
    for source in (tmp_path, model):
        with pytest.raises(hf.CheckpointError, match=sentence):
            hf.from_pretrained(source)


def test_a_base_model_with_tied_embeddings_reads_as_its_language_model():
    """As AutoModelForCausalLM reads it: the read-out is the token embedding."""
    model = hf_model(llama(tie_word_embeddings=True))
    cfg, params, _ = hf.from_pretrained(model.model)  # LlamaModel: no lm_head
    tokens = random_tokens(cfg)
    np.testing.assert_allclose(
        jaxpt_logits(cfg, params, tokens), hf_logits(model, tokens), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    ("hf_config", "message"),
    [  # was a ZeroDivisionError, TypeErrors, sizes made up, and jaxpt's field names
        (with_keys(llama(), num_attention_heads=0), "sets num_attention_heads=0, which must be"),
        (with_keys(llama(), hidden_size=None), "sets hidden_size=None, which must be"),
        (with_keys(llama(), num_key_value_heads=0), "sets num_key_value_heads=0, which must"),
        (with_keys(gpt2(), n_embd="64"), "sets n_embd='64', which must be a positive integer"),
        (with_keys(gpt2(), n_inner=0), "sets n_inner=0, which must be a positive integer"),
        (with_keys(gpt2(), n_layer=-2), "sets n_layer=-2, which must be a positive integer"),
        (
            with_keys(llama(), num_key_value_heads=3),
            "num_attention_heads=4 is not divisible by num_key_value_heads=3",
        ),
        (
            with_keys(llama(), num_attention_heads=5, num_key_value_heads=5, head_dim=None),
            "hidden_size=64 is not divisible by num_attention_heads=5",
        ),
        (with_keys(gpt2(), layer_norm_epsilon=0), "layer_norm_epsilon=0.0 must be a finite"),
    ],
)
def test_bad_sizes_in_config_json_name_the_key(hf_config, message):
    with pytest.raises(hf.CheckpointError, match=re.escape(message)) as error:
        hf.config_from_hf(hf_config)
    assert str(error.value).endswith("correct config.json or fetch the checkpoint again.")
    assert "model." not in str(error.value)


def test_a_bad_size_is_one_sentence_before_any_weights_are_read(tmp_path):
    (tmp_path / "hf").mkdir()  # config.json alone: reading weights would fail otherwise
    (tmp_path / "hf" / "config.json").write_text(json.dumps(with_keys(llama(), hidden_size=0)))
    message = (
        "config.json sets hidden_size=0, which must be a positive integer: correct config.json "
        "or fetch the checkpoint again."
    )
    with pytest.raises(hf.CheckpointError, match=f"^{re.escape(message)}$"):
        import_checkpoint(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_name_the_first_offending_key(tmp_path):
    model = hf_model(HF_CONFIGS["gpt2"])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 48}))
    with pytest.raises(
        hf.CheckpointError,
        match=re.escape(
            "'transformer.wte.weight' has shape (99, 32), but the config needs (99, 48)"
        ),
    ):
        hf.from_pretrained(tmp_path)
    cfg = hf.config_from_hf(HF_CONFIGS["gpt2"].to_dict())
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    with pytest.raises(hf.CheckpointError, match=r"'score\.weight' \(1 such tensors\)"):
        hf.from_state_dict({**state, "score.weight": np.zeros((2, 32))}, cfg)
    del state["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(hf.CheckpointError, match=r"no 'transformer\.h\.1\.mlp\.c_fc\.bias'"):
        hf.from_state_dict(state, cfg)


@pytest.mark.parametrize(
    ("preset", "message"),
    [
        ("rope_gpt", "model.mixer='mlp' does not fit LlamaForCausalLM"),
        ("gqa_gpt", "model.attention_bias=False does not fit GPT2LMHeadModel"),
        ("nope_gpt", "model.position='none' has no Hugging Face layout"),
        ("tiny_moe", "model.mixer='moe,glu' does not fit LlamaForCausalLM"),
        ("bigram", "model.name='bigram' has no Hugging Face layout"),
    ],
)
def test_configs_without_an_hf_layout_name_the_field(preset, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        hf.config_to_hf(tiny_config(preset))


def test_init_from_is_a_checkpoint_setting_checked_with_the_run_config():
    config = char_config()
    config.checkpoint.init_from = None
    with pytest.raises(ConfigError, match=r"checkpoint\.init_from=None must be a checkpoint"):
        train.validate_config(config)


def test_missing_sources_get_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(hf.CheckpointError, match="is not a checkpoint directory"):
        hf.from_pretrained(tmp_path / "missing")
    with pytest.raises(hf.CheckpointError, match=r"has no config\.json"):
        hf.from_pretrained(tmp_path)

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(hf.CheckpointError, match="could not be fetched from the Hugging Face hub"):
        hf.from_pretrained("someone/some-model")


def test_an_unreachable_hub_is_one_sentence_at_once_and_a_cached_snapshot_loads(
    tmp_path, monkeypatch, hub_session
):
    """snapshot_download's first request has no timeout: a hub behind a proxy that accepts and
    never answers held `--to=jaxpt --source=gpt2` silent for minutes. Now the hub is asked once,
    briefly, and the hub cache is read offline (HF_HUB_OFFLINE's mode), at once."""
    hub_session.error = TimeoutError("timed out")
    cached = {}

    def cache_only(name, **kwargs):
        if not huggingface_hub.constants.HF_HUB_OFFLINE:
            raise AssertionError("the unreachable hub asked again")
        if name not in cached:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        return cached[name]

    monkeypatch.setattr("huggingface_hub.snapshot_download", cache_only)
    with pytest.raises(hf.CheckpointError) as error:
        hf.from_pretrained("someone/tiny")
    assert str(error.value) == (
        "'someone/tiny' is not a local directory and could not be fetched from the Hugging Face "
        "hub (https://huggingface.co did not answer (timed out), and it is not cached): check "
        "the name and the network, or pass a directory."
    )
    cfg = tiny_config("gpt")
    params = models.get("gpt").init(jax.random.key(0), cfg)
    cached["someone/tiny"] = hf.save_pretrained(params, cfg, tmp_path / "snapshot")
    assert hf.from_pretrained("someone/tiny").config.n_layer == cfg.n_layer
    assert not huggingface_hub.constants.HF_HUB_OFFLINE  # as it was


def pytorch_only_hub_repo(directory, sharded):
    """A hub repository of a llama with PyTorch .bin weights only (one file, or two shards and
    their index), as an older model's."""
    model = hf_model(HF_CONFIGS["llama_gqa_tied"])
    model.config.save_pretrained(directory)
    state = model.state_dict()
    if not sharded:
        torch.save(state, directory / "pytorch_model.bin")
        return
    names = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[:5],
        "pytorch_model-00002-of-00002.bin": names[5:],
    }
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, directory / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("sharded", [False, True])
def test_a_hub_model_of_pytorch_weights_only_is_one_sentence_saying_what_to_do(
    sharded, tmp_path, monkeypatch
):
    """A hub name fetches no .bin files: a sharded repository said 'pytorch_model-00001-of-00002.bin
    is missing: the checkpoint is incomplete; fetch it again', which never helped, and a single
    file that the snapshot 'holds no weights: expected ... pytorch_model.bin'."""
    repo = tmp_path / "repo"
    repo.mkdir()
    pytorch_only_hub_repo(repo, sharded)
    snapshot = tmp_path / "snapshot"

    def download(name, allow_patterns, **kwargs):  # the hub's filter on the repository's files
        snapshot.mkdir(exist_ok=True)
        for file in repo.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, snapshot)
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", download)
    with pytest.raises(hf.CheckpointError) as error:
        import_checkpoint("someone/old-model", tmp_path / "out")
    assert str(error.value) == (
        "the hub snapshot of 'someone/old-model' holds no safetensors weights (a hub name "
        "fetches no PyTorch .bin files): download the repository (hf download someone/old-model "
        "--local-dir DIR) and pass that directory."
    )
    assert not (tmp_path / "out").exists()
    for file in repo.glob("*.bin"):  # the hub cache holds them (transformers fetched them)
        shutil.copy(file, snapshot)
    assert hf.from_pretrained("someone/old-model").config.n_head == 8


# ----------------------------------------------------------------------------- init_from


def smoke_gpt2_dir(path, **overrides):
    """An HF GPT-2 of the gpt preset's smoke shape on the char corpus (char_config)."""
    sizes = dict(vocab_size=128, n_positions=64, n_embd=64, n_head=4, n_layer=2)
    config = gpt2(**{**sizes, **overrides})
    hf_model(config).save_pretrained(path)
    return str(path)


def test_training_starts_from_init_from_and_exports(tmp_path, capsys):
    config = char_config(steps=2, lr=1e-9, warmup_steps=0)  # lr ~ 0: params stay put
    config.checkpoint.init_from = smoke_gpt2_dir(tmp_path / "hf", eos_token_id=[5, 7])
    config.eval.batches = 1
    state = train.train(
        config, tmp_path / "run", init_params=launcher.pretrained_params(config, tmp_path / "run")
    )
    assert int(state.step) == 2
    assert f"initialised params from {tmp_path / 'hf'}" in capsys.readouterr().out
    imported = hf.from_pretrained(tmp_path / "hf").params
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), state.params, imported)

    def never():
        raise AssertionError("a resumed run read the init_from checkpoint")

    assert int(train.train(config, tmp_path / "run", init_params=never).step) == 2
    export_checkpoint(config, tmp_path / "run", tmp_path / "out")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    want = load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(exported) == sorted(want)
    np.testing.assert_allclose(
        exported["transformer.wte.weight"], want["transformer.wte.weight"], atol=1e-6
    )
    # the fine-tuned model keeps its origin's ids and generation defaults (the char tokenizer
    # has no HF form: there were none)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").eos_token_id == [5, 7]
    out, source = (tmp_path / name / "generation_config.json" for name in ("out", "hf"))
    assert out.read_bytes() == source.read_bytes()
    # the origin moved away: one sentence naming the field, before the run's checkpoint is read
    # (it was the origin's own message, not naming checkpoint.init_from, after)
    (tmp_path / "hf").rename(tmp_path / "moved")
    with pytest.raises(ConfigError, match=r"^checkpoint\.init_from='.*/hf', the checkpoint this"):
        export_checkpoint(config, tmp_path / "never read", tmp_path / "out2")
    with pytest.raises(ConfigError) as refused:  # the reason quoted without its full stop
        export_checkpoint(config, tmp_path / "never read", tmp_path / "out2")
    assert ".)" not in str(refused.value)
    assert not (tmp_path / "out2").exists()
    config.checkpoint.init_from = ""
    export_checkpoint(config, tmp_path / "run", tmp_path / "out2")  # without the origin's
    assert not (tmp_path / "out2" / "generation_config.json").exists()


def test_init_from_that_does_not_fit_fails_before_compiling(tmp_path):
    config = char_config()
    config.checkpoint.init_from = smoke_gpt2_dir(tmp_path / "hf", n_embd=32)
    with pytest.raises(
        ConfigError,
        match=r"model\.n_embed=64 does not match checkpoint\.init_from=.* 32 \(n_embd in its",
    ):
        launcher.run(config, workdir=str(tmp_path / "run"), mode="train")
    assert not (tmp_path / "run").exists()


def test_generate_mode_samples_from_init_from_without_a_checkpoint(tmp_path, capsys):
    config = char_config()
    config.checkpoint.init_from = smoke_gpt2_dir(tmp_path / "hf")
    options = launcher.SampleOptions(prompt="The ", num_samples=1, max_new_tokens=6, temperature=0)
    (text,) = launcher.sample(config, tmp_path / "run", options)
    assert "sampling from checkpoint.init_from" in capsys.readouterr().out
    tokenizer = data.run_tokenizer(config.data)
    prompt = tokenizer.encode("The ")
    params = hf.from_pretrained(tmp_path / "hf").params
    new = generate(
        params,
        [prompt],
        models.config_from(config.model),
        max_new_tokens=6,
        temperature=0,
        stop_token=tokenizer.eot_id,
        n_tokens=tokenizer.vocab_size,
    )
    completion = new.completions()[0]
    assert text == tokenizer.decode(prompt + completion)
    # a second end-of-sequence id (Llama 3 Instruct lists two), where transformers' generate
    # stops too: sampling went on past it, to end-of-text only
    second = completion[2]
    eos = {"eos_token_id": [tokenizer.eot_id, second]}
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(eos))
    (text,) = launcher.sample(config, tmp_path / "run", options)
    assert text == tokenizer.decode(prompt + completion[: completion.index(second) + 1])


def test_command_line_imports_a_checkpoint(tmp_path):
    source = smoke_gpt2_dir(tmp_path / "hf")
    result = subprocess.run(
        [sys.executable, "-m", "jaxpt.hf", "--to=jaxpt", f"--source={source}", "--out=out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"--config.checkpoint.init_from={tmp_path / 'out'}" in result.stdout
    assert "--config.model.n_embed=64" in result.stdout
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(got) == sorted(load_file(f"{source}/model.safetensors"))
    missing = subprocess.run(
        [sys.executable, "-m", "jaxpt.hf", "--to=hf", "--out=x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "--to=hf needs --config" in missing.stderr


@pytest.mark.parametrize("to", ["jaxpt", "hf"])
def test_command_line_refuses_an_out_directory_holding_files(tmp_path, to):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("a user's file\n")
    run = ["--config=configs/gpt.py:smoke", "--workdir=x"]
    source = ["--source=gpt2"] if to == "jaxpt" else run
    result = subprocess.run(
        [sys.executable, "-m", "jaxpt.hf", f"--to={to}", *source, f"--out={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"jaxpt.hf: --out={out} already holds files (config.json), which this command does not "
        "overwrite: choose a new or empty --out.\n"
    )
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_text() == "a user's file\n"


def test_command_line_refuses_a_positional_argument_in_one_sentence(tmp_path):
    result = subprocess.run(  # printed the whole --help
        [sys.executable, "-m", "jaxpt.hf", "--to=jaxpt", "--source=gpt2", "--out=out", "extra"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "jaxpt.hf: unexpected arguments 'extra'; pass each as --flag=value.\n"
    ), result.stderr
    assert not (tmp_path / "out").exists()


def test_a_damaged_checkpoint_is_one_sentence_naming_the_file(tmp_path):
    source = Path(smoke_gpt2_dir(tmp_path / "hf"))
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # what an interrupted download leaves
    result = subprocess.run(
        [sys.executable, "-m", "jaxpt.hf", "--to=jaxpt", f"--source={source}", "--out=out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"jaxpt.hf: {weights} cannot be read"), result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
    weights.unlink()
    index = source / "model.safetensors.index.json"
    for weight_map in ([], {"transformer.wte.weight": 1}):  # the second was a TypeError
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(hf.CheckpointError, match=r"index\.json has no weight_map of tensor"):
            hf.from_pretrained(source)
    (source / "config.json").write_text('{"model_type": "gpt2",')
    with pytest.raises(hf.CheckpointError, match=r"config\.json is not valid JSON"):
        hf.from_pretrained(source)
    (source / "config.json").write_text("[1, 2]")  # JSON, no object: an AttributeError
    with pytest.raises(hf.CheckpointError, match=r"config\.json is not a JSON object"):
        hf.from_pretrained(source)


@pytest.mark.parametrize(
    ("to", "ignored"),
    [
        ("jaxpt", ["--workdir=runs/mine"]),  # as if the import went into a run's workdir
        ("jaxpt", ["--config=configs/gpt.py:smoke"]),  # as if it chose the preset
        ("hf", ["--source=gpt2"]),  # as if it named the checkpoint to export
    ],
)
def test_command_line_refuses_a_flag_its_direction_does_not_read(tmp_path, to, ignored):
    """``--to=jaxpt`` read neither --workdir nor --config and ``--to=hf`` not --source, yet
    each was accepted without a word: the import ran as if they were not there, the export
    failed (or succeeded) for its own reasons. A flag the command does not read is one
    sentence naming it, before anything is read or written."""
    source = smoke_gpt2_dir(tmp_path / "hf")
    args = (
        [f"--source={source}"]
        if to == "jaxpt"
        else ["--config=configs/gpt.py:smoke", f"--workdir={tmp_path / 'run'}"]
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxpt.hf",
            f"--to={to}",
            *args,
            *ignored,
            f"--out={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    flag = ignored[0].split("=")[0]
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("jaxpt.hf: ") and flag in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_the_printed_launch_command_runs_as_printed_from_a_path_with_spaces(tmp_path, capsys):
    """``--to=jaxpt`` prints the launch.py command to paste, but its paths were not quoted:
    an --out with a space (``~/My Models/...``) split --config.checkpoint.init_from and
    --workdir into two words each, and the pasted command failed."""
    hf_model(HF_CONFIGS["llama_gqa_tied"]).save_pretrained(tmp_path / "hf")
    out = tmp_path / "my models" / "small llama"
    import_checkpoint(tmp_path / "hf", out)
    printed = capsys.readouterr().out
    command = printed.split("Fine-tune or sample with", 1)[1].replace("\\\n", " ")
    words = shlex.split(command)
    assert words[:3] == ["uv", "run", "python"], words
    assert f"--config.checkpoint.init_from={out.absolute()}" in words, words
    assert "--workdir=runs/small llama" in words, words
    assert "--config.model.n_embed=64" in words, words


@pytest.mark.parametrize("source", [None, False, 3])
def test_a_source_that_is_no_path_hub_name_or_model_is_one_sentence(source):
    """Anything that is not a str or os.PathLike was taken for a transformers model: None, or
    the original's positional ``sharded`` flag (``smol_lm.from_hf_pretrained(config, rngs,
    False)``), was an AttributeError ('bool' object has no attribute 'config') from inside
    jaxpt.hf."""
    with pytest.raises((ConfigError, TypeError), match=r"directory|hub name"):
        hf.from_pretrained(source)
