"""Two launch.py processes of 4 CPU devices each (a hybrid mesh: data parallel across the
processes, FSDP within each) train as one process of 8 devices, one process on one device
resumes their checkpoint, and two processes resume past a damaged one."""

import json
import re
import shutil
import signal
import socket

import numpy as np

from tests.test_checkpoints import truncate_data_files
from tests.test_train import launch as launch_run

STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir, devices: int, process: tuple[int, int, int] | None = None, *more, steps=STEPS):
    """A short run on ``devices`` CPU devices; ``process``: (id, count, coordinator port);
    ``more``: overrides after the others."""
    overrides = [
        f"--config.train.steps={steps}",
        "--config.eval.every_steps=3",
        "--config.eval.batches=2",
        "--config.checkpoint.every_steps=3",
    ]
    if process is None:
        return launch_run(workdir, *overrides, devices=devices)
    index, count, port = process
    env = dict(
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES=str(count),
        JAX_PROCESS_ID=str(index),
    )
    # mesh.dcn_data keeps its default, -1: the data axis spans the processes (the "slices")
    hybrid = ["--config.mesh.fsdp=2", "--config.log.shardings", "--config.log.profile_from_step=2"]
    return launch_run(
        workdir, *overrides, *hybrid, *more, "--distributed", devices=devices, env=env
    )


def finish(process) -> str:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
    return out


def records(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one_and_one_device_resumes_them(tmp_path):
    port = free_port()
    hosts = [launch(tmp_path / "two", 4, (i, 2, port)) for i in range(2)]
    report = finish(hosts[0])
    other = finish(hosts[1])
    progress = re.compile(r"^step +\d+(/\d+)? (loss|val_loss) ", re.MULTILINE)
    assert len(progress.findall(report)) == STEPS + 2  # log.every_steps=1, 2 evaluations
    assert not progress.search(other)  # process 0 alone prints them
    start = re.compile(r"^(model gpt: |  optimizer: adamw$)", re.MULTILINE)  # summary, config
    assert len(start.findall(report)) == 2
    assert not start.search(other)  # each process printed them
    finish(launch(tmp_path / "one", 8))
    two, one = records(tmp_path / "two"), records(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one]  # one writer, no duplicates
    key = lambda rs, k: [r[k] for r in rs if k in r]
    np.testing.assert_allclose(key(two, "loss"), key(one, "loss"), rtol=1e-5)
    np.testing.assert_allclose(key(two, "val_loss"), key(one, "val_loss"), rtol=1e-5)
    assert len(key(one, "loss")) == STEPS and len(key(one, "val_loss")) == 2
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["3", "6"]
    # the mesh across the processes (in the summary, and log.shardings's), and FSDP within each
    mesh = "mesh (data=4, fsdp=2, tensor=1, expert=1) over 8 cpu devices"
    assert f"{mesh}\n" in report and f"{mesh}; param shardings:\n" in report
    assert "P('fsdp', None)" in next(line for line in report.splitlines() if " wte.weight " in line)
    for i in range(2):  # each process's trace in a folder of its own
        assert list((tmp_path / "two" / "profile" / f"process_{i}").rglob("perfetto_trace.json.gz"))

    # the two processes' checkpoint 3 (a copy), resumed by one process on one device
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two" / "checkpoints" / "3", resumed / "checkpoints" / "3")
    shutil.copy(tmp_path / "two" / "metrics.jsonl", resumed / "metrics.jsonl")
    assert "resumed from checkpoint 3" in finish(launch(resumed, 1))
    again = records(resumed)
    assert [r["step"] for r in again] == [r["step"] for r in two]
    np.testing.assert_allclose(key(again, "loss"), key(two, "loss"), rtol=1e-5)
    np.testing.assert_allclose(key(again, "val_loss"), key(two, "val_loss"), rtol=1e-5)

    # their checkpoints with the last one damaged, resumed by two processes: process 0 alone
    # sets it aside (both renamed it: one rename failed and the run hung), and they train it again
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "two" / "checkpoints", damaged / "checkpoints")
    shutil.copy(tmp_path / "two" / "metrics.jsonl", damaged / "metrics.jsonl")
    truncate_data_files(damaged / "checkpoints" / "6")
    port = free_port()
    outputs = [finish(host) for host in [launch(damaged, 4, (i, 2, port)) for i in range(2)]]
    assert ["resumed from checkpoint 3" in out for out in outputs] == [True, False]
    names = sorted(p.name for p in (damaged / "checkpoints").iterdir())
    assert names == ["3", "6", "6.unreadable-1"]
    np.testing.assert_array_equal(key(records(damaged), "loss"), key(two, "loss"))


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    """SIGTERM reaches a job's processes steps apart (here: one of them only); a process that
    stopped alone saved while the other stepped, and their collectives hung."""
    port = free_port()
    quick = ["--config.log.profile_from_step=0", "--config.eval.every_steps=1000"]
    hosts = [launch(tmp_path, 4, (i, 2, port), *quick, steps=10_000) for i in range(2)]
    try:
        for line in hosts[0].stdout:
            if (logged := re.match(r"step +(\d+)/", line)) and int(logged[1]) >= 4:
                break
        hosts[0].send_signal(signal.SIGTERM)
        outs = [host.communicate(timeout=120)[0] for host in hosts]
    finally:
        for host in hosts:  # hung ones too
            host.kill()
    assert [host.returncode for host in hosts] == [128 + signal.SIGTERM] * 2, outs[1][-3000:]
    saved = [re.search(r"SIGTERM: saving step (\d+) before exiting", out)[1] for out in outs]
    assert saved[0] == saved[1] and (tmp_path / "checkpoints" / saved[0]).is_dir()
