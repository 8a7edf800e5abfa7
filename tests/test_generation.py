"""Generation: cached decoding against full forward passes, padding, sampling filters, CLI."""

import dataclasses
import functools
import json
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt import data, generate, generation, launcher, memory, models, train
from jaxpt.errors import ConfigError
from jaxpt.generation import Generated, Sampling, _generate, filter_logits, pad_prompts, sample
from tests.test_models import perturbed, tiny_config
from tests.test_train import ROOT, load_config

PROMPTS = [[5, 17, 3], [42, 7, 7, 1, 90]]  # different lengths: a padded batch
NEW = 6


def greedy_by_full_forward(apply, params, prompt, n):
    """Reference: re-run the whole growing sequence (unpadded, no cache) for each token."""
    tokens = list(prompt)
    for _ in range(n):
        logits, _ = apply(params, jnp.asarray([tokens]))
        tokens.append(int(jnp.argmax(logits[0, -1])))
    return tokens[len(prompt) :]


def greedy_reference(apply, params, prompt, completion, cfg) -> list[int]:
    """The greedy completion of ``prompt`` as long as ``completion``, unpadded and without a
    cache. A cacheable model's logits at a position are fixed by the tokens up to it, so one
    forward pass over the prompt and ``completion`` (which must be greedy for the result to
    equal it) gives every choice; a model whose earlier logits change as the sequence grows
    (Soft MoE; top-k MoE, whose capacity grows with the length) re-runs the growing sequence
    (one compile per length)."""
    if not cfg.is_cacheable:
        return greedy_by_full_forward(apply, params, prompt, len(completion))
    logits, _ = apply(params, jnp.asarray([prompt + completion[:-1]]))
    return np.argmax(logits[0, len(prompt) - 1 :], axis=-1).tolist()


def generation_cases():
    cases = [(name, {}) for name in models.names()]
    # top-k MoE whose capacity can never drop a choice is cacheable; check that path too
    cases.append(("tiny_moe_2", dict(load_factor=4.0)))
    # the presets unroll their layers; decoding scanned ones keeps them stacked
    cases.append(("gqa_glu_rope_gpt", dict(scan_layers=True)))
    return cases


@pytest.mark.parametrize(("name", "overrides"), generation_cases())
def test_greedy_with_cache_equals_full_forward_and_padding_changes_nothing(name, overrides):
    # perturbed: at init the tied models repeated the last prompt token, so a cache that
    # dropped every earlier position still matched the full forward passes
    cfg = tiny_config(name, **overrides)
    params = perturbed(models.get(name).init(jax.random.key(0), cfg), std=0.3)
    out = generate(params, PROMPTS, cfg, max_new_tokens=NEW, temperature=0)
    assert len({t for row in out.completions() for t in row}) > 2, out.completions()
    apply = jax.jit(functools.partial(models.get(name).apply, cfg=cfg))
    for prompt, completion in zip(PROMPTS, out.completions(), strict=True):
        assert completion == greedy_reference(apply, params, prompt, completion, cfg)
    np.testing.assert_array_equal(out.lengths, [len(p) + NEW for p in PROMPTS])
    for prompt, row, length in zip(PROMPTS, np.asarray(out.tokens), out.lengths, strict=True):
        np.testing.assert_array_equal(row[: len(prompt)], prompt)
        assert (row[length:] == 0).all()


@pytest.mark.parametrize("name", ["gpt", "tiny_moe_2"])  # learned positions; no cache, causal
def test_the_block_plus_one_last_token_is_computable(name):
    # the last new token is drawn from the logits at block_size - 1 and never fed back, so a
    # prompt of 10 and 7 new tokens fit a block of 16; they were refused
    cfg = tiny_config(name)
    params = models.get(name).init(jax.random.key(0), cfg)
    prompt = list(range(1, 11))
    (completion,) = generate(params, [prompt], cfg, max_new_tokens=7, temperature=0).completions()
    logits, _ = models.get(name).apply(params, jnp.asarray([prompt + completion[:-1]]), cfg)
    assert completion == np.argmax(logits[0, 9:], axis=-1).tolist()  # causal: greedy in one pass


def test_which_models_use_the_cache():
    cacheable = {
        name
        for name in models.names()
        if models.get(name).init_cache(1, 4, tiny_config(name)) is not None
    }
    assert cacheable == set(models.names()) - {"tiny_moe", "tiny_moe_2", "tiny_moe_3"}
    assert tiny_config("tiny_moe_2", load_factor=4.0).is_cacheable


