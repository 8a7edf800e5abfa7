"""Sampling from any registry model: prefill, then one token at a time, in one jitted loop.

Prompts of different lengths share a ``(B, P + N)`` token buffer, left-aligned: row ``b``
holds its prompt at positions ``0 .. p_b - 1`` and its new tokens after it, so every sequence
keeps its own positions (learned and rotary embeddings need no offsets) and its own length.

Models whose earlier outputs never change as the sequence grows (``cfg.is_cacheable``: every
dense preset, MoE that cannot drop tokens, Bigram) prefill a KV cache with the
prompts and then feed one token per step. Top-k MoE with a capacity and Soft MoE are not like
that (a later token changes how earlier ones were routed), so for them each step re-runs the
whole buffer under a padding mask: slower, but exactly what the model computes on the
sequence so far.

``chat`` is sampling for chat models: a conversation rendered with the tokenizer's chat template
(``jaxpt.data.chat_prompt``), decoding stopped and the reply cut at the template's end-of-turn
marker.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jaxpt import data, memory, models
from jaxpt.errors import ConfigError, check_range

# The smallest normal float32: a temperature below it is flushed to 0 on CPUs and GPUs, so
# sampling takes the limit, greedy decoding.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
CHAT_NEW_TOKENS = 256  # the most tokens a reply takes when ``chat`` is not told


class Sampling(NamedTuple):
    """How the next token is drawn from the logits (hashable: a static jit argument)."""

    temperature: float = 1.0  # 0 (or below FLOAT32_TINY): greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set whose probability reaches p
    n_tokens: int | None = None  # draw only ids below this (a padded vocabulary's real part)


class Generated(NamedTuple):
    """Prompts and their continuations.

    ``tokens[b, :lengths[b]]`` is prompt ``b`` (its first ``prompt_lengths[b]`` tokens)
    followed by its new tokens, ending with the stop token or sequence that stopped it, if
    one did; the rest of the row is 0.
    """

    tokens: Array  # (B, P + N) int32
    prompt_lengths: Array  # (B,) int32
    lengths: Array  # (B,) int32

    def completions(self) -> list[list[int]]:
        """The new tokens of each prompt, as lists."""
        tokens, starts, ends = map(np.asarray, self)
        return [row[s:e].tolist() for row, s, e in zip(tokens, starts, ends, strict=True)]


def filter_logits(logits: Array, sampling: Sampling) -> Array:
    """Temperature-scaled logits, shifted so the largest is 0, with tokens outside the top-k /
    top-p sets at -inf.

    Shifted before the division, no logit overflows to +inf however small the temperature:
    the likeliest tokens stay at 0 and the others go to -inf, as in the limit (greedy).

    Top-p keeps, in order of probability, the tokens until their mass first reaches ``p``
    (the smallest such set); the most likely token is always kept, and ``p = 1`` keeps every
    token (a float32 running sum reaches 1 before the last ones).

    Args:
        logits: ``(B, V)`` float32, ``sampling.temperature >= FLOAT32_TINY``.
    """
    logits = (logits - logits.max(axis=-1, keepdims=True)) / sampling.temperature
    if sampling.top_k is not None:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)  # (B, V) most likely first
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < sampling.top_p
        keep = (
            jnp.zeros_like(keep_sorted).at[jnp.arange(len(order))[:, None], order].set(keep_sorted)
        )
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def sample(key: Array, logits: Array, sampling: Sampling) -> Array:
    """One token per row: ``(B, V)`` logits -> ``(B,)`` int32.

    Drawn in float32 whatever the logits' dtype: bfloat16 Gumbel noise and probabilities
    cannot reach the unlikely tokens (a token of probability 0.001 was never drawn).
    """
    logits = logits.astype(jnp.float32)
    if sampling.n_tokens is not None:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < sampling.n_tokens, logits, -jnp.inf)
    if sampling.temperature < FLOAT32_TINY:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling)).astype(jnp.int32)


def generate(
    params,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    cfg: models.ModelConfig | models.BigramConfig,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: Array | None = None,
    stop_token: int | None = None,
    stop_sequences: Sequence[Sequence[int]] = (),
    n_tokens: int | None = None,
) -> Generated:
    """Continues each prompt by up to ``max_new_tokens`` tokens.

    Args:
        params: the model's params.
        prompts: token-id lists (lengths may differ), or a ``(B, P)`` int array.
        cfg: the model's config; ``cfg.name`` names its registry entry.
        max_new_tokens: the most tokens to add to each prompt.
        temperature: 0 is greedy decoding; otherwise logits are divided by it and sampled,
            after the optional ``top_k`` and ``top_p`` (nucleus) filters.
        key: a ``jax.random.key``, required unless greedy; a fixed key gives fixed samples.
        stop_token: a sequence stops after drawing it (it is kept in the output).
        stop_sequences: token-id lists; a sequence stops once its new tokens end with one of
            them (kept in the output), e.g. a marker of several tokens (ChatML's
            ``<|im_end|>`` under GPT-2 BPE).
        n_tokens: draw only ids below it, e.g. the tokenizer's vocabulary size when the
            model's ``vocab_size`` is padded (GPT-2: 50257 of 50304).
    Returns:
        ``Generated``; ``.completions()`` lists the new tokens of each prompt.
    """
    sampling = _check_sampling(temperature, top_k, top_p, key, n_tokens, cfg.vocab_size)
    tokens, prompt_lengths = pad_prompts(prompts, cfg, max_new_tokens=max_new_tokens)
    if key is None:
        key = jax.random.key(0)  # unused by greedy decoding
    args = params, jnp.asarray(tokens), jnp.asarray(prompt_lengths), key
    stops = _stops(stop_token, stop_sequences)
    static = dict(cfg=cfg, max_new_tokens=max_new_tokens, sampling=sampling, stops=stops)
    _check_generation_fits(args, static)
    return _generate(*args, **static)


# The signatures (argument shapes, dtypes and shardings, None for host arrays; static
# arguments) whose compiled `_generate` was found to fit the device's memory: the check lowers
# the program again, which takes longer than the jitted call it precedes.
_FITTING: set = set()


def _check_generation_fits(args, static: dict) -> None:
    """ConfigError when ``_generate`` for ``args`` and ``static`` needs more bytes than the
    device may hold (``memory_limit``): before compiling, where what it holds at the least
    (``_least_bytes``) is more; else from the compiled program's analysis. Checked once per
    signature."""
    signature = (
        jax.tree.structure(args),
        tuple((a.shape, a.dtype, getattr(a, "sharding", None)) for a in jax.tree.leaves(args)),
        tuple(static.items()),
    )
    if signature in _FITTING:
        return
    shape = args[1].shape
    _refuse_beyond_memory(_least_bytes(args, static["cfg"]), shape, at_least=True)
    stats = _generate.lower(*args, **static).compile().memory_analysis()
    if stats is not None:
        _refuse_beyond_memory(memory.program_bytes(stats), shape)
    _FITTING.add(signature)


def _least_bytes(args, cfg) -> int:
    """Bytes ``_generate`` holds on the device at the least, known without compiling: its
    arguments (the params, the ``(B, L)`` token buffer) and the key/value cache ``(B, L - 1)``
    that its decode loop carries (XLA:GPU, compiling a program far larger than the device,
    printed a rematerialization warning before the sentence)."""
    batch, length = args[1].shape
    init_cache = functools.partial(models.get(cfg.name).init_cache, batch, length - 1, cfg)
    cache = jax.eval_shape(init_cache)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((args[:3], cache)))


def _refuse_beyond_memory(need: int, shape: tuple[int, int], *, at_least: bool = False) -> None:
    """ConfigError when generating into a token buffer of ``shape`` ``(B, L)`` needs ``need``
    bytes (``at_least``: that many or more), more than the device may hold
    (``memory_limit``)."""
    limit, what = memory.memory_limit(1)
    if need > limit:
        need_text = ("at least " if at_least else "") + memory.size_text(need)
        raise ConfigError(
            f"sampling {shape[0]} sequences of up to {shape[1]} tokens at once needs "
            f"{need_text} on the device, more than the {memory.size_text(limit)} {what}: sample "
            "fewer sequences at a time (fewer prompts; launch.py's --num_samples) or fewer new "
            "tokens (max_new_tokens; launch.py's --max_new_tokens)."
        )


def pad_prompts(prompts, cfg, *, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The left-aligned ``(B, P + max_new_tokens)`` int32 buffer and the prompt lengths.

    Raises ConfigError for a prompt that is not a list of ids (one prompt's ids not wrapped
    in a list were taken for many one-token prompts), an empty prompt, a token id outside
    the vocabulary, or a total length beyond the model's ``max_length`` plus one (the last
    new token is drawn, never fed to the model).
    """
    rows = [np.asarray(p) for p in prompts]
    for i, row in enumerate(rows):
        if row.ndim != 1 or (row.size and row.dtype.kind not in "iu"):
            raise ConfigError(
                f"prompt {i} is not a list of token ids (shape {row.shape}, {row.dtype}): "
                "pass a list of prompts, e.g. [ids] for one."
            )
    if not rows or min(len(r) for r in rows) == 0:
        raise ConfigError("generate needs at least one prompt, each of at least one token.")
    check_range("max_new_tokens", max_new_tokens, at_least=1, integer=True)
    for i, row in enumerate(rows):
        bad = row[(row < 0) | (row >= cfg.vocab_size)]
        if bad.size:
            raise ConfigError(
                f"prompt {i} holds token id {int(bad[0])}, outside the model's vocabulary "
                f"0..{cfg.vocab_size - 1}: encode it with the model's tokenizer."
            )
    length = max(len(r) for r in rows) + max_new_tokens
    if max_new_tokens > room(cfg, length - max_new_tokens):
        raise ConfigError(
            f"the longest prompt plus max_new_tokens is {length} tokens, beyond "
            f"model.block_size + 1 = {cfg.max_length + 1} (the last new token is never fed "
            "back): shorten the prompt or ask for fewer tokens."
        )
    tokens = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return tokens, np.array([len(r) for r in rows], np.int32)


