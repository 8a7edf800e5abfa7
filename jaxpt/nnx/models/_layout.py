"""The original JaxPT's parameter trees (NNX_API.md §4) against the core's, both ways.

The original keeps one module per layer (``h.<i>.attn.c_attn.kernel``), fuses q, k and v
(``c_attn``: ``[q|k|v]``; GQA's ``wkv``: ``[k|v]``) and stores a RoPE table ``h.0.attn.omega``;
the core stacks each position of the mixer pattern over the layers (``blocks.<j>``, leading
axis ``r`` for layer ``i = r * len(pattern) + j``) and keeps q, k and v apart. A ``Layout``
says where each core array lives in the original's tree; ``to_original`` and ``from_original``
convert a whole params pytree. Trees here are flat: ``{"h.0.attn.c_attn.kernel": array}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt import models
from jaxpt.errors import ConfigError


class Place(NamedTuple):
    """Where one core array lives in the original's tree."""

    path: str | None  # the original's path in a layer or at the top; None: not in the original
    part: int = 0  # slice ``part`` of ``parts`` equal slices of the original's last axis
    parts: int = 1
    to_original: Callable = lambda a, cfg: a  # (core array of one layer, core config) -> its
    from_original: Callable = lambda a, cfg: a  # (the original's array, config) -> core array
    per_head: bool = False  # the core's last axis is n_head arrays at path "...{p}..." (head p)


def _linear(core: str, orig: str, part: int = 0, parts: int = 1) -> dict[str, Place]:
    return {
        f"{core}.weight": Place(f"{orig}.kernel", part, parts),
        f"{core}.bias": Place(f"{orig}.bias", part, parts),
    }


def _norm(core: str, orig: str) -> dict[str, Place]:
    return {f"{core}.scale": Place(f"{orig}.scale"), f"{core}.bias": Place(f"{orig}.bias")}


def _experts(orig: str) -> dict[str, Place]:
    """Expert weights ``(E, in, out)``; the original's biases are ``(E, 1, out)``."""
    bias = dict(to_original=lambda a, cfg: a[:, None, :], from_original=lambda a, cfg: a[:, 0, :])
    places = {}
    for core, name in (("up", "c_fc"), ("gate", "gate"), ("down", "c_proj")):
        places[f"mixer.experts.{core}.weight"] = Place(f"{orig}.experts.w_{name}")
        places[f"mixer.experts.{core}.bias"] = Place(f"{orig}.experts.b_{name}", **bias)
    return places


def _slots_to_original(phi, cfg):
    """``(D, E * C)`` slot logits -> the original's ``(E, C, D)``."""
    return phi.T.reshape(cfg.n_experts, -1, phi.shape[0])


def _slots_from_original(w, cfg):
    del cfg
    return w.reshape(-1, w.shape[-1]).T


def _mixers(mlp: str, glu: str) -> dict[str, dict[str, Place]]:
    """Each mixer kind's arrays; ``mlp`` and ``glu`` name the original's attribute."""
    return {
        "mlp": {**_linear("mixer.fc", f"{mlp}.c_fc"), **_linear("mixer.proj", f"{mlp}.c_proj")},
        "glu": {
            **_linear("mixer.gate", f"{glu}.gate"),
            **_linear("mixer.up", f"{glu}.c_fc"),
            **_linear("mixer.down", f"{glu}.c_proj"),
        },
        "moe": {**_linear("mixer.router", "moe.router_gate"), **_experts("moe")},
        "soft_moe": {
            "mixer.phi.weight": Place(
                "moe.w_router_gate",
                to_original=_slots_to_original,
                from_original=_slots_from_original,
            ),
            **_experts("moe"),
        },
    }


_FUSED_ATTENTION = {
    **_linear("attn.q", "attn.c_attn", 0, 3),
    **_linear("attn.k", "attn.c_attn", 1, 3),
    **_linear("attn.v", "attn.c_attn", 2, 3),
    **_linear("attn.o", "attn.c_proj"),
}
_GQ_ATTENTION = {
    **_linear("attn.q", "attn.wq"),
    **_linear("attn.k", "attn.wkv", 0, 2),
    **_linear("attn.v", "attn.wkv", 1, 2),
    **_linear("attn.o", "attn.wproj"),
    "attn.q_norm.scale": Place("attn.q_norm.scale"),
    "attn.k_norm.scale": Place("attn.k_norm.scale"),
}
OMEGA = "h.0.attn.omega"  # the original's RoPE table (S, hd), shared by all layers
CACHE_AND_MASK = (".attn.key_cache", ".attn.value_cache", ".attn.mask")  # not params