def test_gqa_caches_only_the_kv_heads():
    cfg = tiny_config("gqa_glu_rope_gpt")
    assert cfg.n_kv_head < cfg.n_head
    (cache,) = models.get("gqa_glu_rope_gpt").init_cache(3, 12, cfg)
    assert cache.k.shape == cache.v.shape == (cfg.n_layer, 3, 12, cfg.n_kv_head, cfg.head_dim)


def compiled_generate(cfg, params) -> str:
    """The compiled HLO of greedy ``generate`` on ``PROMPTS`` (this machine's backend)."""
    tokens, lengths = pad_prompts(PROMPTS, cfg, max_new_tokens=NEW)
    greedy = Sampling(temperature=0.0)
    args = params, tokens, lengths, jax.random.key(0)
    lowered = _generate.lower(*args, cfg=cfg, max_new_tokens=NEW, sampling=greedy, stops=())
    return lowered.compile().as_text()


def ops_in_the_decoding_loop(hlo: str, scope: str) -> set[str]:
    """The opcodes of the compiled instructions that JAX op ``scope`` became inside the token
    loop (``while/body`` in their op name)."""
    pattern = re.compile(rf'=\s+\S+\s+([\w-]+)\(.*op_name="[^"]*while/body[^"]*/{scope}"')
    return {m[1] for m in pattern.finditer(hlo)}


@pytest.mark.parametrize("name", ["gpt", "gqa_glu_rope_gpt"])
def test_decoding_steps_do_not_restack_the_projection_weights(name):
    # q/k/v (and a GLU's gate/up) run as one matmul of their weights stacked in the matmul's
    # own layout: the stack is loop-invariant, and XLA:CPU builds it once a call (XLA:GPU
    # does not hoist it); stacked on a leading axis, a transpose copied it every token
    cfg = tiny_config(name, scan_layers=False)
    hlo = compiled_generate(cfg, models.get(name).init(jax.random.key(0), cfg))
    assert "/stack" in hlo  # the scope the stacking runs under
    assert ops_in_the_decoding_loop(hlo, "stack") <= {"bitcast"}


def test_unrolled_layers_leave_their_stacks_before_the_decoding_loop():
    # split inside the loop, XLA:GPU copied every layer's weights out of the stacks each token
    # (a quarter of a batch-32 token on an H200)
    cfg = tiny_config("gpt", scan_layers=False)
    hlo = compiled_generate(cfg, models.get("gpt").init(jax.random.key(0), cfg))
    assert "/split" in hlo
    assert ops_in_the_decoding_loop(hlo, "split") == set()


@pytest.fixture(scope="module")
def gpt():
    cfg = tiny_config("gpt")
    return cfg, models.get("gpt").init(jax.random.key(1), cfg)


def test_padded_batch_samples_like_each_prompt_alone_when_greedy(gpt):
    cfg, params = gpt
    greedy = functools.partial(generate, params, cfg=cfg, max_new_tokens=NEW, temperature=0)
    together = greedy(PROMPTS).completions()
    alone = [greedy([p]).completions()[0] for p in PROMPTS]
    assert together == alone


def test_top_k_1_is_greedy_and_a_key_fixes_the_samples(gpt):
    cfg, params = gpt
    run = functools.partial(generate, params, PROMPTS, cfg, max_new_tokens=NEW)
    greedy = run(temperature=0).completions()
    top1 = run(top_k=1, key=jax.random.key(3)).completions()
    assert top1 == greedy
    draw = lambda seed: run(temperature=1.5, key=jax.random.key(seed)).completions()
    assert draw(4) == draw(4)
    assert draw(4) != draw(5)


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = jnp.log(jnp.asarray([probs], jnp.float32))

    def kept(p):
        filtered = filter_logits(logits, Sampling(temperature=1.0, top_p=p))
        return set(np.flatnonzero(np.isfinite(np.asarray(filtered[0]))).tolist())

    assert kept(0.3) == {1}  # the most likely token alone already reaches 0.3
    assert kept(0.5) == {1}
    assert kept(0.6) == {1, 3}
    assert kept(0.8) == {1, 3}
    assert kept(0.81) == {1, 3, 2}
    assert kept(1.0) == {0, 1, 2, 3}
    many = jax.random.normal(jax.random.key(0), (2, 50304)) * 3  # GPT-2's vocabulary
    assert jnp.isfinite(filter_logits(many, Sampling(temperature=1.0, top_p=1.0))).all()


