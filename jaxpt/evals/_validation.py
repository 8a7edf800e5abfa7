"""Mean losses over a fixed set of validation batches."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from jaxpt import data


def validation_loss(
    eval_step: Callable, params, loader: data.Loader, num_batches: int, sharding
) -> dict[str, float]:
    """Mean of ``eval_step(params, inputs, targets)`` metrics over the first ``num_batches``
    validation batches (the same batches at every call). On masked (chat) data, where the step
    also returns ``loss_tokens``, ``ce`` is the mean over every masked target of the batches,
    each batch weighing by its targets, as training weighs its micro-batches."""
    batches = [
        jax.device_get(eval_step(params, *data.to_global(batch, sharding, loader.batch_size)))
        for batch in loader.eval_batches(num_batches)
    ]
    means = {key: float(np.mean([b[key] for b in batches])) for key in batches[0]}
    if "loss_tokens" not in means:
        return means
    tokens = np.array([b["loss_tokens"] for b in batches], np.float64)
    ce = float(np.dot(tokens, [b["ce"] for b in batches]) / max(tokens.sum(), 1.0))
    del means["loss_tokens"]
    return {**means, "loss": means["loss"] - means["ce"] + ce, "ce": ce}
