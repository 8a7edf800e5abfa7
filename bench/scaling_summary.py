"""Assembles ``scaling.json`` from the runs of ``bench/scaling.sh``.

    python3 bench/scaling_summary.py --runs=$OUT --out=bench/results
    python3 bench/scaling_summary.py   # the README's table, from bench/results/scaling.json

Each run is a workdir ``--runs/NAME`` (its metrics.jsonl) with its log ``NAME.log``: the date
scaling.sh wrote first, then launch.py's parameter count, mesh and devices. tokens/s and MFU
are the medians of the steps logged after ``--from_step`` (compilation, warm-up and the GPUs'
climb to their power limit excluded; the step is written beside the runs). Writes scaling.json
(a ``runs`` list: device, date, gpus, mesh, n_params, tokens_per_s, mfu; ``one_gpu_mean``: per
model, the mean of its one-GPU runs, one on each GPU of the host) and prints the README's table
last: each mesh's tokens/s against N x that mean and against data parallelism on as many GPUs.
Without ``--runs`` it prints the table of ``--out``'s scaling.json and writes nothing.
"""

import json
import math
import pathlib
import re
import statistics

import _report  # bench/_report.py, beside this script
from absl import app, flags

flags.DEFINE_string("runs", None, "Directory of bench/scaling.sh's runs; none: print --out's.")
flags.DEFINE_string("out", "bench/results", "Directory for scaling.json.")
flags.DEFINE_integer("from_step", 75, "Medians of the steps logged after this one.")

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def mesh_of(log: str) -> dict[str, int]:
    """The mesh the run's command line set (``--config.mesh.AXIS=N``), other axes 1."""
    mesh = dict.fromkeys(MESH_AXES, 1)
    for axis, size in re.findall(r"--config\.mesh\.(\w+)=(\d+)", log):
        mesh[axis] = int(size)
    return mesh


def summarise(workdir: pathlib.Path, from_step: int) -> dict | None:
    """One run's record, its device and date as its log names them, or None where it logged
    no steps past ``from_step`` (it failed or was too short: see its log)."""
    log = workdir.with_suffix(".log").read_text()
    metrics = workdir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    rows = [json.loads(line) for line in lines]
    late = [r for r in rows if "tokens_per_s" in r and r["step"] > from_step]
    if not late:
        return None
    mesh = mesh_of(log)
    return dict(
        name=workdir.name,
        device=re.search(r"^mesh \(.*\) over \d+ (.+) devices$", log, re.MULTILINE).group(1),
        date=re.match(r"date: (\S+) ", log).group(1),
        gpus=math.prod(mesh.values()),
        mesh=mesh,
        n_params=int(re.search(r"([\d,]+) parameters", log).group(1).replace(",", "")),
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in late),
        mfu=None if late[0]["mfu"] is None else statistics.median(r["mfu"] for r in late),
        last_loss=late[-1]["loss"],
    )


def data_parallel(runs: list[dict]) -> dict[tuple[int, int], float]:
    """``(n_params, gpus)`` -> the mean tokens/s of that model's ``data=gpus`` runs: for one GPU,
    of its runs alone on each GPU of the host."""
    groups = {}
    for r in runs:
        if r["mesh"]["data"] == r["gpus"]:
            groups.setdefault((r["n_params"], r["gpus"]), []).append(r["tokens_per_s"])
    return {key: statistics.mean(values) for key, values in groups.items()}


def one_gpu(data: dict[tuple[int, int], float]) -> dict[int, float]:
    """``n_params`` -> one GPU's tokens/s (its mean over the host's GPUs) from ``data_parallel``."""
    return {n_params: tokens for (n_params, gpus), tokens in data.items() if gpus == 1}


def table(runs: list[dict], data: dict[tuple[int, int], float]) -> str:
    """Markdown, a row a run by model size, then GPUs: tokens/s, per GPU, vs one GPU x N and vs
    data=N (same model and GPUs); ``data`` is ``data_parallel(runs)``."""
    one = one_gpu(data)
    lines = [
        "| run | GPUs | mesh | params | tokens/s | MFU | vs N x 1 GPU | vs data=N |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["n_params"], r["gpus"], r["name"])):
        mesh = ",".join(f"{a}={n}" for a, n in r["mesh"].items() if n > 1) or "-"
        linear = one.get(r["n_params"])
        vs_one = f"{r['tokens_per_s'] / (linear * r['gpus']):.3f}" if linear else "-"
        dp = data.get((r["n_params"], r["gpus"]))
        vs_dp = f"{r['tokens_per_s'] / dp:.3f}" if dp else "-"
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(
            f"| {r['name']} | {r['gpus']} | {mesh} | {r['n_params'] / 1e6:,.0f}M "
            f"| {r['tokens_per_s']:,.0f} | {mfu} | {vs_one} | {vs_dp} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    f = flags.FLAGS
    if f.runs is None:
        runs = _report.committed(f.out, "scaling")["runs"]
        print(table(runs, data_parallel(runs)))
        return
    workdirs = sorted(p.with_suffix("") for p in pathlib.Path(f.runs).glob("*.log"))
    records = [summarise(w, f.from_step) for w in workdirs]
    failed = [w.name for w, r in zip(workdirs, records, strict=True) if r is None]
    runs = [r for r in records if r is not None]
    data = data_parallel(runs)
    out = pathlib.Path(f.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(
        json.dumps(
            dict(
                runs=runs,
                failed=failed,
                medians_after_step=f.from_step,
                one_gpu_mean=one_gpu(data),
            ),
            indent=1,
        )
        + "\n"
    )
    print(
        table(runs, data)
        + (f"\nno steps logged past {f.from_step} (see their logs): {failed}" if failed else "")
    )


if __name__ == "__main__":
    app.run(main)
