"""Hugging Face interop: GPT-2 and Llama (SmolLM) checkpoints into and out of jaxpt.

``from_pretrained`` reads a transformers checkpoint (a directory with config.json and
safetensors or PyTorch weights, a hub name, or an in-memory model) as a jaxpt model config and
params; ``save_pretrained`` writes params as a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads. Two layouts:

    GPT2LMHeadModel  <-> preset gpt     learned positions, GELU MLP, LayerNorm, biases
    LlamaForCausalLM <-> preset smollm  rotary, SiLU GLU, RMSNorm, GQA, tied or untied

``_layouts`` holds the tables, ``_convert`` the conversions (pure, no I/O), ``_files`` the
file and hub I/O, ``__main__`` the command line (``python -m jaxpt.hf``, whose
``import_checkpoint`` and ``export_checkpoint`` live there: it is an entry point like
launch.py, and the one part of this package that imports ``jaxpt.train``).

The names below import their module (and jax) on first use: ``python -m jaxpt.hf`` imports
this package before its ``__main__`` runs, which turns Ctrl-C during the seconds of imports
into one line.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxpt.hf._convert import check_fields as check_fields
    from jaxpt.hf._convert import config_from_hf as config_from_hf
    from jaxpt.hf._convert import config_to_hf as config_to_hf
    from jaxpt.hf._convert import from_state_dict as from_state_dict
    from jaxpt.hf._convert import to_state_dict as to_state_dict
    from jaxpt.hf._files import Pretrained as Pretrained
    from jaxpt.hf._files import check_init_from as check_init_from
    from jaxpt.hf._files import eos_ids as eos_ids
    from jaxpt.hf._files import from_pretrained as from_pretrained
    from jaxpt.hf._files import init_from_tokenizer as init_from_tokenizer
    from jaxpt.hf._files import load_init_from as load_init_from
    from jaxpt.hf._files import save_pretrained as save_pretrained
    from jaxpt.hf._layouts import GPT2 as GPT2
    from jaxpt.hf._layouts import LAYOUTS as LAYOUTS
    from jaxpt.hf._layouts import LLAMA as LLAMA
    from jaxpt.hf._layouts import CheckpointError as CheckpointError
    from jaxpt.hf._layouts import Layout as Layout
    from jaxpt.hf._layouts import Source as Source

_MODULES = {  # each name above -> its module
    **dict.fromkeys(
        ["check_fields", "config_from_hf", "config_to_hf", "from_state_dict", "to_state_dict"],
        "_convert",
    ),
    **dict.fromkeys(
        [
            "Pretrained",
            "check_init_from",
            "eos_ids",
            "from_pretrained",
            "init_from_tokenizer",
            "load_init_from",
            "save_pretrained",
        ],
        "_files",
    ),
    **dict.fromkeys(
        ["GPT2", "LAYOUTS", "LLAMA", "CheckpointError", "Layout", "Source"], "_layouts"
    ),
}
__all__ = list(_MODULES)


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(f"jaxpt.hf.{_MODULES[name]}"), name)
    raise AttributeError(f"module 'jaxpt.hf' has no attribute {name!r}")