class Layout(NamedTuple):
    """One original class's tree: its top-level arrays and each mixer kind's block arrays."""

    top: dict[str, Place]  # core path -> place
    block: dict[str, Place]  # core path inside a block (attention, norms) -> place in h.<i>
    mixers: dict[str, dict[str, Place]]  # mixer kind -> core path inside a block -> place
    layers: str = "h"  # the original's list of layers
    slow_mask: bool = False  # its attention keeps a causal mask under "slow" (CausalSelfAttention)

    def place(self, core_path: str, kind: str | None) -> Place:
        """Where the core array ``core_path`` lives; ``kind``: its block's mixer (None: a
        top-level array)."""
        table = self.top if kind is None else {**self.block, **self.mixers[kind]}
        return table[core_path]


def gpt_layout(*, mixer: str = "mlp", gqa: bool = False) -> Layout:
    """The GPT family's: LayerNorms ``ln_1``, ``ln_2``, ``ln_f``; the MLP or GLU under
    ``mixer``."""
    return Layout(
        top={
            "wte.weight": Place("wte.embedding"),
            "wpe.weight": Place("wpe.embedding"),
            **_norm("ln_f", "ln_f"),
        },
        block={
            **_norm("ln_1", "ln_1"),
            **_norm("ln_2", "ln_2"),
            **(_GQ_ATTENTION if gqa else _FUSED_ATTENTION),
        },
        mixers=_mixers(mlp=mixer, glu=mixer),
        slow_mask=not gqa,
    )


def llama_layout(*, glu: str) -> Layout:
    """SmolLM's and the MoE models': RMSNorms ``rms_n_*``, GQ attention, the GLU under
    ``glu``."""
    return Layout(
        top={"wte.weight": Place("wte.embedding"), "ln_f.scale": Place("rms_n_f.scale")},
        block={
            "ln_1.scale": Place("rms_n_1.scale"),
            "ln_2.scale": Place("rms_n_2.scale"),
            **_GQ_ATTENTION,
        },
        mixers=_mixers(mlp="mlp", glu=glu),
    )


BIGRAM_LAYOUT = Layout(top={"table.weight": Place("embed.embedding")}, block={}, mixers={})


def _query_to_original(q, cfg):
    """The original Charformer scales scores by 1 / sqrt(n_embed), the core by
    1 / sqrt(head width): its query kernel is the core's times sqrt(n_head)."""
    return q * math.sqrt(cfg.n_head)


def _transposed(a, cfg):
    del cfg
    return a.T


CHARFORMER_LAYOUT = Layout(
    top={
        "wte.weight": Place("embed.embedding"),
        "wpe.weight": Place("pos_emb.embedding"),
        **_norm("ln_f", "ln"),
        "lm_head.weight": Place(
            "lm_head.kernel", to_original=_transposed, from_original=_transposed
        ),
        "lm_head.bias": Place("lm_head.bias"),
    },
    block={
        **_norm("ln_1", "ln1"),
        **_norm("ln_2", "ln2"),
        "attn.q.weight": Place(
            "heads.{p}.query.kernel",
            per_head=True,
            to_original=_query_to_original,
            from_original=lambda q, cfg: q / math.sqrt(cfg.n_head),
        ),
        "attn.k.weight": Place("heads.{p}.key.kernel", per_head=True),
        "attn.v.weight": Place("heads.{p}.value.kernel", per_head=True),
        **{f"attn.{name}.bias": Place(None) for name in "qkv"},  # the heads have no bias
        **_linear("attn.o", "proj"),
    },
    mixers={
        "mlp": {**_linear("mixer.fc", "ffwd.linear1"), **_linear("mixer.proj", "ffwd.linear2")}
    },
    layers="blocks",
)


