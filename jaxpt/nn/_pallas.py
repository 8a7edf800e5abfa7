"""What jaxpt's hand-written (Pallas) kernels share: when they run, and how they run per shard.

A kernel here is row-local: it reads and writes whole rows of ``(B, ..., D)`` arrays, so under
a sharded step each device runs it on its own rows (``map_batch_shards``). Off the GPU a kernel
runs only when asked for (``kernels="pallas"``), through the Pallas interpreter: slow, and
exactly what the tests compare with their float64 references.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import Array
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from jaxpt.nn._axes import activation_sharding_of

KERNELS = ("auto", "xla", "pallas")
# Fewer rows than this (a decoding step's B rows) and a kernel's launch of its own costs more
# than it saves: XLA fuses a small norm into its neighbours.
MIN_ROWS = 1024


def use_kernel(kernels: str, x: Array, min_rows: int = MIN_ROWS) -> bool:
    """Whether ``kernels`` (``KERNELS``) asks for the Pallas kernel on ``(B, ..., D)`` x:
    ``pallas`` always; ``auto`` on an NVIDIA GPU for at least ``min_rows`` rows."""
    rows = x.size // x.shape[-1]
    return kernels == "pallas" or (kernels == "auto" and on_cuda() and rows >= min_rows)


def on_cuda() -> bool:
    """Whether JAX computes on NVIDIA GPUs, where the kernels were written and measured (a
    ROCm GPU is a ``gpu`` backend too)."""
    if jax.default_backend() != "gpu":
        return False
    return "cuda" in jax.devices()[0].client.platform_version.lower()


def interpret() -> bool:
    """Kernels run through the Pallas interpreter everywhere but on a GPU."""
    return jax.default_backend() != "gpu"


def kernel_call(
    kernel: Callable, *, grid, out_shape, name: str, num_warps: int, **static
) -> Callable:
    """``pl.pallas_call`` of ``kernel`` with its ``static`` keyword arguments bound: a Triton
    kernel of ``num_warps`` warps a program on a GPU, interpreted elsewhere."""
    return pl.pallas_call(
        functools.partial(kernel, **static),
        grid=grid,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret(),
        name=name,
    )


def block_indices(block: Array | int, size: int, extent: int) -> tuple[Array, Array]:
    """The ``size`` indices of block number ``block`` along an axis of length ``extent`` and
    which of them are inside it (``size``: a power of two, as Triton's tensors need)."""
    indices = block * size + jnp.arange(size)
    return indices, indices < extent


def load_tile(ref, rows: Array, cols: Array, mask: Array) -> Array:
    """The ``(len(rows), len(cols))`` tile of a 2-D ref in float32, zeros where masked."""
    tile = plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=mask, other=0)
    return tile.astype(jnp.float32)


def map_batch_shards(
    fn: Callable, args: Sequence[jax.Array], batched: Sequence[bool], out_batched: Sequence[bool]
):
    """``fn(*args)``, each device running it on its own rows while a sharded step is traced.

    Args:
        fn: a function of local arrays, row-local along dimension 0 of the batched ones.
        args: arrays whose dimension 0 is the batch where ``batched`` says so (split like the
            activations, ``"batch"``), the others whole on every device.
        out_batched: the same for ``fn``'s outputs (a tuple): a batched output's shards are
            concatenated along dimension 0 (per-device partial sums, for example).
    Returns:
        ``fn``'s outputs as global arrays.
    """
    first = next(a for a, b in zip(args, batched, strict=True) if b)
    sharding = activation_sharding_of(first.shape, ("batch",) + (None,) * (first.ndim - 1))
    if sharding is None:
        return fn(*args)
    rows = P(sharding.spec[0]) if sharding.spec else P()
    return jax.shard_map(
        fn,
        mesh=sharding.mesh,
        in_specs=tuple(rows if b else P() for b in batched),
        out_specs=tuple(rows if b else P() for b in out_batched),
        check_vma=False,
    )(*args)
