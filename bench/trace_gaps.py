"""Where a training run's GPUs sat idle, and how much communication no computation hid.

    python3 launch.py ... --workdir=W --config.log.profile_from_step=20   # on the GPU machine
    python3 bench/trace_gaps.py --trace=W/profile --out=$OUT

Reads the newest ``jax.profiler`` trace under ``--trace`` (``log.profile_from_step``'s, or any
other) and, per GPU, measures from its first kernel to its last: the time some kernel ran, the
time a computation ran, the time only collectives ran (communication left exposed) and the time
nothing ran (idle). Then lists GPU 0's kernels by summed time, with how many times each was
launched, and its longest idle gaps, each with the kernels either side and what the host's
Python thread was doing as the gap began (the profiler's Python tracer), and its collectives
by the time they ran with no computation beside them. With ``--hlo``, the compiled HLO text
of the traced program (an XLA dump's ``*after_optimizations.txt``: run with
``XLA_FLAGS="--xla_dump_to=D --xla_dump_hlo_as_text"``), each kernel is named by the JAX op it
runs (its ``op_name``) and GPU 0's kernel time is totalled by op as well. A table last; writes
trace_gaps.json to --out.
"""

import bisect
import collections
import itertools
import pathlib
from collections.abc import Callable

import _report  # bench/_report.py, beside this script
import _trace
from absl import app, flags

flags.DEFINE_string("trace", None, "A folder holding a jax.profiler trace.", required=True)
flags.DEFINE_string("out", "bench/results", "Directory for the JSON result.")
flags.DEFINE_float("min_us", 50.0, "Shortest idle gap listed (microseconds).")
flags.DEFINE_integer("top", 15, "Idle gaps listed.")
flags.DEFINE_string("hlo", None, "Compiled HLO text of the traced program (names kernels' ops).")


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of ``(start, end)`` intervals as sorted disjoint intervals."""
    union: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if union and start <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], end))
        else:
            union.append((start, end))
    return union


def union_length(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` intervals."""
    return sum(end - start for start, end in merged(intervals))


def uncovered(start: float, end: float, cover: list[tuple[float, float]]) -> float:
    """How much of ``[start, end)`` the sorted disjoint intervals ``cover`` leave uncovered."""
    first = max(bisect.bisect_right(cover, (start, float("inf"))) - 1, 0)
    covered = 0.0
    for s, t in itertools.takewhile(lambda c: c[0] < end, cover[first:]):
        covered += max(0.0, min(t, end) - max(s, start))
    return end - start - covered


def exposed_collectives(kernels: list[dict]) -> collections.Counter:
    """Microseconds each collective (by HLO op) ran with no computation beside it."""
    compute = merged([(e["ts"], e["ts"] + e["dur"]) for e in kernels if not collective(e)])
    exposed = collections.Counter()
    for e in filter(collective, kernels):
        name = e.get("args", {}).get("hlo_op", e["name"])
        exposed[name] += uncovered(e["ts"], e["ts"] + e["dur"], compute)
    return exposed


def idle_gaps(kernels: list[dict]) -> list[tuple[float, float, dict, dict]]:
    """``(start, length, kernel before, kernel after)`` of every stretch no kernel covers."""
    gaps, reach, last = [], None, None
    for e in sorted(kernels, key=lambda e: e["ts"]):
        if reach is not None and e["ts"] > reach:
            gaps.append((reach, e["ts"] - reach, last, e))
        if reach is None or e["ts"] + e["dur"] > reach:
            reach, last = e["ts"] + e["dur"], e
    return gaps


def gpu_times(kernels: list[dict]) -> dict:
    """Span, busy, compute, exposed-collective and idle milliseconds of one GPU's kernels."""
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
    compute = [(s, t) for (s, t), e in zip(spans, kernels, strict=True) if not collective(e)]
    span = max(t for _, t in spans) - min(s for s, _ in spans)
    busy, computing = union_length(spans), union_length(compute)
    ms = lambda us: us / 1e3
    return dict(
        span_ms=ms(span),
        busy_ms=ms(busy),
        compute_ms=ms(computing),
        exposed_collective_ms=ms(busy - computing),
        idle_ms=ms(span - busy),
    )


def totals_by(kernels: list[dict], key: Callable[[dict], str], field: str) -> list[dict]:
    """Launches and summed milliseconds of the kernel events grouped by ``key(event)`` (kept
    as ``field``), most time first."""
    launches, us = collections.Counter(), collections.Counter()
    for e in kernels:
        k = key(e)
        launches[k] += 1
        us[k] += e["dur"]
    return [{field: k, "launches": launches[k], "ms": t / 1e3} for k, t in us.most_common()]


