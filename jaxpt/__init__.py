"""jaxpt: GPT-family language models as pure functions over parameter pytrees.

``jaxpt.models`` (the registry), ``jaxpt.nn`` (layers), ``jaxpt.data``, ``jaxpt.train``,
``jaxpt.generate`` (sampling with a KV cache), ``jaxpt.chat`` (a chat model's reply).

``generate`` and ``chat`` are imported on first use, so that ``python -m jaxpt.data.prepare``
and its worker processes start without importing jax.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxpt.generation import chat, generate

__all__ = ["chat", "generate"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("jaxpt.generation"), name)
    raise AttributeError(f"module 'jaxpt' has no attribute {name!r}")
