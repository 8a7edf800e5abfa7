"""The original's Hugging Face helpers, on ``jaxpt.hf``: a local checkpoint directory (or a
hub name, downloaded when the network allows) where the original always downloads."""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from jaxpt import hf
from jaxpt.config import check_new_directory
from jaxpt.nnx.models._classes import GPT, SmolLM
from jaxpt.nnx.models._config import GPTConfig, SmolLM_Config


def from_huggingface_pretrained(rngs: nnx.Rngs, path: str | os.PathLike = "gpt2") -> GPT:
    """A GPT holding the GPT-2 checkpoint at ``path`` (its 50257-row table, unpadded)."""
    pretrained = hf.from_pretrained(path)
    config = GPTConfig.from_model_config(pretrained.config)
    return GPT.from_params(pretrained.params, config, rngs)


def from_hf_pretrained(
    config: SmolLM_Config | None,
    rngs: nnx.Rngs,
    path: str | os.PathLike = "HuggingFaceTB/SmolLM-135M",
) -> SmolLM:
    """A SmolLM holding the Llama checkpoint at ``path``; the config comes from its
    config.json (``config`` gives the other fields: name, dtype, use_cache)."""
    pretrained = hf.from_pretrained(path)
    smol = SmolLM_Config.from_model_config(pretrained.config)
    if config is not None:
        smol = dataclasses.replace(
            smol, name=config.name, dtype=config.dtype, use_cache=config.use_cache
        )
    return SmolLM.from_params(pretrained.params, smol, rngs)


def load_hf_pretrained(model_name: str = "HuggingFaceTB/SmolLM-135M"):
    """``transformers.AutoModelForCausalLM.from_pretrained(model_name)`` (needs torch)."""
    import transformers  # the test group's; only this helper needs it

    return transformers.AutoModelForCausalLM.from_pretrained(model_name)


def convert_to_hf(m: GPT | SmolLM, path: str | os.PathLike):
    """Writes ``m`` as a transformers checkpoint directory at ``path`` (``jaxpt.hf``'s
    layout: q_proj and o_proj transposed as they should be [D16]) and loads it with
    ``load_hf_pretrained``. ``path`` must be new or empty: a ConfigError names what it holds
    rather than overwrite it."""
    check_new_directory(path, "path")
    hf.save_pretrained(m.functional_params(), m.model_config(), path)
    return load_hf_pretrained(str(path))
