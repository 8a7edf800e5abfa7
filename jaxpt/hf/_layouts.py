"""The tables that map each transformers architecture onto a jaxpt preset, and their lookup.

Each layout (``Layout``) says which HF config key holds each model field, and which HF tensor
holds each jaxpt layer, transposed or not (``nn.Linear`` stores ``(out, in)``, jaxpt
``(in, out)``; GPT-2's ``Conv1D`` is already ``(in, out)``) and which slice of a fused tensor
it is (GPT-2's ``c_attn`` holds q, k and v). Per-layer tensors stack on jaxpt's leading layer
axis. Rotary embeddings use the same rotate-half layout on both sides: no q/k permutation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from jaxpt import models
from jaxpt.errors import ConfigError


class CheckpointError(ConfigError):
    """An HF checkpoint jaxpt cannot read or represent; the message names the offending key."""


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


FIELDS = {"weight": "weight", "bias": "bias", "scale": "weight"}  # jaxpt array -> HF tensor
GPT2_VOCAB = 50257  # GPT-2's BPE ids: a GPT-2 model with a smaller table has another tokenizer


def _prepare_gpt2(hf: dict) -> dict:
    return {**hf, "n_inner": hf["n_inner"] or 4 * hf["n_embd"]}


def _prepare_llama(hf: dict) -> dict:
    for key in ("rope_parameters", "rope_scaling"):  # transformers applies either (scaling wins)
        rope = hf.get(key) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise CheckpointError(
                f"config.json sets {key}={rope!r}: jaxpt implements plain rotary embeddings "
                "only (rope_type 'default'), not scaled ones."
            )
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, width // heads):
        raise CheckpointError(
            f"config.json sets head_dim={hf['head_dim']}, but jaxpt's head width is "
            f"hidden_size // num_attention_heads = {width // heads}."
        )
    return {
        **hf,
        "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),  # checked later
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
        lm_head_bias=False,
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
    fixed=dict(mixer="glu", position="rope", norm="rmsnorm", qk_norm=False, lm_head_bias=False),
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


# transformers' task heads that replace the language model's read-out (score, qa_outputs)
_TASK_HEAD = re.compile(r"For(SequenceClassification|TokenClassification|QuestionAnswering)$")


def _check_architectures(hf_config: Mapping, layout: Layout) -> None:
    """Raises CheckpointError when config.json's ``architectures`` names a task head (a
    classifier's ``score`` in place of ``lm_head``), which the weights would only hint at."""
    architectures = hf_config.get("architectures")
    heads = [a for a in architectures or [] if isinstance(a, str) and _TASK_HEAD.search(a)]
    if heads:
        raise CheckpointError(
            f"config.json has architectures {architectures}: a {heads[0]} checkpoint holds a "
            f"task head, not a language model's read-out; jaxpt reads causal language models "
            f"({layout.architecture}), e.g. the checkpoint it was fine-tuned from."
        )


def layout_of_hf(hf_config: Mapping) -> Layout:
    """The layout of an HF config (config.json as a dict), by its ``model_type``, once its
    ``architectures`` is a language model's."""
    model_type = hf_config.get("model_type")
    for layout in LAYOUTS:
        if layout.model_type == model_type:
            _check_architectures(hf_config, layout)
            return layout
    raise CheckpointError(
        f"config.json has model_type={model_type!r} (architectures "
        f"{hf_config.get('architectures')}): jaxpt reads 'gpt2' (GPT2LMHeadModel) and 'llama' "
        "(LlamaForCausalLM, e.g. SmolLM) checkpoints only."
    )


def layout_of(cfg) -> Layout:
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