def filtered_probs64(logits: np.ndarray, temperature: float, k, p) -> np.ndarray:
    """Reference: float64 next-token probabilities of one row after top-k, then top-p over the
    top-k set renormalised (the smallest prefix, most likely first, whose mass reaches p)."""
    scaled = logits.astype(np.float64) / temperature
    order = np.argsort(-scaled, kind="stable")
    keep = np.zeros(len(scaled), bool)
    keep[order[: k or len(scaled)]] = True
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    if p is not None:
        reached = np.searchsorted(np.cumsum(probs[order]), p) + 1
        keep[order[reached:]] = False
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


def test_sampling_probabilities_equal_a_float64_reference():
    rng = np.random.default_rng(0)
    for k, p, temperature in [(None, None, 0.7), (5, None, 1.0), (None, 0.6, 1.3), (8, 0.9, 0.5)]:
        logits = rng.normal(size=(3, 40)) * 2
        filtered = filter_logits(jnp.asarray(logits, jnp.float32), Sampling(temperature, k, p))
        probs = np.asarray(jax.nn.softmax(filtered, axis=-1))
        for row, got in zip(logits, probs, strict=True):
            want = filtered_probs64(row, temperature, k, p)
            np.testing.assert_array_equal(got > 0, want > 0)  # the same set of tokens
            np.testing.assert_allclose(got, want, atol=1e-6)


def test_top_k_filter_and_temperature():
    logits = jnp.asarray([[1.0, 4.0, 2.0, 3.0]])
    filtered = filter_logits(logits, Sampling(temperature=2.0, top_k=2))
    np.testing.assert_array_equal(filtered, [[-np.inf, 0.0, -np.inf, -0.5]])  # (l - 4) / 2


@pytest.mark.parametrize("temperature", [1e-30, 2e-38, 1e-38, 1e-40, 1e-45, 1e-300])
def test_tiny_temperatures_draw_the_most_likely_token(temperature):
    # logits / temperature overflowed float32 (to inf, or 0 / a flushed subnormal to NaN), and
    # token 0 or 1 was drawn whatever the logits
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 10
    most_likely = np.argmax(np.asarray(logits, np.float64), axis=-1)
    for sampling in (Sampling(temperature), Sampling(temperature, top_k=5, top_p=0.9)):
        for seed in range(3):
            drawn = sample(jax.random.key(seed), logits, sampling)
            np.testing.assert_array_equal(drawn, most_likely)


def test_bfloat16_logits_are_sampled_in_float32():
    # the presets' logits_dtype: with bfloat16 noise the 0.001 token was never drawn
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.04, 0.009, 0.001]])).astype(jnp.bfloat16)
    keys = jax.random.split(jax.random.key(1), 2000)
    for sampling in (Sampling(1.0), Sampling(0.7, top_k=5, top_p=0.99)):

        def draws(x, sampling=sampling):
            return jax.vmap(lambda key: sample(key, x, sampling)[0])(keys)

        np.testing.assert_array_equal(draws(logits), draws(logits.astype(jnp.float32)))


def test_n_tokens_keeps_padded_ids_out(gpt):
    cfg, params = gpt
    out = generate(
        params, PROMPTS, cfg, max_new_tokens=NEW, temperature=3.0, key=jax.random.key(0), n_tokens=9
    )
    assert max(max(c) for c in out.completions()) < 9


def test_each_sequence_stops_at_the_stop_token():
    # a bigram table that walks 1 -> 2 -> 3 -> 1 ... greedily, and 4 -> 5 -> 6 -> 7 ...
    cfg = dataclasses.replace(models.get("bigram").default_config(), vocab_size=10)
    table = np.full((10, 10), -5.0, np.float32)
    for a, b in [(1, 2), (2, 3), (3, 1), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 4)]:
        table[a, b] = 5.0
    params = models.get("bigram").init(jax.random.key(0), cfg)
    params = eqx.tree_at(lambda p: p.table.weight, params, jnp.asarray(table))
    out = generate(params, [[1], [4, 5]], cfg, max_new_tokens=6, temperature=0, stop_token=3)
    assert out.completions() == [[2, 3], [6, 7, 8, 9, 4, 5]]
    np.testing.assert_array_equal(out.lengths, [3, 8])


