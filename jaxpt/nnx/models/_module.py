"""The NNX module every adapter class is: the core's params pytree in ``nnx.Param`` variables,
and calls into ``jaxpt.models`` for the forward pass, the KV cache and checkpoints.

No layer is implemented here: ``__call__`` runs the registry model's ``apply`` (or ``decode``
with a cache) on the params the module holds, so ``nnx.jit``, ``nnx.grad``,
``nnx.Optimizer``, ``nnx.split``/``merge`` and ``nnx.eval_shape`` see ordinary Params.
"""

from __future__ import annotations

import functools
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax import Array

from jaxpt import models, train
from jaxpt.errors import ConfigError
from jaxpt.nnx.models import _layout
from jaxpt.nnx.models._config import Config


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _values(variables):
    """The arrays of a pytree of nnx Variables."""
    return jax.tree.map(lambda v: v.get_value(), variables, is_leaf=_is_variable)


@functools.partial(jax.jit, static_argnums=1)
def init_params(key: Array, cfg):
    """The registry model's params for ``cfg`` (jitted: one compile instead of one per op)."""
    return models.get(cfg.name).init(key, cfg)


def save_new_checkpoint(path: str | os.PathLike, tree) -> None:
    """Writes ``tree`` as an orbax checkpoint directory at ``path``; ConfigError if ``path``
    exists (orbax's own ValueError names no way out)."""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        raise ConfigError(
            f"{path} exists already, and a checkpoint is never written over anything: save "
            "to a new path (another step or run directory), or move it away first."
        )
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()


def _by_name(tree) -> dict[str, Any]:
    """The leaves of ``tree`` by dotted path: ``{"blocks.0.attn.q.weight": array}``."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k, simple=True, separator="."): leaf for k, leaf in flat}


def _fitted(params, abstract, what: str):
    """``params`` in the structure of ``abstract`` (``jax.eval_shape`` of the params ``what``,
    a class and config, needs), each array as it is.

    Raises ConfigError naming the first array of ``abstract`` that ``params`` lack or hold in
    another shape, or else the first that ``params`` hold beyond it.
    """
    have, need = _by_name(params), _by_name(abstract)
    trained = "pass the config they were trained with"
    for name, like in need.items():
        if name not in have:
            raise ConfigError(f"the params have no {name}, which {what} needs: {trained}.")
        if tuple(have[name].shape) != like.shape:
            raise ConfigError(
                f"the params' {name} has shape {tuple(have[name].shape)}, but {what} needs "
                f"{like.shape}: {trained}."
            )
    extra = [name for name in have if name not in need]
    if extra:
        raise ConfigError(f"the params hold {extra[0]}, which has no place in {what}: {trained}.")
    return jax.tree.unflatten(jax.tree.structure(abstract), [have[name] for name in need])


def _default_rngs() -> nnx.Rngs:
    """The original's ``from_checkpoint`` streams."""
    return nnx.Rngs(default=1337, gate_noise=42)


def _check_mask(mask: Array | None, idx: Array) -> None:
    """ConfigError unless ``mask`` is None or bool shaped as the ``(B, T)`` tokens ``idx``."""
    if mask is None:
        return
    shape, dtype = jnp.shape(mask), jnp.asarray(mask).dtype
    if shape != jnp.shape(idx) or dtype != jnp.bool_:
        raise ConfigError(
            f"mask has shape {shape} and dtype {dtype}: it must be bool, shaped as "
            f"the tokens {jnp.shape(idx)} (True for a real token): pass e.g. mask.astype(bool)."
        )


