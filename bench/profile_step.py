"""Where a train step's GPU time goes: kernel time by kind, from a ``jax.profiler`` trace.

    python3 bench/profile_step.py --out=$OUT --noscan_layers       # on a GPU
    python3 bench/profile_step.py --out=$OUT --scan_layers
    python3 bench/profile_step.py --out=$OUT --mesh=fsdp=2        # sharded over 2 GPUs

Runs ``bench/train_step.py``'s step (``configs/gpt.py`` or ``--preset``, ``--batch`` x ``--seq``
per device, over the devices of ``--mesh``), traces
``--steps`` steps after a warm-up, and sums the device kernels' durations per step into kinds
(matmul, attention, copies and dynamic-update-slices, reductions, other fusions, collectives),
per part of the model (the named scope of the HLO op a kernel runs, forward or backward: layer
norms, attention, MLP, read-out, loss, optimizer; from the compiled HLO's op metadata) and per
kernel name, averaged over the mesh's devices (collectives run on their own streams, so
under a mesh the sum is not the step's time). Prints the kinds, the parts and the top
kernels (with ``--explain=REGEX`` the HLO each matching one runs: a fusion's whole computation),
a table last; writes profile_step.json to --out. ``--xla`` adds XLA options to the step's
(``train_step.py``'s).
"""

import collections
import pathlib
import re
import tempfile

import _report  # bench/_report.py, beside this script
import _timing
import _trace
import jax
from absl import flags

from jaxpt import sharding
from jaxpt.config import preset_config

flags.DEFINE_string("out", "bench/results", "Directory for the JSON result.")
flags.DEFINE_string("preset", "gpt", "Registry preset whose step is profiled.")
flags.DEFINE_integer("batch", 16, "Micro-batch (sequences).", lower_bound=1)
flags.DEFINE_integer("seq", 1024, "Sequence length.", lower_bound=1)
flags.DEFINE_integer("steps", 5, "Traced steps.", lower_bound=1)
flags.DEFINE_bool("scan_layers", None, "model.scan_layers; default: the preset's.")
flags.DEFINE_string("remat", None, "model.remat_policy; default: the preset's.")
flags.DEFINE_integer("top", 25, "Kernels listed.")
flags.DEFINE_string("explain", "", "Print the HLO of the listed kernels matching this regex.")
flags.DEFINE_list("mesh", [], "Mesh axes, e.g. fsdp=2 (the rest 1; none: one device).")
flags.DEFINE_list("xla", [], "Extra XLA options for the step, name=value (compiler_options).")
flags.DEFINE_enum("tokens", "random", _timing.TOKEN_SOURCES, "Tokens (_timing.token_sampler).")

