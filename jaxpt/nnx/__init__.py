"""The original JaxPT's Flax NNX API, backed by the functional models (``pip install
jaxpt[nnx]``).

Its module paths under ``jaxpt.nnx``: ``models`` (every class and config, and the per-model
modules ``models.gpt``, ``models.smol_lm``, ...), ``infer``, ``utils``, ``checkpointers``.
Each model holds a ``jaxpt.models`` params pytree in ``nnx.Param`` variables and calls the
registry preset's ``apply``: one implementation of every layer. This is the only package that
imports flax.
"""