@pytest.fixture
def decode_steps(monkeypatch) -> list:
    """The steps of ``generate``'s decode loop, one entry each, reported by the device as they
    run (the prefill draws the first new token; each step feeds one and draws the next)."""
    steps, prefill_and_step = [], generation._prefill_and_step

    def counted(*args, **kwargs):
        prefill, step = prefill_and_step(*args, **kwargs)

        def counted_step(tokens, lengths, cache):
            jax.debug.callback(lambda: steps.append(1))
            return step(tokens, lengths, cache)

        return prefill, counted_step

    monkeypatch.setattr(generation, "_prefill_and_step", counted)
    _generate.clear_cache()  # traced again, with the count
    yield steps
    _generate.clear_cache()


def greedy_until(apply, params, prompt, n: int, stop: list[int]) -> list[int]:
    """Reference: greedy new tokens, one forward pass each over the sequence so far (padded
    to the block: causal, so the padding changes nothing), until there are ``n`` or they end
    with ``stop``."""
    block = np.zeros((1, len(prompt) + n), np.int32)
    tokens = list(prompt)
    while len(tokens) < len(prompt) + n and not _ends_with(tokens[len(prompt) :], stop):
        block[0, : len(tokens)] = tokens
        logits, _ = apply(params, jnp.asarray(block[:, :-1]))
        tokens.append(int(np.argmax(logits[0, len(tokens) - 1])))
    return tokens[len(prompt) :]


def _ends_with(tokens: list[int], stop: list[int]) -> bool:
    return len(tokens) >= len(stop) and tokens[-len(stop) :] == stop


@pytest.fixture(scope="module")
def perturbed_gpt():
    """A cached model whose greedy tokens vary: (cfg, params, jitted apply)."""
    cfg = tiny_config("gpt")
    params = perturbed(models.get("gpt").init(jax.random.key(0), cfg), std=0.3)
    return cfg, params, jax.jit(functools.partial(models.get("gpt").apply, cfg=cfg))


@pytest.mark.parametrize("marker_length", [2, 3])
def test_sequences_stop_where_their_new_tokens_end_with_a_stop_sequence(
    perturbed_gpt, decode_steps, marker_length
):
    # ChatML's <|im_end|> is 7 GPT-2 tokens: decoding ran on to max_new_tokens
    cfg, params, apply = perturbed_gpt
    n, prompt = 10, [5, 17, 3]
    free = greedy_until(apply, params, prompt, n, stop=[-1])
    # the second prompt is the first and its first two new tokens: the same greedy tokens,
    # two steps ahead; the marker, new tokens of both, first ends free[end]
    end = next(
        i
        for i in range(marker_length + 1, n)
        if not any(
            _ends_with(free[:j], free[i + 1 - marker_length : i + 1]) for j in range(1, i + 1)
        )
    )
    marker = free[end + 1 - marker_length : end + 1]
    prompts = [prompt, prompt + free[:2]]
    out = generate(params, prompts, cfg, max_new_tokens=n, temperature=0, stop_sequences=[marker])
    expected = [greedy_until(apply, params, p, n, marker) for p in prompts]
    assert out.completions() == expected
    assert [len(c) for c in expected] == [end + 1, end - 1]  # stopped at different steps
    np.testing.assert_array_equal(out.lengths, [len(p) + end + 1 for p in [prompt, prompt]])
    assert len(decode_steps) == end < n - 1  # the loop ended when the last sequence stopped


def test_a_stop_sequence_never_drawn_runs_to_max_new_tokens(perturbed_gpt, decode_steps):
    cfg, params, apply = perturbed_gpt
    n, prompts, marker = 10, [[5, 17, 3], [42, 7]], [cfg.vocab_size - 1] * 2
    expected = [greedy_until(apply, params, p, n, marker) for p in prompts]
    assert [len(c) for c in expected] == [n, n]  # the reference never drew the marker
    out = generate(params, prompts, cfg, max_new_tokens=n, temperature=0, stop_sequences=[marker])
    assert out.completions() == expected
    assert len(decode_steps) == n - 1


