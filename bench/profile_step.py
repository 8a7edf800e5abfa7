"""Where a train step's GPU time goes: kernel time by kind, from a ``jax.profiler`` trace.

    python3 bench/profile_step.py --out=$OUT --noscan_layers       # on a GPU
    python3 bench/profile_step.py --out=$OUT --scan_layers

Runs ``bench/train_step.py``'s step (``configs/gpt.py``, ``--batch`` x ``--seq``), traces
``--steps`` steps after a warm-up, and sums the device kernels' durations per step into kinds
(matmul, attention, copies and dynamic-update-slices, reductions, other fusions, collectives)
and per kernel name. Prints the kinds and the top kernels, a table last; writes
profile_step.json to --out.
"""

import collections
import gzip
import json
import pathlib
import re
import tempfile

import _report  # bench/_report.py, beside this script
import _timing
import jax
import numpy as np
from absl import app, flags

from jaxpt.config import preset_config

flags.DEFINE_string("out", "bench/results", "Directory for the JSON result.")
flags.DEFINE_integer("batch", 16, "Micro-batch (sequences).")
flags.DEFINE_integer("seq", 1024, "Sequence length.")
flags.DEFINE_integer("steps", 5, "Traced steps.")
flags.DEFINE_bool("scan_layers", False, "model.scan_layers.")
flags.DEFINE_string("remat", "none", "model.remat_policy.")
flags.DEFINE_integer("top", 25, "Kernels listed.")

KINDS = (  # first match wins
    ("collective", r"nccl|all_gather|all-gather|reduce_scatter|all_reduce"),
    ("attention", r"cudnn|fmha|flash|sdpa|attention"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|wgmma|cublas|dot|triton_gemm"),
    ("copy/dus", r"copy|memcpy|memset|dynamic_update|dynamic-update|dynamic_slice"),
    ("reduction", r"reduce|reduction"),
    ("fusion", r"fusion|loop_|input_|triton"),
)


def kind_of(name: str) -> str:
    """The kind of a kernel, from its name (``KINDS``), else ``other``."""
    lowered = name.lower()
    return next((k for k, pattern in KINDS if re.search(pattern, lowered)), "other")


def device_kernels(trace_dir: pathlib.Path) -> list[tuple[str, float]]:
    """``(name, microseconds)`` of every event on a GPU stream in the perfetto trace."""
    path = next(trace_dir.rglob("perfetto_trace.json.gz"))
    with gzip.open(path) as fh:
        events = json.load(fh)["traceEvents"]
    gpu_pids = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and "GPU" in e.get("args", {}).get("name", "")
    }
    if not gpu_pids:
        names = {e.get("args", {}).get("name") for e in events if e.get("name") == "process_name"}
        print(f"no GPU process in the trace; processes: {sorted(map(str, names))}")
    return [
        (e["name"], float(e["dur"]))
        for e in events
        if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e
    ]


def make_step(f):
    """The jitted train step, its state and a batch of random tokens."""
    config = preset_config("gpt", None)
    config.model.update(block_size=f.seq, scan_layers=f.scan_layers, remat_policy=f.remat)
    config.train.batch_size = f.batch
    _, state, step = _timing.train_step(config)
    tokens = np.random.default_rng(0).integers(0, 50257, (f.batch, f.seq + 1), dtype=np.int32)
    return step, state, tokens


def main(argv):
    del argv
    f = flags.FLAGS
    step, state, tokens = make_step(f)
    for _ in range(3):
        state, metrics = step(state, tokens[:, :-1], tokens[:, 1:])
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(f.steps):
                state, metrics = step(state, tokens[:, :-1], tokens[:, 1:])
            jax.block_until_ready(metrics)
        kernels = device_kernels(pathlib.Path(tmp))
    per_name = collections.Counter()
    for name, us in kernels:
        per_name[name] += us / f.steps
    per_kind = collections.Counter()
    for name, us in per_name.items():
        per_kind[kind_of(name)] += us
    total = sum(per_kind.values())
    result = _report.save(
        f.out,
        "profile_step",
        scan_layers=f.scan_layers,
        remat=f.remat,
        batch=f.batch,
        seq=f.seq,
        kernel_ms_per_step=total / 1e3,
        kinds_ms={k: v / 1e3 for k, v in per_kind.most_common()},
        kernels_ms={k: v / 1e3 for k, v in per_name.most_common(200)},
    )
    print(f"top kernels (ms/step), {result['device']}, scan_layers={f.scan_layers}:")
    for name, us in per_name.most_common(f.top):
        print(f"  {us / 1e3:8.3f}  {kind_of(name):<10} {name[:110]}")
    print(f"GPU kernel time per step {total / 1e3:.2f} ms, scan_layers={f.scan_layers}")
    print(f"{'kind':<12} {'ms/step':>8} {'share':>6}")
    for kind, us in per_kind.most_common():
        print(f"{kind:<12} {us / 1e3:>8.2f} {us / total:>6.1%}")


if __name__ == "__main__":
    app.run(main)
