"""Reading a ``jax.profiler`` trace (its ``perfetto_trace.json.gz``), for the profile benches."""

import gzip
import json
import pathlib
import re

COLLECTIVE = re.compile(r"nccl|all_gather|all-gather|reduce_scatter|reduce-scatter|all_reduce")


def events(trace_dir: pathlib.Path) -> list[dict]:
    """The trace events of the newest ``perfetto_trace.json.gz`` under ``trace_dir``."""
    paths = sorted(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not paths:
        raise SystemExit(f"{trace_dir} holds no perfetto_trace.json.gz; profile a run first")
    with gzip.open(paths[-1]) as fh:
        return json.load(fh)["traceEvents"]


def process_names(trace: list[dict]) -> dict[int, str]:
    """pid -> process name (``/device:GPU:0``, ``/host:CPU``, ...)."""
    return {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in trace
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }


def gpu_pids(trace: list[dict]) -> list[int]:
    """The pids of the GPUs, in device order; says which processes there are if none."""
    names = process_names(trace)
    pids = sorted((name, pid) for pid, name in names.items() if "GPU" in name)
    if not pids:
        print(f"no GPU process in the trace; processes: {sorted(names.values())}")
    return [pid for _, pid in pids]


def spans(trace: list[dict], pids) -> list[dict]:
    """The complete events (``ph == "X"``, with a duration) of the processes ``pids``."""
    wanted = set(pids)
    return [e for e in trace if e.get("ph") == "X" and "dur" in e and e.get("pid") in wanted]


def hlo_key(name: str) -> str:
    """An HLO instruction or kernel name with dots and dashes as underscores (kernels are
    named after their fusion, ``loop_add_fusion.3`` -> ``loop_add_fusion_3``)."""
    return re.sub(r"[.\-]", "_", name)


def op_names(hlo_text: str) -> dict[str, str]:
    """``hlo_key`` of each instruction of compiled HLO text, and of the kernel it shares with
    its look-alikes (its ``deduplicated_name``), -> the ``op_name`` of its metadata (the JAX
    name stack)."""
    ops = {}
    for line in hlo_text.splitlines():
        found = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', line)
        if found:
            shared = re.search(r'deduplicated_name="([^"]+)"', line)
            for name in (found[1], shared[1] if shared else found[1]):
                ops.setdefault(hlo_key(name), found[2])
    return ops