def test_bad_requests_get_one_clear_sentence(gpt):
    cfg, params = gpt
    with pytest.raises(ConfigError, match=r"token id 97, outside the model's vocabulary 0..96"):
        generate(params, [[1, 97]], cfg, max_new_tokens=2, temperature=0)
    with pytest.raises(ConfigError, match=r"is 18 tokens, beyond model\.block_size \+ 1 = 17"):
        generate(params, [[1] * 10], cfg, max_new_tokens=8, temperature=0)
    with pytest.raises(ConfigError, match="needs key"):
        generate(params, [[1]], cfg, max_new_tokens=2)
    with pytest.raises(ConfigError, match="at least one token"):
        generate(params, [[1], []], cfg, max_new_tokens=2, temperature=0)
    for prompts in ([1, 2, 3], np.array([1, 2, 3]), [[[1, 2]]], [[1.5, 2.0]]):
        with pytest.raises(ConfigError, match="not a list of token ids"):
            generate(params, prompts, cfg, max_new_tokens=2, temperature=0)
    with pytest.raises(ConfigError, match="top_p"):
        generate(params, [[1]], cfg, max_new_tokens=2, top_p=0.0, key=jax.random.key(0))
    with pytest.raises(ConfigError, match="stop_sequences holds an empty sequence"):
        generate(params, [[1]], cfg, max_new_tokens=2, temperature=0, stop_sequences=[[3], []])
    for temperature in ("nan", "inf"):  # were garbage, and a padding id that crashed decoding
        with pytest.raises(ConfigError, match=f"temperature={temperature} must be a finite"):
            generate(
                params,
                [[1]],
                cfg,
                max_new_tokens=2,
                temperature=float(temperature),
                key=jax.random.key(0),
            )


@pytest.mark.parametrize("name", ["bigram", "charformer"])
def test_generate_mode_samples_from_the_latest_checkpoint(name, tmp_path, capsys):
    config = load_config(ROOT / "configs" / f"{name}.py", "smoke")
    config.train.steps = 2
    config.eval.batches = 1
    train.train(config, tmp_path)
    options = launcher.SampleOptions(prompt="The ", num_samples=2, max_new_tokens=5, seed=1)
    launcher.run(config, workdir=str(tmp_path), mode="generate", sample_options=options)
    printed = capsys.readouterr().out
    assert "sampling from checkpoint 2" in printed
    assert printed.count("--- sample") == 2
    texts = launcher.sample(config, tmp_path, options)
    assert len(texts) == 2 and all(t.startswith("The ") for t in texts)
    assert texts == launcher.sample(config, tmp_path, options)  # the seed fixes them


def eof():
    raise EOFError  # Ctrl-D: the end of a chat


def test_default_max_new_tokens_fills_the_block_up_to_100(monkeypatch):
    # the default was 100 new tokens, refused by every smoke config (block_size 64)
    tokenizer = data.CharTokenizer("abcdefghij <|>_mnrstu\n")  # ChatML's characters too
    asked = []

    def recording(generate_or_chat):
        def run(*args, max_new_tokens, **kwargs):
            asked.append(max_new_tokens)
            return generate_or_chat(*args, max_new_tokens=max_new_tokens, **kwargs)

        return run

    monkeypatch.setattr(launcher, "generate", recording(launcher.generate))
    monkeypatch.setattr(launcher, "chat", recording(lambda *args, **kwargs: "reply"))
    # chat: half the block, or what it leaves after the 52 tokens of "hi" in ChatML
    for block_size, expected in ((64, [65 - 3, 65 - 52]), (128, [100, 64]), (300, [100, 100])):
        config = load_config(ROOT / "configs" / "gpt.py", "smoke")
        config.model.update(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=1)
        params = models.get("gpt").init(jax.random.key(0), models.config_from(config.model))
        loaded = lambda *_, params=params: (params, tokenizer)
        monkeypatch.setattr(launcher, "params_and_tokenizer", loaded)
        lines = iter(["hi"])
        monkeypatch.setattr("builtins.input", lambda prompt, lines=lines: next(lines, "") or eof())
        options = launcher.SampleOptions(prompt="abc", num_samples=1, temperature=0)
        launcher.sample(config, "unused", options)
        launcher.converse(config, "unused", options)  # half the block for the reply
        assert asked == expected
        asked.clear()


