"""The original's Hugging Face helpers, on ``jaxpt.hf``: a local checkpoint directory (or a
hub name, downloaded when the network allows) where the original always downloads."""

from __future__ import annotations

import dataclasses
import os

import jax
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


_SMOLLM = "HuggingFaceTB/SmolLM-135M"  # the original's default checkpoint

# SmolLM_Config's fields that say how to run the model, not what a checkpoint holds
_RUN_FIELDS = ("name", "dtype", "param_dtype", "sdpa_implementation", "use_cache", "pad_token")


def from_hf_pretrained(
    config: SmolLM_Config | None, rngs: nnx.Rngs, path: str | os.PathLike | None = None
) -> SmolLM:
    """A SmolLM holding the Llama checkpoint at ``path``, its params in ``param_dtype``; the
    shapes come from its config.json, and ``config`` gives the fields no checkpoint holds
    (``_RUN_FIELDS``). ``path`` None reads the checkpoint ``config.name`` names, as the
    original does; SmolLM-135M for no config or the default name "SmolLM", which names none
    [D15]."""
    if path is None:
        named = config is not None and config.name != SmolLM_Config.name
        path = config.name if named else _SMOLLM
    pretrained = hf.from_pretrained(path)
    run = {} if config is None else {field: getattr(config, field) for field in _RUN_FIELDS}
    smol = dataclasses.replace(SmolLM_Config.from_model_config(pretrained.config), **run)
    param_dtype = smol.model_config().param_dtype  # a ConfigError for a value that is no dtype
    params = jax.tree.map(lambda a: a.astype(param_dtype), pretrained.params)
    return SmolLM.from_params(params, smol, rngs)


def load_hf_pretrained(model_name: str = _SMOLLM):
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