def op_of(event: dict, ops: dict[str, str]) -> str:
    """The ``op_name`` of the HLO instruction a kernel event ran (its ``hlo_op`` argument, else
    its name), or ``?``."""
    hlo_op = event.get("args", {}).get("hlo_op", event["name"])
    return ops.get(_trace.hlo_key(hlo_op), ops.get(_trace.hlo_key(event["name"]), "?"))


def collective(event: dict) -> bool:
    return bool(_trace.COLLECTIVE.search(event["name"].lower()))


def python_stack(host: list[dict], at: float, depth: int = 3) -> str:
    """The innermost ``depth`` Python frames of the host's main thread running at ``at``."""
    frames = sorted((e for e in host if e["ts"] <= at < e["ts"] + e["dur"]), key=lambda e: e["ts"])
    return " > ".join(e["name"].lstrip("$") for e in frames[-depth:]) or "-"


def main_thread(trace: list[dict]) -> list[dict]:
    """The host events of the thread the Python tracer saw most (the training loop's)."""
    python = [e for e in trace if e.get("ph") == "X" and str(e.get("name", "")).startswith("$")]
    if not python:
        return []
    counts = collections.Counter((e["pid"], e["tid"]) for e in python)
    thread = counts.most_common(1)[0][0]
    return [e for e in python if (e["pid"], e["tid"]) == thread]


def main(argv):
    del argv
    f = flags.FLAGS
    trace = _trace.events(pathlib.Path(f.trace))
    names = _trace.process_names(trace)
    per_gpu = {names[pid]: _trace.spans(trace, [pid]) for pid in _trace.gpu_pids(trace)}
    times = {gpu: gpu_times(kernels) for gpu, kernels in per_gpu.items() if kernels}
    if not times:
        raise SystemExit(f"the trace under {f.trace} holds no GPU kernels")
    first = next(iter(per_gpu.values()))
    origin, host = min(e["ts"] for e in first), main_thread(trace)
    gaps = sorted((g for g in idle_gaps(first) if g[1] >= f.min_us), key=lambda g: -g[1])
    listed = [
        dict(
            at_ms=(start - origin) / 1e3,
            us=length,
            before=before["name"],
            after=after["name"],
            host=python_stack(host, start),
        )
        for start, length, before, after in gaps[: f.top]
    ]
    exposed = exposed_collectives(first).most_common(f.top)
    totals = totals_by(first, lambda e: e["name"], "name")
    ops = _trace.op_names(pathlib.Path(f.hlo).read_text()) if f.hlo else {}
    if ops:
        example = {e["name"]: e for e in first}
        for k in totals:
            k["op"] = op_of(example[k["name"]], ops)
    by_op = totals_by(first, lambda e: op_of(e, ops), "op")[: f.top] if ops else []
    _report.save(
        f.out,
        "trace_gaps",
        trace=f.trace,
        gpus=times,
        launches=len(first),
        kernels=totals[: f.top],
        ops=by_op,
        gaps=listed,
        exposed_collectives_us=dict(exposed),
    )
    print(f"GPU 0's kernels by summed time ({len(first)} launches in all):")
    for k in totals[: f.top]:
        op = k.get("op", "")[:90]
        print(f"  {k['ms']:8.3f} ms  {k['launches']:>7} x  {k['name'][:60]}  {op}")
    if by_op:
        print("GPU 0's kernel time by the JAX op its kernels ran (op_name):")
        for o in by_op:
            print(f"  {o['ms']:8.3f} ms  {o['launches']:>7} x  {o['op'][:110]}")
    if exposed:
        print("GPU 0's collectives by time no computation ran beside them (whole trace):")
        for name, us in exposed:
            print(f"  {us / 1e3:8.3f} ms  {name[:90]}")
    print(f"GPU 0's idle gaps of at least {f.min_us:.0f} us, longest first:")
    for g in listed:
        print(
            f"  {g['us']:7.0f} us at {g['at_ms']:8.2f} ms  {g['before'][:30]} -> "
            f"{g['after'][:30]}  host: {g['host'][:80]}"
        )
    print(f"{'GPU':<16} {'span ms':>8} {'busy':>8} {'compute':>8} {'exposed comm':>13} {'idle':>8}")
    for gpu, t in times.items():
        print(
            f"{gpu:<16} {t['span_ms']:>8.2f} {t['busy_ms']:>8.2f} {t['compute_ms']:>8.2f} "
            f"{t['exposed_collective_ms']:>13.2f} {t['idle_ms']:>8.2f}"
        )


if __name__ == "__main__":
    app.run(main)
