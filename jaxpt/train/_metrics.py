"""Training metrics: FLOPs and MFU, console progress, metrics.jsonl, TensorBoard, loss plots."""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

from jaxpt.errors import ConfigError

# Dense bf16 peak FLOP/s of one device, by a substring of jax's device_kind (datasheets); the
# first match counts.
PEAK_FLOPS = {
    "H100 PCIe": 756.5e12,
    "H100 NVL": 835.5e12,
    "H100": 989.4e12,  # SXM
    "H200": 989.4e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p's device_kind (after v5e's "TPU v5 lite", which it is part of)
    "TPU v6": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of a device kind (``jax.Device.device_kind``, e.g. ``"NVIDIA H100
    80GB HBM3"``, ``"TPU v5 lite"``), or None where unknown (e.g. CPUs)."""
    return next((v for k, v in PEAK_FLOPS.items() if k.lower() in device_kind.lower()), None)


def print_once(line: str) -> None:
    """Prints ``line`` on process 0 only: what every process of a run knows alike (its config,
    its progress), whose N copies, interleaved in a job's log, would read as N runs."""
    if jax.process_index() == 0:
        print(line, flush=True)


class MetricsLog:
    """Writes one JSON record per step to ``metrics.jsonl`` and TensorBoard, prints progress
    (process 0 alone, in a multi-process run)."""

    def __init__(
        self,
        workdir: Path,
        *,
        total_steps: int,
        first_step: int,
        tokens_per_step: int,
        flops_per_token: float,
        print_every: int,
    ):
        self.path = workdir / "metrics.jsonl"
        self.is_writer = jax.process_index() == 0  # one process writes the logs
        if self.is_writer:
            _drop_records_after(self.path, first_step)  # steps a killed run logged past its last
        self.total_steps, self.first_step = total_steps, first_step
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.print_every = print_every
        self.peak = peak_flops(jax.devices()[0].device_kind)
        self.n_devices = jax.device_count()
        self.file = self.path.open("a") if self.is_writer else None
        self.tensorboard = None
        if self.is_writer:
            self.tensorboard = _summary_writer(workdir / "tensorboard", first_step)
        self.start_time = self.last_time = time.perf_counter()
        self.last_step = first_step

    def train_steps(self, records: list[dict], finished: float) -> None:
        """Records for consecutive steps just fetched from the device (each has ``step``), the
        last of which finished at ``finished`` (``time.perf_counter()``; ``StepClock``)."""
        if not records:
            return
        now = finished
        steps_done = records[-1]["step"] - self.last_step
        seconds_per_step = (now - self.last_time) / max(steps_done, 1)
        tokens_per_s = self.tokens_per_step / seconds_per_step
        mfu = (
            tokens_per_s * self.flops_per_token / (self.peak * self.n_devices)
            if self.peak
            else None
        )
        for record in records:
            record.update(tokens_per_s=tokens_per_s, mfu=mfu)
            self._write(record, "train")
        self.last_time, self.last_step = now, records[-1]["step"]
        last = records[-1]
        if last["step"] % self.print_every == 0 or last["step"] == self.total_steps:
            eta = (self.total_steps - last["step"]) * seconds_per_step
            mfu_text = f" mfu {100 * mfu:.1f}%" if mfu is not None else ""
            print_once(
                f"step {last['step']:>6}/{self.total_steps} loss {last['loss']:.4f} "
                f"grad_norm {last['grad_norm']:.3f} lr {last['lr']:.2e} "
                f"{tokens_per_s:,.0f} tok/s{mfu_text} eta {_duration(eta)}"
            )

    def eval(self, step: int, metrics: dict) -> None:
        """Validation metrics at ``step``, just computed (see ``_evaluated``)."""
        record = {"step": step, **{f"val_{k}": v for k, v in metrics.items()}}
        self._write(record, "val")
        print_once(f"step {step:>6} val_loss {metrics['loss']:.4f}")
        self._evaluated()

    def task(self, step: int, name: str, metrics: dict) -> None:
        """An evaluation task's metrics at ``step``, each logged as ``<name>_<metric>``, just
        computed (see ``_evaluated``)."""
        self._write({"step": step, **{f"{name}_{k}": v for k, v in metrics.items()}}, name)
        values = " ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
        )
        print_once(f"step {step:>6} {name} {values}")
        self._evaluated()

    def _evaluated(self) -> None:
        """Restarts the clock of ``tokens_per_s`` after an evaluation, which ran once every
        step before it was logged: its time is no training step's (a HellaSwag evaluation
        made the next steps' logged throughput and MFU a fraction of what they were)."""
        self.last_time = time.perf_counter()

    def _write(self, record: dict, group: str) -> None:
        if not self.is_writer:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # what a killed run logged survives it
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                self.tensorboard.add_scalar(f"{group}/{key}", value, record["step"])

    def close(self) -> None:
        """Flushes the files and draws the loss plot."""
        if self.is_writer:
            self.file.close()
            self.tensorboard.close()
            plot_losses(self.path, self.path.parent / "loss.png")