def room(cfg: models.ModelConfig | models.BigramConfig, prompt_length: int) -> float:
    """The most new tokens ``generate`` adds to a prompt of ``prompt_length`` tokens: up to
    ``cfg.max_length + 1`` in all, the last new token being drawn and never fed back; inf for a
    model of any length."""
    return math.inf if cfg.max_length is None else cfg.max_length + 1 - prompt_length


def _check_sampling(temperature, top_k, top_p, key, n_tokens, vocab_size: int) -> Sampling:
    check_range("temperature", temperature, at_least=0, note=" (0 is greedy)")
    if top_k is not None:
        check_range("top_k", top_k, at_least=1, at_most=vocab_size, integer=True)
    if top_p is not None:
        check_range("top_p", top_p, above=0, at_most=1)
    if temperature > 0 and key is None:
        raise ConfigError("sampling with temperature > 0 needs key=jax.random.key(seed).")
    if n_tokens is not None and not 1 <= n_tokens <= vocab_size:
        raise ConfigError(
            f"n_tokens={n_tokens} must be from 1 to model.vocab_size={vocab_size}: is the "
            "tokenizer the model's?"
        )
    return Sampling(float(temperature), top_k, top_p, n_tokens)


def _stops(stop_token, stop_sequences) -> tuple[tuple[int, ...], ...]:
    """The token-id sequences that stop a row, ``stop_token`` (as one of one token) and
    ``stop_sequences``, as a tuple (hashable: a static jit argument); ConfigError for an
    empty one."""
    stops = [[stop_token]] if stop_token is not None else []
    stops += list(stop_sequences)
    if not all(len(stop) for stop in stops):
        raise ConfigError("stop_sequences holds an empty sequence: each needs a token id.")
    return tuple(tuple(map(int, stop)) for stop in stops)