KINDS = (  # first match wins
    ("collective", _trace.COLLECTIVE.pattern),
    ("attention", r"cudnn|fmha|flash|sdpa|attention"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|wgmma|cublas|dot|triton_gemm"),
    ("copy/dus", r"copy|memcpy|memset|dynamic_update|dynamic-update|dynamic_slice"),
    ("reduction", r"reduce|reduction"),
    ("fusion", r"fusion|loop_|input_|triton"),
)


# The model's named scopes (jax.named_scope in jaxpt.nn and the train step), innermost first.
PARTS = (
    "cross_entropy",
    "layer_norm",
    "rms_norm",
    "attention",
    "experts",
    "moe",
    "soft_moe",
    "mlp",
    "glu",
    "unembed",
    "embed",
    "optimizer",
)


def kind_of(name: str) -> str:
    """The kind of a kernel, from its name (``KINDS``), else ``other``."""
    lowered = name.lower()
    return next((k for k, pattern in KINDS if re.search(pattern, lowered)), "other")


def hlo_of(hlo_text: str, kernel: str) -> str | None:
    """The HLO instruction kernel ``kernel`` runs and, for a fusion, the computation it
    calls (what it reads, computes and writes); None if no instruction has its name."""
    for line in hlo_text.splitlines():
        name = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if name and _trace.hlo_key(name[1]) == kernel:
            called = re.search(r"calls=%?([\w.\-]+)", line)
            body = called and re.search(rf"^%?{re.escape(called[1])} .*?^}}", hlo_text, re.M | re.S)
            return line.strip() + ("\n" + body[0] if body else "")
    return None


def part_of(op_name: str | None) -> str:
    """``"<scope> fwd"`` or ``"<scope> bwd"`` (``PARTS``; ``other``), bwd under a transpose."""
    if op_name is None:
        return "unattributed"
    scope = next((p for p in PARTS if re.search(rf"\b{p}\b", op_name)), "other")
    return f"{scope} {'bwd' if 'transpose(' in op_name else 'fwd'}"


def device_kernels(trace_dir: pathlib.Path) -> list[tuple[str, str, float]]:
    """``(name, hlo op, microseconds)`` of every event on a GPU stream in the perfetto trace
    (the HLO op from the event's ``hlo_op`` argument, else its name)."""
    trace = _trace.events(trace_dir)
    return [
        (e["name"], e.get("args", {}).get("hlo_op", e["name"]), float(e["dur"]))
        for e in _trace.spans(trace, _trace.gpu_pids(trace))
    ]


def run_config(f):
    """The preset's run config as shipped, with the flags' overrides (``--scan_layers`` and
    ``--remat`` left out keep the preset's values)."""
    config = preset_config(f.preset, None)
    config.model.block_size = f.seq
    _timing.set_model_fields(config, scan_layers=f.scan_layers, remat_policy=f.remat)
    return config


def make_step(config, f):
    """The compiled train step of ``config`` (sharded over ``--mesh``), its state, its inputs
    and targets (``--tokens``, ``--batch`` sequences per device) and the mesh."""
    config.train.batch_size = f.batch * _timing.set_mesh(config, f.mesh)
    _, state, jitted, mesh = _timing.train_step(config, _timing.typed_pairs(f.xla))
    shape = (config.train.batch_size, f.seq + 1)
    tokens = _timing.token_sampler(f.tokens, config.model.vocab_size)(*shape)
    batch = sharding.batch_sharding(mesh, config.mesh.rules)
    inputs, targets = (jax.device_put(t, batch) for t in (tokens[:, :-1], tokens[:, 1:]))
    with _timing.tracing(config, mesh):
        step = jitted.lower(state, inputs, targets).compile()  # traced as it runs
    return step, state, (inputs, targets), mesh


def main(argv):
    del argv
    f = flags.FLAGS
    config = run_config(f)
    step, state, batch, mesh = make_step(config, f)
    scan_layers, remat = config.model.get("scan_layers"), config.model.get("remat_policy")
    hlo_text = step.as_text()
    ops = _trace.op_names(hlo_text)
    for _ in range(3):
        state, metrics = step(state, *batch)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(f.steps):
                state, metrics = step(state, *batch)
            jax.block_until_ready(metrics)
        kernels = device_kernels(pathlib.Path(tmp))
    per_name, per_part, per_part_name = (collections.Counter() for _ in range(3))
    per_step = f.steps * mesh.size  # per device: every GPU of the mesh runs the program
    for name, hlo_op, us in kernels:
        part = part_of(ops.get(_trace.hlo_key(hlo_op), ops.get(_trace.hlo_key(name))))
        per_name[name] += us / per_step
        per_part[part] += us / per_step
        per_part_name[part, name] += us / per_step
    per_kind = collections.Counter()
    for name, us in per_name.items():
        per_kind[kind_of(name)] += us
    total = sum(per_kind.values())
    result = _report.save(
        f.out,
        "profile_step",
        preset=f.preset,
        scan_layers=scan_layers,
        remat=remat,
        batch=f.batch,
        seq=f.seq,
        mesh=f.mesh,
        kernel_ms_per_step=total / 1e3,
        xla=f.xla,
        kinds_ms={k: v / 1e3 for k, v in per_kind.most_common()},
        parts_ms={k: v / 1e3 for k, v in per_part.most_common()},
        kernels_ms={k: v / 1e3 for k, v in per_name.most_common(200)},
    )
    print(
        f"top kernels by part (ms/step per device), {result['device']}, "
        f"scan_layers={scan_layers}, mesh={f.mesh}:"
    )
    for (part, name), us in per_part_name.most_common(f.top):
        print(f"  {us / 1e3:8.3f}  {kind_of(name):<10} {part:<18} {name[:90]}")
        if f.explain and re.search(f.explain, name):
            print(hlo_of(hlo_text, name) or "    (no HLO instruction of that name)")
    print(f"{'part':<20} {'ms/step':>8} {'share':>6}")
    for part, us in per_part.most_common():
        print(f"{part:<20} {us / 1e3:>8.2f} {us / total:>6.1%}")
    print(f"GPU kernel time per step {total / 1e3:.2f} ms, scan_layers={scan_layers}")
    print(f"{'kind':<12} {'ms/step':>8} {'share':>6}")
    for kind, us in per_kind.most_common():
        print(f"{kind:<12} {us / 1e3:>8.2f} {us / total:>6.1%}")


if __name__ == "__main__":
    _report.run(main)