class StepClock:
    """When each dispatched train step finished on the device, as ``time.perf_counter()``: a
    thread waits for each step's metrics in turn. The time the loop fetches them is not that
    where dispatching the next step blocks the host until that step has nearly run (XLA:GPU
    reads a while loop's condition on the host, gradient accumulation's for one): a logged
    stretch ending at a fetch with no step after it (the last step, an eval or save point) then
    seemed to take a step's tail, and configs/smollm_sft.py's last step logged an MFU of 294%."""

    def __init__(self):
        self._dispatched: queue.SimpleQueue = queue.SimpleQueue()
        self._finished: dict[int, float] = {}
        self._changed = threading.Condition()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def dispatched(self, step: int, metrics: dict) -> None:
        """``step`` was just dispatched; ``metrics`` are its outputs."""
        self._dispatched.put((step, metrics))

    def finished_at(self, step: int) -> float:
        """When dispatched step ``step`` finished (waiting for the watcher to see it); forgets
        it and the steps before it."""
        with self._changed:
            self._changed.wait_for(lambda: step in self._finished)
            finished = self._finished[step]
            self._finished = {s: t for s, t in self._finished.items() if s > step}
        return finished

    def close(self) -> None:
        """Ends the watcher once it has seen the steps dispatched (not waited for: a step stuck
        in a collective with a failed process must not hold the exit)."""
        self._dispatched.put(None)

    def _watch(self) -> None:
        while (item := self._dispatched.get()) is not None:
            step, metrics = item
            with contextlib.suppress(Exception):  # the loop meets a failed step's error itself
                jax.block_until_ready(metrics)
            with self._changed:
                self._finished[step] = time.perf_counter()
                self._changed.notify_all()


def _summary_writer(directory: Path, first_step: int):
    """tensorboardX's ``SummaryWriter`` on ``directory``, imported without torch: tensorboardX
    imports torch where it is installed, only to accept torch tensors (jaxpt logs floats), and
    that import took longer than jax's, at the start of every run on such a machine.

    Its new event file opens with a restart marker (``SessionLog.START`` at ``first_step + 1``):
    TensorBoard then hides what older event files hold from that step on, the steps a killed
    run logged past its last checkpoint, as ``_drop_records_after`` drops them from
    ``metrics.jsonl``; the files themselves are left as they are. A fresh run writes one too:
    TensorBoard takes a run's first marker for its start, not a restart."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # meanwhile, ``import torch`` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter(str(directory), purge_step=first_step + 1)


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrites ``path`` without the records after ``step`` (and a torn last line), through a
    temporary file renamed over it, so a kill leaves the old or the new history."""
    if not path.exists():
        return
    records = _parse(path, note=True)
    kept = [record for record in records if record["step"] <= step]
    if len(kept) == len(records) and path.read_bytes().endswith(b"\n"):
        return
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(record) + "\n" for record in kept))
    os.replace(temporary, path)


def _parse(path: Path, *, note: bool) -> list[dict]:
    """The records of a ``metrics.jsonl``; a torn last line (a killed run's, or a full disk's)
    is left out, with a note when ``note``. A damaged line elsewhere, or valid JSON that is not
    an object with an integer ``step``, is a ConfigError."""
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise _damaged(path, number) from None
            if note:
                print(f"{path}: dropped a torn last line (a run was cut off mid-write)")
            continue
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            raise _damaged(path, number)  # it failed as a KeyError wherever steps are read
        records.append(record)
    return records


def _damaged(path: Path, number: int) -> ConfigError:
    """The error for line ``number`` of ``path``, which is no record of a logged step."""
    return ConfigError(
        f"{path} line {number} is not a JSON record of a logged step: repair or remove that "
        "line (the run's history of logged steps)."
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a torn last line, as a running or killed run may
    leave, is left out)."""
    return _parse(path, note=False)


def plot_losses(metrics_path: Path, out: Path) -> None:
    """Train and validation loss against step: the whole run, and its second half zoomed;
    HellaSwag accuracy beside them where the run evaluated it. Nothing is drawn for a run that
    logged no step (stopped before its first: its step did not fit, Ctrl-C while compiling)."""
    records = read_metrics(metrics_path)
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = np.array([(r["step"], r["loss"]) for r in records if "loss" in r])
    val = np.array([(r["step"], r["val_loss"]) for r in records if "val_loss" in r])
    hellaswag = [r for r in records if "hellaswag_acc_norm" in r]
    fig, axes = plt.subplots(1, 3 if hellaswag else 2, figsize=(18 if hellaswag else 12, 4.5))
    for ax, zoom in zip(axes, (False, True), strict=False):
        for data, label, style in ((train, "train", "-"), (val, "validation", "o-")):
            if len(data) == 0:
                continue
            if zoom:
                data = data[data[:, 0] >= data[-1, 0] / 2]
            ax.plot(data[:, 0], data[:, 1], style, label=label, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("second half" if zoom else "loss")
        ax.grid(alpha=0.3)
        ax.legend()
    if hellaswag:
        _plot_hellaswag(axes[2], hellaswag)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _plot_hellaswag(ax, records: list[dict]) -> None:
    steps = [r["step"] for r in records]
    for key, label in (("hellaswag_acc", "acc"), ("hellaswag_acc_norm", "acc_norm")):
        ax.plot(steps, [r[key] for r in records], "o-", label=label, markersize=3)
    ax.axhline(0.25, color="gray", linestyle=":", label="chance")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_title("HellaSwag")
    ax.grid(alpha=0.3)
    ax.legend()
