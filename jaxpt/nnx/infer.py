"""The original's ``jaxpt.infer``, on the core's sampler (``jaxpt.generation``): any model
class, any batch, a KV cache where the model allows one [D14]."""

from __future__ import annotations

import jax
import numpy as np
from jax import Array

from jaxpt import data, generation
from jaxpt.nnx.models._module import FunctionalModel


def top_k_sampling(logits: Array, key: Array, k: int = 50) -> tuple[Array, Array]:
    """One token per row from the ``k`` most likely: ``(B, V)`` logits -> ``(ids (B, 1),
    key)``, the key split first as the original does."""
    key, sub = jax.random.split(key)
    ids = generation.sample(sub, logits, generation.Sampling(top_k=k))
    return ids[:, None], key


def generate_completions(
    model: FunctionalModel,
    enc: data.Tokenizer | None = None,
    prefix: str = "Hello, I'm a language model,",
    num_completions: int = 8,
    max_length: int = 20,
    temperature: float = 0.2,
    key: Array | None = None,
) -> list[str]:
    """``num_completions`` samples of ``prefix`` (top-50 at ``temperature``), each
    ``max_length`` tokens long with the prefix, decoded with ``enc`` (GPT-2's by default)."""
    enc = data.get_tokenizer("gpt2") if enc is None else enc
    key = jax.random.key(1337) if key is None else key
    prompt = enc.encode(prefix)
    out = generation.generate(
        model.functional_params(),
        np.tile(np.asarray(prompt), (num_completions, 1)),
        model.model_config(),
        max_new_tokens=max_length - len(prompt),
        temperature=temperature,
        top_k=50,
        key=key,
        n_tokens=enc.vocab_size,  # never a padding id the tokenizer cannot decode
    )
    return [enc.decode(row[:max_length].tolist()) for row in np.asarray(out.tokens)]


generate = generate_completions