def _ends_with_stop(tokens: Array, lengths: Array, token: Array, new: Array, stops) -> Array:
    """``(B,)`` bool: whether row ``b``, ``tokens[b, :lengths[b]]`` then ``token[b]``, ends
    with one of ``stops`` within its last ``new[b]`` tokens (its new ones). tokens:
    ``(B, L)``; lengths, token, new: ``(B,)``. A stop of one token reads only ``token``."""
    rows = jnp.arange(len(tokens))[:, None]
    ended = jnp.zeros(lengths.shape, bool)
    for *earlier, last in stops:
        at = lengths[:, None] - len(earlier) + jnp.arange(len(earlier))[None, :]  # (B, S - 1)
        match = (tokens[rows, at] == jnp.asarray(earlier, jnp.int32)[None, :]).all(axis=-1)
        ended |= (token == last) & (new > len(earlier)) & match
    return ended


def _prefill_and_step(model, params, cfg, shape: tuple[int, int], prompt: int, cached: bool):
    """``(prefill, step)``, each ``(tokens, lengths, cache) -> (logits, cache)`` over the
    token buffer whose first ``prompt`` columns hold the prompts and whose first ``shape =
    (B, L)`` columns the model reads (not the last, which is drawn but never fed back): with a
    cache, ``prefill`` writes the prompts' keys and values and ``step`` feeds each row's newest
    token; without one, both re-run those columns masked to each row's tokens."""
    batch, length = shape

    def whole_buffer(tokens, lengths, cache):
        mask = jnp.arange(length)[None, :] < lengths[:, None]  # (B, L)
        return model.decode(params, tokens[:, :length], cfg, at=lengths - 1, mask=mask)

    def prefill(tokens, lengths, cache):
        positions = jnp.broadcast_to(jnp.arange(prompt), (batch, prompt))
        mask = positions < lengths[:, None]
        prompts = tokens[:, :prompt]
        return model.decode(
            params, prompts, cfg, at=lengths - 1, mask=mask, positions=positions, cache=cache
        )

    def step(tokens, lengths, cache):
        newest = tokens[jnp.arange(batch), lengths - 1][:, None]  # (B, 1)
        at, positions = jnp.zeros_like(lengths), (lengths - 1)[:, None]
        return model.decode(params, newest, cfg, at=at, positions=positions, cache=cache)

    return (prefill, step) if cached else (whole_buffer, whole_buffer)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling", "stops"))