class CountingLowers:
    """``generation._generate`` counting the programs lowered (each then compiled)."""

    def __init__(self):
        self.lowered = 0

    def lower(self, *args, **kwargs):
        self.lowered += 1
        return _generate.lower(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return _generate(*args, **kwargs)


def test_samples_that_cannot_fit_the_memory_are_refused_before_they_run(monkeypatch):
    """--num_samples=100000 of configs/gqa_glu_rope.py:smoke ran out of memory after compiling
    (the compiled program's analysis: 117.2 GiB); on a GPU, XLA's rematerialization warning
    came first. Where the params, the token buffer and the KV cache alone exceed the device's
    memory, the sentence comes before anything compiles ("at least"); where they fit but the
    whole program does not (logits, activations), it comes from the compiled program; in 100
    times the cache's memory the samples run."""
    tokenizer = data.CharTokenizer("abcdefghij ")
    config = load_config(ROOT / "configs" / "gqa_gpt.py", "smoke")
    config.model.update(vocab_size=tokenizer.vocab_size, n_layer=1, block_size=16)
    cfg = models.config_from(config.model)
    params = models.get(cfg.name).init(jax.random.key(0), cfg)
    monkeypatch.setattr(launcher, "params_and_tokenizer", lambda *_: (params, tokenizer))
    counting = CountingLowers()
    monkeypatch.setattr(generation, "_generate", counting)
    fed = cfg.block_size  # a prompt of 1 token, max_new_tokens 16: 16 of 17 fed back
    kv_cache = 64 * cfg.n_layer * 2 * cfg.n_kv_head * (cfg.n_embed // cfg.n_head) * fed * 4
    least = sum(x.nbytes for x in jax.tree.leaves(params)) + 64 * (17 + 1) * 4 + kv_cache
    many = launcher.SampleOptions(prompt="a", num_samples=64, max_new_tokens=16)
    sentence = (
        r"sampling 64 sequences of up to 17 tokens at once needs {}[\d.]+ (KiB|MiB) on the "
        r"device, more than the [\d.]+ (KiB|MiB) its allocator holds: sample fewer sequences "
        r"at a time \(fewer prompts; launch\.py's --num_samples\) or fewer new tokens "
        r"\(max_new_tokens; launch\.py's --max_new_tokens\)\."
    )
    for limit, lowered, at_least in [(least - 1, 0, "at least "), (least, 1, "")]:
        monkeypatch.setattr(memory, "device_memory_limit", lambda limit=limit: limit)
        with pytest.raises(ConfigError) as caught:
            launcher.sample(config, "unused", many)
        assert re.fullmatch(sentence.format(at_least), str(caught.value)), caught.value
        assert counting.lowered == lowered
    monkeypatch.setattr(memory, "device_memory_limit", lambda: 100 * kv_cache)
    assert len(launcher.sample(config, "unused", many)) == 64


def bos_template_tokenizer(directory) -> data.HFTokenizer:
    """A word-level tokenizer.json (w0 .. w97, <|endoftext|> 98) whose template puts its BOS,
    w97 (tokenizer_config.json's bos_token), before every text, as Llama 3's does."""
    import tokenizers

    words = {f"w{i}": i for i in range(98)} | {data.EOT: 98}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="w97 $A", special_tokens=[("w97", 97)]
    )
    tok.save(str(directory / "tokenizer.json"))
    special = dict(tokenizer_class="PreTrainedTokenizerFast", eos_token=data.EOT, bos_token="w97")
    (directory / "tokenizer_config.json").write_text(json.dumps(special))
    return data.HFTokenizer(directory)


def test_generate_mode_encodes_the_prompt_as_transformers_does(monkeypatch, tmp_path):
    """An imported Llama 3 was sampled without the <|begin_of_text|> its tokenizer.json's
    template puts before every text, which transformers' tokenizer and the harness adapter
    encode; an empty prompt starts, as the harness's empty context, from the BOS."""
    transformers = pytest.importorskip("transformers", reason="the reference is transformers'")
    tokenizer = bos_template_tokenizer(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    config = load_config(ROOT / "configs" / "bigram.py", "smoke")
    config.model.vocab_size = tokenizer.vocab_size
    params = models.get("bigram").init(jax.random.key(0), models.config_from(config.model))
    monkeypatch.setattr(launcher, "params_and_tokenizer", lambda *_: (params, tokenizer))
    prompts = []

    def recording(params, prompts_asked, *args, **kwargs):
        prompts.append(prompts_asked[0])
        return generate(params, prompts_asked, *args, **kwargs)

    monkeypatch.setattr(launcher, "generate", recording)
    for prompt in ("w3 w4", ""):
        options = launcher.SampleOptions(prompt=prompt, num_samples=1, max_new_tokens=2)
        launcher.sample(config, "unused", options)
    # lm-eval's HF backend starts an empty context from the tokenizer's bos_token_id
    assert prompts == [reference("w3 w4").input_ids, [reference.bos_token_id]]
    assert prompts[0] == [97, 3, 4]


def test_generate_mode_prints_the_prompt_without_the_bos_its_encoding_added(monkeypatch, tmp_path):
    """Each sample of an imported Llama 3 began with the <|begin_of_text|> that encoding the
    prompt put before it (or, for an empty prompt, the BOS it starts from), which the user
    never typed: transformers' generate then decode(skip_special_tokens=True) shows none. A
    special token the model draws is its own, and shown (here end-of-text, the stop)."""
    transformers = pytest.importorskip("transformers", reason="the reference is transformers'")
    tokenizer = bos_template_tokenizer(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    config = load_config(ROOT / "configs" / "bigram.py", "smoke")
    config.model.vocab_size = tokenizer.vocab_size
    monkeypatch.setattr(launcher, "params_and_tokenizer", lambda *_: (None, tokenizer))
    drawn = [5, 6, 7]

    def fake_generate(params, prompts, cfg, **kwargs):
        ids = [*prompts[0], *drawn]
        lengths = [[len(prompts[0])], [len(ids)]]
        return Generated(jnp.asarray([ids]), *map(jnp.asarray, lengths))

    monkeypatch.setattr(launcher, "generate", fake_generate)
    options = launcher.SampleOptions(num_samples=1, max_new_tokens=3)
    for prompt in ("w3 w4", ""):
        [text] = launcher.sample(config, "unused", dataclasses.replace(options, prompt=prompt))
        asked = reference(prompt).input_ids  # the BOS, then the prompt's ids
        assert asked[0] == reference.bos_token_id == 97
        assert text == reference.decode(asked + drawn, skip_special_tokens=True)
    assert text == "w5 w6 w7"
    drawn = [5, 98]  # end-of-text: the model's own stop
    [text] = launcher.sample(config, "unused", dataclasses.replace(options, prompt="w3"))
    assert text == f"w3 w5 {data.EOT}"


def test_a_prompt_the_tokenizer_cannot_encode_names_the_flag(monkeypatch):
    tokenizer = data.CharTokenizer("abc ")
    config = load_config(ROOT / "configs" / "bigram.py", "smoke")
    config.model.vocab_size = tokenizer.vocab_size
    params = models.get("bigram").init(jax.random.key(0), models.config_from(config.model))
    monkeypatch.setattr(launcher, "params_and_tokenizer", lambda *_: (params, tokenizer))
    options = launcher.SampleOptions(prompt="a é", num_samples=1, max_new_tokens=2)
    with pytest.raises(data.DataError, match=r"^--prompt: character 'é' is not in") as error:
        launcher.sample(config, "unused", options)
    assert str(error.value).count(". ") == 0  # one sentence


def test_generate_mode_without_a_checkpoint_says_what_to_do(tmp_path):
    """generate, eval and chat read ``checkpoint.init_from`` in a workdir without checkpoints,
    which the sentence did not say."""
    config = load_config(ROOT / "configs" / "bigram.py", "smoke")
    with pytest.raises(ConfigError) as caught:
        launcher.sample(config, tmp_path, launcher.SampleOptions())
    assert str(caught.value) == (
        f"{tmp_path / 'checkpoints'} does not exist: train this config with --mode=train and "
        f"--workdir={tmp_path} first, or read a Hugging Face checkpoint with "
        "--config.checkpoint.init_from=<its directory or hub name>."
    )
    assert not (tmp_path / "checkpoints").exists()
    (tmp_path / "a_file").write_text("a user's file")  # advised training there, which refuses
    with pytest.raises(ConfigError, match="a_file is a file, not a run's directory"):
        launcher.sample(config, tmp_path / "a_file", launcher.SampleOptions())


def test_params_on_the_host_generate_as_on_the_device():
    """Params as numpy arrays (read from files, say) generated as jax arrays do until the memory
    check's signature asked every argument for its sharding (AttributeError)."""
    cfg = tiny_config("gpt")
    params = models.get("gpt").init(jax.random.key(0), cfg)
    on_host = jax.tree.map(np.asarray, params)
    greedy = functools.partial(generate, prompts=PROMPTS, cfg=cfg, max_new_tokens=4, temperature=0)
    assert greedy(on_host).completions() == greedy(params).completions()
