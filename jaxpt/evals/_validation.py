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
    validation batches (the same batches at every call)."""
    totals: dict[str, float] = {}
    for batch in loader.eval_batches(num_batches):
        arrays = data.to_global(batch, sharding, loader.batch_size)  # + loss_mask: chat data
        for key, value in jax.device_get(eval_step(params, *arrays)).items():
            totals[key] = totals.get(key, 0.0) + float(np.asarray(value))
    return {key: value / num_batches for key, value in totals.items()}
