"""A device's memory: how much this process's devices may hold, how much a compiled program
needs there, and sizes in words. The train step and state (``jaxpt.train``) and sampling
(``jaxpt.generate``) check their needs against it before they run."""

from __future__ import annotations

import math
import os

import jax


def device_memory_limit() -> int | None:
    """Bytes the allocator of this process's first device may hold (a GPU's or TPU's
    ``bytes_limit``: 75% of a GPU's memory by default), or None where the backend reports none
    (the CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return None if stats is None else stats.get("bytes_limit")


def memory_limit(devices: int) -> tuple[int, str]:
    """Bytes each of ``devices`` devices of this process may hold, and words saying what sets
    it: the allocator's ``bytes_limit`` (``device_memory_limit``), or where the backend reports
    none (the CPU) an equal share of the host's physical memory, which those devices share."""
    limit = device_memory_limit()
    if limit is not None:
        return limit, "its allocator holds"
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return host // devices, f"a CPU device may take (the host's {size_text(host)} over {devices})"


def program_bytes(stats) -> int:
    """Bytes one device holds while a compiled program runs, from its ``memory_analysis()``:
    its arguments, its outputs not written over a donated argument, its temporaries and code."""
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
        + stats.generated_code_size_in_bytes
    )


def size_text(n_bytes: float) -> str:
    """``n_bytes`` in the largest binary unit that keeps a digit before the point."""
    exponent = min(max(int(math.log(max(n_bytes, 1), 1024)), 0), 4)
    return f"{n_bytes / 1024**exponent:.1f} {['bytes', 'KiB', 'MiB', 'GiB', 'TiB'][exponent]}"
