"""Two launch.py processes of 4 CPU devices each train exactly as one process of 8 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import FAST_COMPILE
from tests.test_train import ROOT

STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir, devices: int, process: tuple[int, int, int] | None = None):
    """launch.py on ``devices`` CPU devices; ``process``: (id, count, coordinator port)."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "}
    env["XLA_FLAGS"] += FAST_COMPILE
    args = [
        sys.executable,
        str(ROOT / "launch.py"),
        "--config=configs/gpt.py:smoke",
        f"--workdir={workdir}",
        "--config.data.tokenizer=char",
        "--config.model.vocab_size=128",
        "--config.train.batch_size=8",
        f"--config.train.steps={STEPS}",
        "--config.log.every_steps=1",
        "--config.eval.every_steps=3",
        "--config.eval.batches=2",
        "--config.checkpoint.every_steps=3",
    ]
    if process is not None:
        index, count, port = process
        env.update(
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES=str(count),
            JAX_PROCESS_ID=str(index),
        )
        args.append("--distributed")
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process) -> str:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
    return out


def records(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one(tmp_path):
    port = free_port()
    hosts = [launch(tmp_path / "two", 4, (i, 2, port)) for i in range(2)]
    for host in hosts:
        finish(host)
    finish(launch(tmp_path / "one", 8))
    two, one = records(tmp_path / "two"), records(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one]  # one writer, no duplicates
    key = lambda rs, k: [r[k] for r in rs if k in r]
    np.testing.assert_allclose(key(two, "loss"), key(one, "loss"), rtol=1e-5)
    np.testing.assert_allclose(key(two, "val_loss"), key(one, "val_loss"), rtol=1e-5)
    assert len(key(one, "loss")) == STEPS and len(key(one, "val_loss")) == 2
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["3", "6"]
