"""The original JaxPT's parameter trees (NNX_API.md §4) against the core's, both ways.

The original keeps one module per layer (``h.<i>.attn.c_attn.kernel``), fuses q, k and v
(``c_attn``: ``[q|k|v]``; GQA's ``wkv``: ``[k|v]``) and stores a RoPE table ``h.0.attn.omega``;
the core stacks each position of the mixer pattern over the layers (``blocks.<j>``, leading
axis ``r`` for layer ``i = r * len(pattern) + j``) and keeps q, k and v apart. A ``Layout``
says where each core array lives in the original's tree; ``to_original`` and ``from_original``
convert a whole params pytree. Trees here are flat: ``{"h.0.attn.c_attn.kernel": array}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt import models
from jaxpt.errors import ConfigError


class Place(NamedTuple):
    """Where one core array lives in the original's tree."""

    path: str  # the original's path; "{i}" stands for the layer index
    part: int = 0  # slice ``part`` of ``parts`` equal slices of the original's last axis
    parts: int = 1
    to_original: Callable = lambda a, cfg: a  # (core array of one layer, core config) -> its
    from_original: Callable = lambda a: a  # the original's array -> core array of one layer


def _linear(core: str, orig: str, part: int = 0, parts: int = 1) -> dict[str, Place]:
    return {
        f"{core}.weight": Place(f"{orig}.kernel", part, parts),
        f"{core}.bias": Place(f"{orig}.bias", part, parts),
    }


def _norm(core: str, orig: str) -> dict[str, Place]:
    return {f"{core}.scale": Place(f"{orig}.scale"), f"{core}.bias": Place(f"{orig}.bias")}


def _experts(orig: str) -> dict[str, Place]:
    """Expert weights ``(E, in, out)``; the original's biases are ``(E, 1, out)``."""
    bias = dict(to_original=lambda a, cfg: a[:, None, :], from_original=lambda a: a[:, 0, :])
    places = {}
    for core, name in (("up", "c_fc"), ("gate", "gate"), ("down", "c_proj")):
        places[f"mixer.experts.{core}.weight"] = Place(f"{orig}.experts.w_{name}")
        places[f"mixer.experts.{core}.bias"] = Place(f"{orig}.experts.b_{name}", **bias)
    return places


def _slots_to_original(phi, cfg):
    """``(D, E * C)`` slot logits -> the original's ``(E, C, D)``."""
    return phi.T.reshape(cfg.n_experts, -1, phi.shape[0])


def _slots_from_original(w):
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


def _original_path(layout: Layout | None, cfg, name: str) -> list[tuple[str, int, Place]]:
    """Each (original path, stacked index r, place) the core array ``name`` spreads over
    (r = -1: a top-level array, not stacked); ``layout=None`` keeps the core's tree."""
    if layout is None:
        return [(name, -1, Place(name))]
    j, rest = _split_block(name)
    if j is None:
        place = layout.place(rest, None)
        return [(place.path, -1, place)]
    place = layout.place(rest, cfg.mixer_pattern[j])
    width = len(cfg.mixer_pattern)
    return [(f"h.{r * width + j}.{place.path}", r, place) for r in range(cfg.repeats)]


def omega(cfg, dtype) -> jax.Array:
    """The original's RoPE table: ``omega[p] = p * concat(inv_freq, inv_freq)``, ``(S, hd)``."""
    inv_freq = cfg.rope_base ** (-jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim)
    angles = jnp.arange(cfg.block_size, dtype=jnp.float32)[:, None] * inv_freq
    return jnp.concatenate([angles, angles], axis=-1).astype(dtype)


def to_original(layout: Layout | None, params, cfg, omega_dtype=None) -> dict[str, jax.Array]:
    """The original's flat tree of the core ``params`` (with ``omega`` in ``omega_dtype``
    where the model rotates positions)."""
    parts: dict[str, list] = {}
    for name, leaf in _leaves(params):
        for path, r, place in _original_path(layout, cfg, name):
            array = leaf if r < 0 else leaf[r]
            slot = parts.setdefault(path, [None] * place.parts)
            slot[place.part] = place.to_original(array, cfg)
    tree = {path: jnp.concatenate(p, axis=-1) if len(p) > 1 else p[0] for path, p in parts.items()}
    if omega_dtype is not None and isinstance(cfg, models.ModelConfig) and cfg.position == "rope":
        tree[OMEGA] = omega(cfg, omega_dtype)
    return tree


def from_original(layout: Layout | None, tree: Mapping[str, np.ndarray], abstract, cfg, what: str):
    """Core params shaped like ``abstract`` (``jax.eval_shape`` of init) from the original's
    flat ``tree``.

    Raises ConfigError naming the first original path that is missing, has another shape, or
    has no place in ``what`` (the class and config, for the message).
    """
    used = set()

    def read(path: str, place: Place, shape: tuple[int, ...]) -> np.ndarray:
        if path not in tree:
            raise ConfigError(f"the checkpoint has no {path!r}, which {what} needs.")
        array = np.asarray(tree[path])
        if place.parts > 1:
            array = np.split(array, place.parts, axis=-1)[place.part]
        array = place.from_original(array)
        if array.shape != shape:
            raise ConfigError(
                f"the checkpoint's {path!r} gives shape {array.shape}, but {what} needs "
                f"{shape}: pass the config the checkpoint was saved with."
            )
        used.add(path)
        return array

    def fill(key_path, leaf):
        name = jax.tree_util.keystr(key_path, simple=True, separator=".")
        places = _original_path(layout, cfg, name)
        layer_shape = leaf.shape if places[0][1] < 0 else leaf.shape[1:]
        arrays = [read(path, place, layer_shape) for path, _, place in places]
        stacked = arrays[0] if places[0][1] < 0 else np.stack(arrays)
        return jnp.asarray(stacked, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(fill, abstract)
    if isinstance(cfg, models.ModelConfig) and cfg.position == "rope":
        want = (cfg.block_size, cfg.head_dim)
        if OMEGA in tree and np.shape(tree[OMEGA]) != want:
            raise ConfigError(
                f"the checkpoint's {OMEGA!r} has shape {np.shape(tree[OMEGA])}, but {what} "
                f"needs {want} (block_size, head width): pass the config it was saved with."
            )
        used.add(OMEGA)
    extra = [p for p in tree if p not in used and not p.endswith(CACHE_AND_MASK)]
    if extra:
        raise ConfigError(
            f"the checkpoint holds {extra[0]!r} ({len(extra)} such arrays), which has no place "
            f"in {what}: pass the config the checkpoint was saved with."
        )
    return params


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
        keys = [str(k.key) for k in path]
        if keys[-1] == "value":
            keys = keys[:-1]
        flat[".".join(keys)] = value
    return flat
