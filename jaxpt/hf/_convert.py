"""Conversion between jaxpt and transformers, pure (no I/O): model configs both ways, params
to and from a state dict (name -> array), and the check of a model config against an HF
config."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt import models
from jaxpt.errors import ConfigError
from jaxpt.hf._layouts import FIELDS, CheckpointError, Layout, Source, layout_of, layout_of_hf

_FIX = "correct config.json or fetch the checkpoint again"


def _check_sizes(layout: Layout, hf: Mapping) -> None:
    """Raises CheckpointError naming the first size key of ``hf`` (config.json over the
    layout's defaults) that is not a positive integer; None stands for a derived size only
    where transformers derives it (``n_inner``, ``num_key_value_heads``)."""
    preset = models.get(layout.preset).default_config().to_dict()
    derived = {key for key, value in layout.defaults.items() if value is None}
    sizes = [key for field, key in layout.keys.items() if type(preset[field]) is int]
    for key in sizes:
        value = hf[key]
        if value is None and key in derived:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(
                f"config.json sets {key}={value!r}, which must be a positive integer: {_FIX}."
            )


def _in_hf_terms(error: ConfigError, layout: Layout) -> CheckpointError:
    """``error``, about model fields the HF config set, reworded with their config.json keys."""

    def rename(match: re.Match) -> str:
        field = match[2]
        named = match[1] or "_" in field  # model.x, or a bare field name such as n_head
        return layout.keys[field] if field in layout.keys and named else match[0]

    message = re.sub(r"(model\.)?\b(\w+)\b", rename, str(error)).rstrip(".")
    return CheckpointError(f"config.json: {message}; {_FIX}.")


def _fields_of_hf(layout: Layout, hf_config: Mapping) -> dict[str, Any]:
    """The jaxpt model fields an HF config sets, after rejecting what jaxpt cannot represent."""
    hf = {**layout.defaults, **hf_config}
    _check_sizes(layout, hf)
    for key, value in layout.required.items():
        if hf.get(key, value) != value:
            raise CheckpointError(
                f"config.json sets {key}={hf[key]!r}, which jaxpt does not implement "
                f"(it needs {key}={value!r})."
            )
    hf = layout.prepare(hf)
    fields = {}
    for field, key in layout.keys.items():
        value = hf[key]
        if field in layout.values:
            if value not in layout.values[field]:
                raise CheckpointError(
                    f"config.json sets {key}={value!r}, which jaxpt does not implement; it "
                    f"reads {sorted(layout.values[field])}."
                )
            value = layout.values[field][value]
        fields[field] = value
    return fields


def config_from_hf(hf_config: Mapping, **overrides) -> models.ModelConfig:
    """The jaxpt model config of a transformers config (config.json as a dict).

    The registry preset ``gpt`` (GPT-2) or ``smollm`` (Llama) with the sizes, heads, epsilon,
    rope base, biases and tying of ``hf_config``, computing in float32 (logits too).
    ``overrides`` set other model fields (``dtype="bfloat16"``, ``remat_policy``, ...); the
    ones the checkpoint determines cannot be overridden.
    """
    layout = layout_of_hf(hf_config)
    fields = {**layout.fixed, **_fields_of_hf(layout, hf_config)}
    for field in overrides:
        if field in fields:
            key = layout.keys.get(field, f"the {layout.architecture} layout's {field}")
            raise ConfigError(
                f"model.{field} comes from the checkpoint ({key}={fields[field]!r}) and cannot "
                "be overridden."
            )
    preset = models.get(layout.preset).default_config()
    float32 = dict(dtype="float32", param_dtype="float32", logits_dtype="float32")
    try:
        imported = models.ModelConfig.from_dict({**preset.to_dict(), **float32, **fields})
    except ConfigError as error:
        raise _in_hf_terms(error, layout) from None
    return models.ModelConfig.from_dict({**imported.to_dict(), **overrides})


def config_to_hf(cfg) -> dict[str, Any]:
    """The transformers config (config.json as a dict) of the jaxpt model config ``cfg``.

    Raises ConfigError naming the first field that neither GPT2LMHeadModel nor
    LlamaForCausalLM can represent (MoE mixers, QK-norm, a GPT-2 with GQA, ...).
    """
    layout = layout_of(cfg)
    hf = {"architectures": [layout.architecture], "model_type": layout.model_type}
    hf.update(layout.extra)
    fields = cfg.to_dict()
    for field, key in layout.keys.items():
        value = fields[field]
        if field in layout.values:
            inverse = {}
            for hf_value, ours in layout.values[field].items():
                inverse.setdefault(ours, hf_value)
            if value not in inverse:
                raise ConfigError(
                    f"model.{field}={value!r} has no {layout.architecture} counterpart; it "
                    f"takes {sorted(inverse)}."
                )
            value = inverse[value]
        if key in hf and hf[key] != value:
            raise ConfigError(
                f"model.{field}={value!r} does not fit {layout.architecture}: its {key} is "
                f"already {hf[key]!r}."
            )
        hf[key] = value
    hf.update(dtype=cfg.param_dtype, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return hf


def _leaf_name(path) -> str:
    """``blocks.0.attn.q.weight`` for the key path of that array."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _hf_key(layout: Layout, name: str) -> tuple[str, Source]:
    """The HF tensor name (with ``{i}``) of the jaxpt array ``name``, and its source."""
    module, field = name.rsplit(".", 1)
    source = layout.tensors[module]
    return f"{source.module}.{FIELDS[field]}", source


def _hf_shape(shape: tuple[int, ...], source: Source) -> tuple[int, ...]:
    """The HF tensor's shape that holds a jaxpt array of ``shape``."""
    shape = shape[::-1] if source.transpose else shape
    return (*shape[:-1], shape[-1] * source.parts)


def _take(state: Mapping, key: str, source: Source, shape: tuple[int, ...]) -> np.ndarray:
    """The HF tensor ``key`` as a jaxpt array of ``shape``, its shape checked first."""
    want = _hf_shape(shape, source)
    if key not in state:
        raise CheckpointError(f"the checkpoint has no {key!r}, which the config needs ({want}).")
    array = np.asarray(state[key])
    if array.shape != want:
        raise CheckpointError(
            f"{key!r} has shape {array.shape}, but the config needs {want}: config.json and "
            "the weights disagree."
        )
    if source.parts > 1:
        array = np.split(array, source.parts, axis=-1)[source.part]
    return array.T if source.transpose else array


def _with_prefix(state: Mapping, layout: Layout) -> Mapping:
    """A base-model checkpoint's keys (``h.0...`` for ``transformer.h.0...``) made whole."""
    prefix = layout.tensors["wte"].module.split(".")[0] + "."
    if any(k.startswith(prefix) for k in state):
        return state
    return {k if k.startswith("lm_head.") else prefix + k: v for k, v in state.items()}


def _check_tied_read_out(state: Mapping, layout: Layout) -> str:
    """The read-out's HF key of a tied checkpoint (whose embedding ``from_state_dict`` read),
    once its tensor, where ``state`` holds one (a ``.bin`` holds both), equals the embedding's;
    CheckpointError where it differs: transformers then keeps the two untied (and warns), while
    jaxpt would read the embedding alone."""
    embedding = f"{layout.tensors['wte'].module}.weight"
    read_out = f"{layout.tensors['lm_head'].module}.weight"
    tie = layout.keys["tie_embeddings"]
    if read_out in state and not np.array_equal(state[read_out], state[embedding]):
        raise CheckpointError(
            f"config.json sets {tie}=true, but the checkpoint's {read_out!r} differs from "
            f"{embedding!r} (transformers then leaves the two untied): set {tie}=false in "
            "config.json to read them so."
        )
    return read_out


def from_state_dict(state: Mapping[str, Any], cfg):
    """jaxpt params for ``cfg`` from a transformers state dict (name -> array).

    The target shapes come from ``jax.eval_shape`` of the model's ``init``; each array is
    read from its HF tensor (stacked over layers, transposed, sliced) and cast to
    ``cfg.param_dtype``. Raises CheckpointError naming the first HF key that is missing, has
    the wrong shape, or has no place in jaxpt's layout, and where a tied config's checkpoint
    holds a read-out that is not its embedding.
    """
    layout = layout_of(cfg)
    state = _with_prefix(state, layout)
    abstract = jax.eval_shape(lambda k: models.get(cfg.name).init(k, cfg), jax.random.key(0))
    used = set()

    def fill(path, leaf):
        name = _leaf_name(path)
        key, source = _hf_key(layout, name)
        if not name.startswith("blocks."):
            used.add(key)
            return jnp.asarray(_take(state, key, source, leaf.shape), leaf.dtype)
        keys = [key.format(i=i) for i in range(leaf.shape[0])]
        used.update(keys)
        layers = [_take(state, k, source, leaf.shape[1:]) for k in keys]
        return jnp.asarray(np.stack(layers), leaf.dtype)

    params = jax.tree_util.tree_map_with_path(fill, abstract)
    tied = {_check_tied_read_out(state, layout)} if cfg.tie_embeddings else set()
    extra = [k for k in state if k not in used | tied and not re.search(layout.ignored, k)]
    if extra:
        raise CheckpointError(
            f"the checkpoint holds {extra[0]!r} ({len(extra)} such tensors), which has no place "
            f"in jaxpt's {layout.architecture} layout."
        )
    return params


def to_state_dict(params, cfg) -> dict[str, np.ndarray]:
    """The transformers state dict (name -> numpy array) of jaxpt params for ``cfg``.

    A tied read-out is not written (transformers ties it to the token embedding on load).
    """
    layout = layout_of(cfg)
    parts: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _leaf_name(path)
        key, source = _hf_key(layout, name)
        array = np.asarray(leaf)
        layers = enumerate(array) if name.startswith("blocks.") else [(None, array)]
        for i, layer in layers:
            slot = parts.setdefault(key.format(i=i), [None] * source.parts)
            slot[source.part] = layer.T if source.transpose else layer
    return {k: np.ascontiguousarray(np.concatenate(p, axis=-1)) for k, p in parts.items()}


def check_fields(model_config, hf_config: Mapping, init_from: str) -> None:
    """Raises ConfigError naming the first field of ``model_config`` that differs from the HF
    config ``hf_config`` of the checkpoint ``init_from`` (a run's ``checkpoint.init_from``).

    ``block_size`` must equal the checkpoint's with learned positions (the table's size);
    with rotary ones it may be shorter.
    """
    if not isinstance(model_config, models.ModelConfig):
        layout_of(model_config)  # the bigram: no layout, one sentence
    layout = layout_of_hf(hf_config)
    ours = model_config.to_dict()
    for field, value in {**layout.fixed, **_fields_of_hf(layout, hf_config)}.items():
        if field == "block_size" and model_config.position != "learned" and ours[field] <= value:
            continue
        if ours[field] != value:
            key = layout.keys.get(field)
            where = f"{key} in its config.json" if key else f"its {layout.architecture} layout"
            raise ConfigError(
                f"model.{field}={ours[field]!r} does not match checkpoint.init_from="
                f"{init_from!r}, which has {value!r} ({where}): set "
                f"--config.model.{field}={value}."
            )