def _leaves(params) -> list[tuple[str, object]]:
    """``[("blocks.0.attn.q.weight", array), ...]``."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(jax.tree_util.keystr(p, simple=True, separator="."), leaf) for p, leaf in flat]


def _split_block(name: str) -> tuple[int | None, str]:
    """``"blocks.1.attn.q.weight"`` -> ``(1, "attn.q.weight")``; a top-level name -> None."""
    if not name.startswith("blocks."):
        return None, name
    _, j, rest = name.split(".", 2)
    return int(j), rest


class Entry(NamedTuple):
    """One original array a core array (or a slice of it) goes to."""

    path: str | None  # None: the original has no such array
    layer: int  # the core's stacked index r; -1: a top-level array, not stacked
    head: int | None  # with a per-head place: the head, a slice of the core's last axis
    place: Place


def _entries(layout: Layout | None, cfg, name: str) -> list[Entry]:
    """Where the core array ``name`` goes in the original's tree; ``layout=None`` keeps the
    core's tree."""
    if layout is None:
        return [Entry(name, -1, None, Place(name))]
    j, rest = _split_block(name)
    if j is None:
        place = layout.place(rest, None)
        return [Entry(place.path, -1, None, place)]
    place = layout.place(rest, cfg.mixer_pattern[j])
    if place.path is None:
        return [Entry(None, r, None, place) for r in range(cfg.repeats)]
    width = len(cfg.mixer_pattern)
    heads = range(cfg.n_head) if place.per_head else [None]
    return [
        Entry(f"{layout.layers}.{r * width + j}.{place.path.format(p=head)}", r, head, place)
        for r in range(cfg.repeats)
        for head in heads
    ]


def _head(array, head: int | None, cfg):
    """Head ``head``'s slice of the last axis (all of it for None, the only case of a config
    without heads: Bigram's)."""
    if head is None:
        return array
    width = array.shape[-1] // cfg.n_head
    return array[..., head * width : (head + 1) * width]


def dropped(layout: Layout | None, params, cfg) -> list[str]:
    """The core arrays the original's tree has no place for that are not all zero (writing
    the original's tree would lose them)."""
    return [
        name
        for name, leaf in _leaves(params)
        if _entries(layout, cfg, name)[0].path is None and np.any(np.asarray(leaf) != 0)
    ]


def omega(cfg, dtype) -> jax.Array:
    """The original's RoPE table: ``omega[p] = p * concat(inv_freq, inv_freq)``, ``(S, hd)``."""
    return jnp.asarray(_angles(cfg), dtype)


def _angles(cfg) -> np.ndarray:
    """``omega``'s angles in float64, ``(S, hd)``."""
    inv_freq = cfg.rope_base ** (-np.arange(0, cfg.head_dim, 2) / cfg.head_dim)  # (hd / 2,)
    angles = np.arange(cfg.block_size)[:, None] * inv_freq
    return np.concatenate([angles, angles], axis=-1)


def slow_masks(cfg, dtype) -> dict[str, jax.Array]:
    """``{"h.<i>.attn.mask": mask}``: the causal mask ``tril(1)``, ``(1, 1, S, S)``, that each
    layer of the original's CausalSelfAttention keeps under ``sdpa_implementation="slow"``."""
    mask = jnp.tril(jnp.ones((cfg.block_size, cfg.block_size), dtype))[None, None]
    return {f"h.{i}.attn.mask": mask for i in range(cfg.n_layer)}


def to_original(layout: Layout | None, params, cfg, original=None) -> dict[str, jax.Array]:
    """The original's flat tree of the core ``params``. With ``original``, the original's
    config, also the arrays it keeps beside them in its ``dtype``: ``omega`` where the model
    rotates positions, and the masks of a "slow" attention that keeps them
    (``Layout.slow_mask``)."""
    parts: dict[str, list] = {}
    for name, leaf in _leaves(params):
        for path, r, head, place in _entries(layout, cfg, name):
            if path is None:
                continue
            array = _head(leaf if r < 0 else leaf[r], head, cfg)
            slot = parts.setdefault(path, [None] * place.parts)
            slot[place.part] = place.to_original(array, cfg)
    tree = {path: jnp.concatenate(p, axis=-1) if len(p) > 1 else p[0] for path, p in parts.items()}
    if original is None:
        return tree
    if cfg.position == "rope":
        tree[OMEGA] = omega(cfg, original.dtype)
    if layout.slow_mask and original.sdpa_implementation == "slow":
        tree.update(slow_masks(cfg, original.dtype))
    return tree