def _generate(params, tokens, prompt_lengths, key, *, cfg, max_new_tokens, sampling, stops):
    """The prefill and the decode loop. tokens: ``(B, L)``; prompt_lengths: ``(B,)``; a
    row is done once its new tokens end with one of ``stops`` (``_stops``)."""
    model = models.get(cfg.name)
    params = model.prepare_decoding(params, cfg)
    batch, length = tokens.shape
    rows = jnp.arange(batch)
    fed = (batch, length - 1)  # the last column's token is drawn, never fed back
    cache = model.init_cache(*fed, cfg)
    prompt = length - max_new_tokens
    prefill, step = _prefill_and_step(model, params, cfg, fed, prompt, cached=cache is not None)

    def append(i, tokens, lengths, done, logits):  # draw token i of every unfinished row
        token = sample(jax.random.fold_in(key, i), logits, sampling)  # (B,)
        new = lengths + 1 - prompt_lengths
        stopped = _ends_with_stop(tokens, lengths, token, new, stops)
        tokens = tokens.at[rows, lengths].set(jnp.where(done, tokens[rows, lengths], token))
        return tokens, lengths + (~done), done | stopped

    def body(state):  # feed the newest token, then draw the next
        i, tokens, lengths, done, cache = state
        logits, cache = step(tokens, lengths, cache)
        tokens, lengths, done = append(i, tokens, lengths, done, logits)
        return i + 1, tokens, lengths, done, cache

    def cond(state):
        i, _, _, done, _ = state
        return (i < max_new_tokens) & ~done.all()

    logits, cache = prefill(tokens, prompt_lengths, cache)
    done = jnp.zeros((batch,), bool)
    tokens, lengths, done = append(0, tokens, prompt_lengths, done, logits)
    _, tokens, lengths, _, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(1), tokens, lengths, done, cache)
    )
    return Generated(tokens, prompt_lengths, lengths)


