"""The original JaxPT's forward pass in float64 numpy, written from its description in
NNX_API.md (§4 trees, §5 forward, §6 MoE) and reading its parameter tree
(``model.original_tree()``): an independent reference for ``jaxpt.nnx``'s decoders.

Shapes: B batch, T tokens, D n_embed, H query heads, K key/value heads, hd = D / H, F MLP
width, E experts, V vocabulary. Kernels are ``(in, out)``: ``y = x @ kernel + bias``.
Dense top-k MoE is computed without capacity: valid where no choice is dropped.
"""

import numpy as np


def float64_arrays(tree):
    """The original's nested tree with each ``{"value": array}`` leaf as a float64 array."""
    if set(tree) == {"value"}:
        return np.asarray(tree["value"], np.float64)
    return {name: float64_arrays(node) for name, node in tree.items()}


def layer_norm(x, p, eps):
    """``(..., D)`` -> ``(..., D)``: LayerNorm with ``scale`` and ``bias``."""
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def rms_norm(x, p, eps):
    """``(..., N)`` -> ``(..., N)``: ``x * rsqrt(mean(x^2) + eps) * scale``."""
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * p["scale"]


def linear(x, p):
    """``(..., in)`` -> ``(..., out)``; the bias where the layer has one."""
    return x @ p["kernel"] + p.get("bias", 0.0)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def silu(x):
    return x / (1 + np.exp(-x))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def glu_activation(name: str):
    """The original GLU's gate: SiLU for "silu"/"swish", tanh-GELU for "gelu", else sigmoid."""
    return {"silu": silu, "swish": silu, "gelu": gelu_tanh}.get(name, sigmoid)


def rope(v, rope_theta):
    """``(B, T, N, hd)`` -> the same, rotated by position (Llama's rotate-half); the original's
    ``rope_theta`` is the reciprocal of HF's base."""
    t, hd = v.shape[1], v.shape[-1]
    inv_freq = rope_theta ** (np.arange(0, hd, 2) / hd)  # (hd / 2,)
    omega = np.arange(t)[:, None, None] * np.concatenate([inv_freq, inv_freq])  # (T, 1, hd)
    rotated = np.concatenate([-v[..., hd // 2 :], v[..., : hd // 2]], -1)
    return v * np.cos(omega) + rotated * np.sin(omega)


def causal_attention(q, k, v):
    """``q (B, T, H, hd)``, ``k, v (B, T, K, hd)`` -> ``(B, T, H * hd)``; query head n reads
    key/value head ``n // (H / K)``; scores scaled by ``1 / sqrt(hd)``."""
    b, t, h, hd = q.shape
    k, v = (np.repeat(a, h // k.shape[2], axis=2) for a in (k, v))
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", weights, v).reshape(b, t, h * hd)


def attention(p, x, cfg, rotary: bool):
    """``(B, T, D)`` -> ``(B, T, D)``: fused ``c_attn`` (columns ``[q|k|v]``), or ``wq`` and
    ``wkv`` (columns ``[k|v]``, K heads) with the optional ``q_norm``/``k_norm`` over hd."""
    b, t, d = x.shape
    hd = d // cfg.n_head
    if "c_attn" in p:
        q, k, v = np.split(linear(x, p["c_attn"]), 3, -1)
    else:
        q, (k, v) = linear(x, p["wq"]), np.split(linear(x, p["wkv"]), 2, -1)
    q, k, v = (a.reshape(b, t, -1, hd) for a in (q, k, v))
    if "q_norm" in p:
        q, k = rms_norm(q, p["q_norm"], cfg.ln_epsilon), rms_norm(k, p["k_norm"], cfg.ln_epsilon)
    if rotary:
        q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
    return linear(causal_attention(q, k, v), p["c_proj" if "c_attn" in p else "wproj"])


def mlp(p, x, gate_name: str):
    """``(B, T, D)`` -> ``(B, T, D)``: GPT's tanh-GELU MLP, or a GLU where ``p`` has ``gate``."""
    if "gate" not in p:
        return linear(gelu_tanh(linear(x, p["c_fc"])), p["c_proj"])
    return linear(
        glu_activation(gate_name)(linear(x, p["gate"])) * linear(x, p["c_fc"]), p["c_proj"]
    )


def expert(p, x, e: int, squared_relu: bool):
    """``(N, D)`` -> ``(N, D)``: expert ``e``'s GLU (SiLU, or ReLU^2), biases where present."""
    bias = lambda name: p[name][e, 0] if name in p else 0.0  # (1, out) per expert
    gate = x @ p["w_gate"][e] + bias("b_gate")
    gate = np.maximum(gate, 0) ** 2 if squared_relu else silu(gate)
    return (gate * (x @ p["w_c_fc"][e] + bias("b_c_fc"))) @ p["w_c_proj"][e] + bias("b_c_proj")


def moe(p, x, cfg, squared_relu: bool):
    """``(B, T, D)`` -> ``(y (B, T, D), load_balance_loss, z_loss)``: every token's top-k
    experts weighted by their (not renormalised) softmax probabilities."""
    logits = linear(x, p["router_gate"]).reshape(-1, cfg.n_experts)  # (B*T, E)
    lse = np.log(np.exp(logits).sum(-1, keepdims=True))
    probs = np.exp(logits - lse)
    chosen = np.argsort(-probs, -1)[:, : cfg.top_k]  # (B*T, k)
    flat = x.reshape(-1, x.shape[-1])
    y = np.zeros_like(flat)
    for e in range(cfg.n_experts):
        rows = (chosen == e).any(-1)
        y[rows] += probs[rows, e, None] * expert(p["experts"], flat[rows], e, squared_relu)
    share = np.bincount(chosen.ravel(), minlength=cfg.n_experts) / chosen.size  # f_e
    load_balance = cfg.n_experts * (share * probs.mean(0)).sum()
    return y.reshape(x.shape), load_balance, (lse**2).mean()


def forward(tree, idx, cfg, positions: str | None):
    """``(B, T)`` int tokens -> ``(logits (B, T, V), load_balance_loss, z_loss)`` of the
    original's ``tree`` under ``cfg``; ``positions``: "wpe" (learned), "rope" or None."""
    tree = float64_arrays(tree)
    layer_norms = "ln_1" in tree["h"]["0"]
    norm = layer_norm if layer_norms else rms_norm
    n1, n2, nf = ("ln_1", "ln_2", "ln_f") if layer_norms else ("rms_n_1", "rms_n_2", "rms_n_f")
    gate_name = getattr(cfg, "glu_activation", "silu")  # Tiny_MoE_2's config has none: SiLU
    squared_relu = getattr(cfg, "use_squared_relu", False)
    x = tree["wte"]["embedding"][idx]  # (B, T, D)
    if positions == "wpe":
        x = x + tree["wpe"]["embedding"][: idx.shape[1]]
    load_balance = z = 0.0
    for i in range(cfg.n_layer):
        block = tree["h"][str(i)]
        x = x + attention(
            block["attn"], norm(x, block[n1], cfg.ln_epsilon), cfg, positions == "rope"
        )
        h = norm(x, block[n2], cfg.ln_epsilon)
        if "moe" in block:
            y, block_lb, block_z = moe(block["moe"], h, cfg, squared_relu)
            load_balance, z = load_balance + block_lb, z + block_z
        else:
            y = mlp(block["glu"] if "glu" in block else block["mlp"], h, gate_name)
        x = x + y
    return norm(x, tree[nf], cfg.ln_epsilon) @ tree["wte"]["embedding"].T, load_balance, z