class FunctionalModel(nnx.Module):
    """An NNX model whose params are a ``jaxpt.models`` params pytree.

    ``params``: that pytree with every array in an ``nnx.Param``; ``rngs``: the streams
    dropout and router noise draw from; ``kv_cache``: the keys and values of the tokens seen
    so far when the config's ``use_cache`` is on (None until the first call).
    """

    layout: ClassVar[_layout.Layout | None] = None  # the original's tree; None: the core's
    deterministic: bool = True  # dropout off (``train()`` / ``eval()`` set it)

    def _set_up(self, params, rngs: nnx.Rngs) -> None:
        self.params = nnx.data(jax.tree.map(nnx.Param, params))
        self.rngs = rngs
        self.kv_cache = nnx.data(None)

    def model_config(self) -> models.ModelConfig | models.BigramConfig:
        """The core config this model computes with (read on every call)."""
        raise NotImplementedError

    def functional_params(self):
        """The params as the ``jaxpt.models`` pytree of arrays (``apply``'s first argument)."""
        return _values(self.params)

    def _use_cache(self) -> bool:
        return False

    def _randomness(self, cfg):
        """The config and key of the next call: ``(cfg, None)`` for a deterministic model;
        classes with dropout or router noise draw the key from ``rngs``."""
        return cfg, None

    def _run(self, idx: Array, mask: Array | None) -> tuple[Array, dict[str, Array]]:
        """``(B, T)`` tokens -> the core's ``(logits, aux)``, through the cache if it is on."""
        _check_mask(mask, idx)
        cfg = self.model_config()
        model = models.get(cfg.name)
        params = self.functional_params()
        if self._use_cache():
            return self._run_cached(model, params, idx, cfg, mask)
        cfg, key = self._randomness(cfg)
        return model.apply(params, idx, cfg, mask=mask, key=key)

    def _run_cached(self, model, params, idx, cfg, mask):
        """Prefill or extend the cache with ``idx``: logits at every new position, as the
        original returns them; aux losses are zero (the MoE classes refuse their training
        flags with the cache)."""
        if mask is not None:
            raise ConfigError(
                "mask is not supported with use_cache=True: the cached keys and values are "
                "all attended to; call with mask=None or turn use_cache off."
            )
        b, n = idx.shape
        cache = None if self.kv_cache is None else _values(self.kv_cache)
        length = 0 if cache is None else jax.tree.leaves(cache)[0].shape[2]
        if length + n > cfg.block_size:
            raise ConfigError(
                f"the KV cache holds {length} positions and {n} more would pass "
                f"block_size={cfg.block_size}: reset it with model.reset_cache()."
            )
        if cache is None:
            cache = model.init_cache(b, n, cfg)
            if cache is None:
                raise ConfigError(
                    f"model {cfg.name!r} cannot be cached: a later token changes how earlier "
                    "ones are routed (MoE capacity, Soft MoE); set use_cache=False."
                )
        elif jax.tree.leaves(cache)[0].shape[1] != b:
            raise ConfigError(
                f"the KV cache holds a batch of {jax.tree.leaves(cache)[0].shape[1]} sequences, "
                f"not {b}: reset it with model.reset_cache() to start another batch."
            )
        else:  # (layers, B, S, K, Dh): room for the n new positions
            cache = jax.tree.map(
                lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, n), (0, 0), (0, 0)]), cache
            )
        positions = jnp.broadcast_to(length + jnp.arange(n), (b, n))
        logits, cache = model.decode(params, idx, cfg, at=None, positions=positions, cache=cache)
        self.kv_cache = nnx.data(jax.tree.map(nnx.Cache, cache))
        return logits, {k: jnp.zeros((), jnp.float32) for k in models.AUX_KEYS}

    def reset_cache(self) -> None:
        """Forgets the cached keys and values (the original sets each block's
        ``attn.key_cache`` and ``attn.value_cache`` to None)."""
        self.kv_cache = nnx.data(None)

    # ------------------------------------------------------------ checkpoints

    def _original_config(self) -> Config | None:
        """The original's config, by which its tree also holds a RoPE table and "slow"
        attention masks (None: the class has none, as Bigram and Charformer)."""
        return None

    def original_tree(self) -> dict:
        """The params in the original JaxPT's nested on-disk form (NNX_API.md §8):
        ``{"h": {"0": {"attn": {"c_attn": {"kernel": {"value": array}}}}}}``."""
        params, cfg = self.functional_params(), self.model_config()
        lost = _layout.dropped(self.layout, params, cfg)
        if lost:
            raise ConfigError(
                f"{lost[0]} is not zero, and the original {type(self).__name__} has no such "
                "parameter: its tree cannot hold these params."
            )
        return _layout.nest(_layout.to_original(self.layout, params, cfg, self._original_config()))

    def save_checkpoint(self, fpath: str | os.PathLike) -> None:
        """Writes ``original_tree()`` as an orbax checkpoint directory at ``fpath``, which must
        not exist yet (a ConfigError, a ValueError as orbax's, rather than overwrite it); the
        original JaxPT's ``from_checkpoint`` reads it."""
        save_new_checkpoint(fpath, self.original_tree())

    def _params_from_tree(self, tree) -> Any:
        """Core params for this model's config from a tree in the original's on-disk form."""
        cfg = self.model_config()
        abstract = jax.eval_shape(lambda: self.functional_params())
        what = f"{type(self).__name__} with this config"
        return _layout.from_original(self.layout, _layout.flatten(tree), abstract, cfg, what)

    def load_original_tree(self, tree) -> None:
        """Replaces the params with those of ``tree`` (the original's on-disk form).

        Raises ConfigError naming the first path that is missing, has another shape or has
        no place in this model's config.
        """
        self.params = nnx.data(jax.tree.map(nnx.Param, self._params_from_tree(tree)))