def chat(
    params,
    model_config: models.ModelConfig | models.BigramConfig,
    tokenizer: data.Tokenizer,
    messages: Sequence[dict],
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: Array | None = None,
    template: str | None = None,
) -> str:
    """The assistant's reply to a conversation.

    The conversation is rendered as in training rows (``jaxpt.data.encode_chat``), followed by
    the assistant's prompt; the reply ends at the template's end-of-turn marker
    (``<|im_end|>`` in ChatML; decoding stops once the reply's tokens end with the marker's,
    one or several), which is not returned, nor the whitespace the template writes
    around a reply (the spaces of Llama-2's ``[/INST] reply </s>``): the reply as the model
    wrote it, which the template renders back as written (``data.reply_in``). When the
    conversation and ``max_new_tokens`` do not fit in ``model_config.block_size`` plus one (the
    last new token is never fed back), the oldest turns are left out (leading system messages
    are kept), down to the last user message.

    Args:
        params, model_config: the model.
        tokenizer: the model's tokenizer; its chat template (or ChatML) renders the messages.
        messages: ``{"role": ..., "content": ...}`` dicts, e.g. system, user, assistant, user.
        max_new_tokens: the most tokens the reply may take (None: half the block, at most
            ``CHAT_NEW_TOKENS``, and at most what the block leaves after the leading system
            messages and the last user message, ``reply_room``).
        temperature, top_k, top_p, key: as in ``generate`` (greedy by default).
        template: a Jinja chat template to use instead of the tokenizer's.
    Returns:
        The reply's text.
    """
    messages = data.check_messages(messages, "messages")
    if not messages:
        raise ConfigError("chat needs at least one message to reply to.")
    template = template or data.chat_template(tokenizer)
    if max_new_tokens is None:
        left = reply_room(tokenizer, messages, template, model_config)
        max_new_tokens = int(max(1, min(CHAT_NEW_TOKENS, left)))
    end = data.end_of_turn(tokenizer, template)
    prompt = _recent_history(tokenizer, messages, template, model_config, max_new_tokens)
    generated = generate(
        params,
        [prompt],
        model_config,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        key=key,
        stop_sequences=[tokenizer.encode(end)],
        n_tokens=tokenizer.vocab_size,
    )
    return data.reply_in(tokenizer, template, tokenizer.decode(generated.completions()[0]))


def reply_room(tokenizer, messages: list[dict], template: str, cfg) -> float:
    """The most tokens a reply to ``messages`` takes by default: half the block, and no more
    than the block leaves (``room``) after the shortest history ``chat`` prompts with (the
    leading system messages and the last user message)."""
    shortest = data.chat_prompt(tokenizer, _histories(messages)[-1], template)
    return min(cfg.block_size // 2, room(cfg, len(shortest)))


def _histories(messages: list[dict]) -> list[list[dict]]:
    """The conversations ``chat`` may prompt with, longest first: all the messages, then from
    each later user message on, after the leading system ones."""
    system = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    starts = [system] + [
        i for i in range(system + 1, len(messages)) if messages[i]["role"] == "user"
    ]
    return [messages[:system] + messages[start:] for start in starts]


def _recent_history(tokenizer, messages: list[dict], template: str, cfg, max_new_tokens: int):
    """The prompt ids of the most recent turns that leave room for ``max_new_tokens`` in the
    block: the longest of ``_histories`` that does."""
    room = cfg.block_size + 1 - max_new_tokens  # generate's limit
    for history in _histories(messages):
        prompt = data.chat_prompt(tokenizer, history, template)
        if len(prompt) <= room:
            return prompt
    taken = f"the last user message and the system prompt take {len(prompt)} tokens"
    if len(prompt) > cfg.block_size:  # not even one new token fits
        raise ConfigError(
            f"{taken}, which leaves no room for a reply in model.block_size = {cfg.block_size}: "
            "shorten them."
        )
    raise ConfigError(
        f"{taken}, and with max_new_tokens={max_new_tokens} that exceeds model.block_size + 1 = "
        f"{cfg.block_size + 1}: shorten them or ask for fewer new tokens."
    )
