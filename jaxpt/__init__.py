"""jaxpt: GPT-family language models as pure functions over parameter pytrees.

``jaxpt.models`` (the registry), ``jaxpt.nn`` (layers), ``jaxpt.data``, ``jaxpt.train``,
``jaxpt.generate`` (sampling with a KV cache), ``jaxpt.chat`` (a chat model's reply).
"""

from jaxpt.generation import chat as chat
from jaxpt.generation import generate as generate
