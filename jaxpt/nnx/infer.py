"""The original's ``jaxpt.infer``, on the core's sampler (``jaxpt.generation``): any model
class, any batch, a KV cache where the model allows one [D14]."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jaxpt import data, generation
from jaxpt.errors import ConfigError, check_range
from jaxpt.nnx.models._module import FunctionalModel

log = logging.getLogger(__name__)

PREFIX = "Hello, I'm a language model,"
FORMATS = ("completion", "chatml")


def top_k_sampling(logits: Array, key: Array, k: int = 50) -> tuple[Array, Array]:
    """One token per row from the ``k`` most likely (all ``V`` where ``k >= V``): ``(B, V)``
    logits -> ``(ids (B, 1), key)``, the key split first as the original does."""
    check_range("k", k, at_least=1, integer=True)
    key, sub = jax.random.split(key)
    ids = generation.sample(sub, logits, generation.Sampling(top_k=min(k, logits.shape[-1])))
    return ids[:, None], key


def generate_completions(
    model: FunctionalModel,
    enc: data.Tokenizer | None = None,
    prefix: str = PREFIX,
    num_completions: int = 8,
    max_length: int = 20,
    temperature: float = 0.2,
    key: Array | None = None,
) -> list[str]:
    """``num_completions`` samples of ``prefix`` (top-50 at ``temperature``), each
    ``max_length`` tokens long with the prefix, decoded with ``enc`` (GPT-2's by default)."""
    enc = _tokenizer(enc)
    prompt = enc.encode(prefix)
    prompts = [prompt] * num_completions
    return _complete(model, enc, prompts, _new_tokens(max_length, len(prompt)), temperature, key)


generate = generate_completions


def generate_completion_slow(
    model: FunctionalModel,
    enc: data.Tokenizer | None = None,
    prefix: str = PREFIX,
    attn_mask: Array | np.ndarray | None = None,
    num_completions: int = 8,
    max_length: int = 20,
    temperature: float = 0.2,
    key: Array | None = None,
) -> list[str]:
    """``generate_completions`` with a padding mask over the prefix's ``P`` tokens:
    ``attn_mask`` ``(P,)`` or ``(num_completions, P)`` bool, False for a token no position
    attends to, which then leaves that row's prompt (and its text); every new token is
    attended (the original's growing mask). Each row gets ``max_length - P`` new tokens. The
    original raised ValueError for any mask (``if attn_mask:``) [D14]."""
    enc = _tokenizer(enc)
    prompt = np.asarray(enc.encode(prefix))
    keep = _prompt_mask(attn_mask, num_completions, len(prompt))
    prompts = [prompt[row].tolist() for row in keep]
    return _complete(model, enc, prompts, _new_tokens(max_length, len(prompt)), temperature, key)


# The original's "fast" variant kept the prefix's mask without the new tokens' entries, so
# no new token would be read; its caching is what the core's generation does for both.
generate_completion_fast = generate_completion_slow


def _new_tokens(max_length: int, prefix_length: int) -> int:
    """The new tokens that make a prefix of ``prefix_length`` tokens ``max_length`` long;
    ConfigError where that is none."""
    if max_length <= prefix_length:
        raise ConfigError(
            f"max_length={max_length} leaves no room for new tokens after the prefix's "
            f"{prefix_length} tokens: ask for more than {prefix_length} (the prefix included)."
        )
    return max_length - prefix_length


def _prompt_mask(attn_mask, rows: int, length: int) -> np.ndarray:
    """``(rows, length)`` bool: the prompt tokens each row keeps (all without a mask)."""
    if attn_mask is None:
        return np.ones((rows, length), bool)
    mask = np.asarray(attn_mask, bool)
    if mask.shape not in ((length,), (rows, length)) or not mask.any(axis=-1).all():
        raise ConfigError(
            f"attn_mask has shape {mask.shape}: it must be ({length},) or ({rows}, {length}) "
            "(the prefix's tokens, per completion or for all) with a True in every row."
        )
    return np.broadcast_to(mask, (rows, length))


def _complete(model, enc, prompts: list[list[int]], new_tokens: int, temperature, key):
    """The decoded prompts and their ``new_tokens`` top-50 samples."""
    out = _sample(model, enc, prompts, new_tokens, temperature=temperature, top_k=50, key=key)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [enc.decode(row[:n].tolist()) for row, n in zip(tokens, lengths, strict=True)]


def _sample(model, enc, prompts, new_tokens: int, *, temperature, top_k, key, stops=()):
    """``generation.generate`` on the model's functional pair, drawing only ids ``enc`` can
    decode (the model's vocabulary may be padded), from the ``top_k`` most likely (all of them
    where ``enc`` has fewer), with the original's key 1337 by default; a row stops after
    drawing one of the ``stops`` ids."""
    _check_tokenizer(enc, model.model_config().vocab_size)
    return generation.generate(
        model.functional_params(),
        prompts,
        model.model_config(),
        max_new_tokens=new_tokens,
        temperature=temperature,
        top_k=min(top_k, enc.vocab_size),
        key=jax.random.key(1337) if key is None else key,
        stop_sequences=[[stop] for stop in sorted(stops)],
        n_tokens=enc.vocab_size,
    )


def _check_tokenizer(enc: data.Tokenizer, vocab_size: int) -> None:
    """ConfigError where ``enc`` has ids beyond the model's ``vocab_size`` (GPT-2's default
    tokenizer on a small-vocabulary model)."""
    if enc.vocab_size > vocab_size:
        raise ConfigError(
            f"the tokenizer has {enc.vocab_size} ids, more than the model's "
            f"vocab_size={vocab_size}: pass the model's own tokenizer as enc (without one, "
            "GPT-2's is used)."
        )


def _tokenizer(enc: data.Tokenizer | None) -> data.Tokenizer:
    """``enc``, or GPT-2's (the original's default)."""
    return data.get_tokenizer("gpt2") if enc is None else enc


def generate_chat(
    model: FunctionalModel,
    x_prev: Array | np.ndarray | None = None,
    enc: data.Tokenizer | None = None,
    system_prompt: str = "You are a helpful assistant.",
    question: str = "What is photosynthesis?",
    format: str = "completion",
    stop_tokens: Sequence[str] = ("<|im_end|>", "<|im_end|>"),
    temperature: float = 0.2,
    top_k: int = 50,
    key: Array | None = None,
    logger: logging.Logger = log,
) -> Array:
    """One turn of the original's chat: ``question`` after the conversation so far ``x_prev``
    ``(1, T)``, continued by top-k sampling at ``temperature`` until the model draws the first
    token of any of ``stop_tokens`` or its block is full; prints the reply.

    ``format="chatml"`` wraps the question in ChatML (``<|im_start|>user\\n...<|im_end|>\\n``
    then the assistant's prompt), with ``system_prompt`` first when ``x_prev`` is None (a new
    conversation); ``"completion"`` reads the question as it is. ``logger`` logs the prompt.
    Returns ``(1, T')`` int32 ids (the original: uint16): ``x_prev``, the prompt, the reply
    without its stop token.
    """
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not one of {', '.join(map(repr, FORMATS))}.")
    enc = _tokenizer(enc)
    history = [] if x_prev is None else _one_sequence(x_prev)
    prompt = history + _chat_prompt(enc, question, system_prompt, format, new=x_prev is None)
    logger.debug("chat prompt: %r", enc.decode(prompt))
    block_size = model.model_config().block_size
    if len(prompt) >= block_size:
        raise ConfigError(
            f"the conversation takes {len(prompt)} tokens, leaving none of the model's "
            f"block_size={block_size} for a reply: start a new one (x_prev=None)."
        )
    stops = {enc.encode(text)[0] for text in stop_tokens}
    new_tokens = block_size - len(prompt)
    reply = _reply(
        model, enc, prompt, new_tokens, stops, temperature=temperature, top_k=top_k, key=key
    )
    print(enc.decode(reply))
    return jnp.asarray([prompt + reply], jnp.int32)


def _reply(
    model, enc, prompt: list[int], new_tokens: int, stops: set[int], *, temperature, top_k, key
) -> list[int]:
    """Up to ``new_tokens`` ids sampled after ``prompt`` (as ``_sample``), until one of the
    ``stops`` ids, which is left out."""
    out = _sample(
        model,
        enc,
        [prompt],
        new_tokens,
        temperature=temperature,
        top_k=top_k,
        key=key,
        stops=stops,
    )
    reply = out.completions()[0]
    return reply[:-1] if reply[-1] in stops else reply


def _one_sequence(x_prev) -> list[int]:
    """The ids of a conversation so far, ``(1, T)`` or ``(T,)``."""
    ids = np.asarray(x_prev)
    if ids.ndim not in (1, 2) or (ids.ndim == 2 and ids.shape[0] != 1):
        raise ConfigError(
            f"x_prev has shape {ids.shape}: a chat continues one conversation, (1, T) ids."
        )
    return ids.reshape(-1).tolist()


def _chat_prompt(enc, question: str, system_prompt: str, format: str, *, new: bool) -> list[int]:
    """The ids of ``question`` as ``format`` writes it (ChatML: the system prompt first in a
    ``new`` conversation, then the assistant's prompt)."""
    if format == "completion":
        return enc.encode(question)
    system = [{"role": "system", "content": system_prompt}] if new else []
    return data.chat_prompt(enc, [*system, {"role": "user", "content": question}], data.CHATML)
