"""jaxpt: GPT-family language models as pure functions over parameter pytrees.

``jaxpt.models`` (the registry), ``jaxpt.nn`` (layers), ``jaxpt.data``, ``jaxpt.train``,
``jaxpt.generate`` (sampling with a KV cache).
"""

from jaxpt.generation import generate as generate