def from_original(layout: Layout | None, tree: Mapping[str, np.ndarray], abstract, cfg, what: str):
    """Core params shaped like ``abstract`` (``jax.eval_shape`` of init) from the original's
    flat ``tree``.

    Raises ConfigError naming the first original path that is missing, has another shape, or
    has no place in ``what`` (the class and config, for the message).
    """
    used = set()

    def read(path: str | None, place: Place, shape: tuple[int, ...]) -> np.ndarray:
        if path is None:  # not in the original: zero (an attention bias it has not)
            return np.zeros(shape, np.float32)
        if path not in tree:
            raise ConfigError(f"the checkpoint has no {path!r}, which {what} needs.")
        array = np.asarray(tree[path])
        if place.parts > 1:
            array = np.split(array, place.parts, axis=-1)[place.part]
        array = place.from_original(array, cfg)
        if array.shape != shape:
            raise ConfigError(
                f"the checkpoint's {path!r} gives shape {array.shape}, but {what} needs "
                f"{shape}: pass the config the checkpoint was saved with."
            )
        used.add(path)
        return array

    def fill(key_path, leaf):
        name = jax.tree_util.keystr(key_path, simple=True, separator=".")
        entries = _entries(layout, cfg, name)
        stacked = entries[0].layer >= 0
        shape = leaf.shape[1:] if stacked else leaf.shape
        layers: dict[int, list] = {}
        for path, r, head, place in entries:
            piece = shape if head is None else (*shape[:-1], shape[-1] // cfg.n_head)
            layers.setdefault(r, []).append(read(path, place, piece))
        arrays = [np.concatenate(pieces, axis=-1) for _, pieces in sorted(layers.items())]
        return jnp.asarray(np.stack(arrays) if stacked else arrays[0], leaf.dtype)

    params = jax.tree_util.tree_map_with_path(fill, abstract)
    if isinstance(cfg, models.ModelConfig) and cfg.position == "rope":
        _check_rope_table(tree, cfg, what)
        used.add(OMEGA)
    _check_all_used(tree, used, what)
    return params


def _check_rope_table(tree: Mapping[str, np.ndarray], cfg, what: str) -> None:
    """Raises ConfigError if the original's rotary table, where ``tree`` holds one, is not the
    config's: another shape ``(block_size, head_dim)``, or the angles of another base (the
    original restores the table it saved; here it is computed from the config)."""
    if OMEGA not in tree:
        return
    stored, want = np.asarray(tree[OMEGA]), (cfg.block_size, cfg.head_dim)
    if stored.shape != want:
        raise ConfigError(
            f"the checkpoint's {OMEGA!r} has shape {stored.shape}, but {what} "
            f"needs {want} (block_size, head width): pass the config it was saved with."
        )
    if not np.allclose(stored.astype(np.float64), _angles(cfg), **_rounding(cfg, stored.dtype)):
        raise ConfigError(
            f"the checkpoint's {OMEGA!r} holds the rotary angles of another rope_theta than "
            f"{what} has ({1 / cfg.rope_base:.6g}): pass the rope_theta it was saved with."
        )


def _rounding(cfg, dtype) -> dict[str, float]:
    """``np.allclose``'s tolerances for a RoPE table the original computed in ``dtype``
    (bfloat16 too [D12]): half an eps for each of its four roundings and for the exponent's,
    which ``ln(rope_base)`` scales; angles below the smallest subnormal, absolutely."""
    finfo = jnp.finfo(dtype)
    rtol = (abs(math.log(cfg.rope_base)) / 2 + 2) * float(finfo.eps)
    return {"rtol": rtol, "atol": cfg.block_size * float(finfo.smallest_subnormal)}


def _check_all_used(tree: Mapping[str, np.ndarray], used: set[str], what: str) -> None:
    """Raises ConfigError naming the first path of ``tree`` outside ``used`` (the original's
    kv caches and causal masks aside)."""
    extra = [p for p in tree if p not in used and not p.endswith(CACHE_AND_MASK)]
    if extra:
        raise ConfigError(
            f"the checkpoint holds {extra[0]!r} ({len(extra)} such arrays), which has no place "
            f"in {what}: pass the config the checkpoint was saved with."
        )


def nest(flat: Mapping[str, object]) -> dict:
    """``{"a.0.b": x}`` -> ``{"a": {"0": {"b": {"value": x}}}}``, the on-disk form."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path.split("."):
            node = node.setdefault(key, {})
        node["value"] = value
    return tree


def flatten(tree: Mapping) -> dict[str, object]:
    """The inverse of ``nest``."""
    flat = {}
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator=".")  # lists too: "a.0.b"
        flat[name.removesuffix(".value")] = value
    return flat