class ConfiguredModel(FunctionalModel):
    """A model built as ``Cls(config, rngs)`` from one of the original's config classes."""

    config_class: ClassVar[type[Config]] = Config
    has_cache: ClassVar[bool] = False  # the config has use_cache (GQ-attention classes)

    def __init__(self, config: Config | None = None, rngs: nnx.Rngs | None = None):
        self.config = self.config_class() if config is None else config
        rngs = _default_rngs() if rngs is None else rngs
        cfg = self.model_config()
        self._set_up(init_params(rngs.params(), cfg), rngs)

    def model_config(self) -> models.ModelConfig:
        return self.config.model_config()

    def _original_config(self) -> Config:
        return self.config

    def _use_cache(self) -> bool:
        return self.has_cache and self.config.use_cache

    @classmethod
    def _abstract(cls, config: Config | None):
        """The model for ``config`` with abstract params: nothing initialised."""
        return nnx.eval_shape(lambda: cls(config, nnx.Rngs(0)))

    def _fill(self, params, rngs: nnx.Rngs | None):
        self._set_up(params, _default_rngs() if rngs is None else rngs)
        return self

    @classmethod
    def from_params(cls, params, config: Config | None = None, rngs: nnx.Rngs | None = None):
        """The model holding the core ``params`` (e.g. from a jaxpt run) for ``config``.

        ``config`` defaults to the class's default; ``Cls.config_class.from_model_config``
        converts a core config. Nothing is initialised: the params are used as they are.
        """
        model = cls._abstract(config)
        what = f"{cls.__name__} with this config"
        return model._fill(_fitted(params, jax.eval_shape(model.functional_params), what), rngs)

    @classmethod
    def from_checkpoint(
        cls,
        fpath: str | os.PathLike,
        rngs: nnx.Rngs | None = None,
        config: Config | None = None,
        sharding: jax.sharding.Sharding | None = None,
    ):
        """The model for ``config`` (None: the class's default) with the params of the
        checkpoint directory ``fpath``, written by ``save_checkpoint`` here or in the original
        JaxPT. ``sharding`` (optional) places the params; ``rngs`` defaults to the original's
        ``Rngs(default=1337, gate_noise=42)``.

        Raises ConfigError naming ``fpath`` when it is missing, incomplete or damaged, or
        the first path that does not fit ``config``.
        """
        model = cls._abstract(config)
        params = model._params_from_tree(train.read_tree(fpath))
        if sharding is not None:
            params = jax.device_put(params, sharding)
        return model._fill(params, rngs)
