"""Checkpoints, resume and the metrics history under bad input and faults: nothing a command
does may hide or delete a good checkpoint."""

import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxpt import launcher, models, train
from jaxpt.hf.__main__ import export_checkpoint, import_checkpoint
from jaxpt.train import _checkpoint, _metrics

from .conftest import run_in_repo
from .test_train import char_config, final_params, launch, train_losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained for 4 steps with checkpoints 2 and 4 (copy it before use)."""
    workdir = tmp_path_factory.mktemp("trained")
    train.train(trained_config(), workdir)
    return workdir


def trained_config(**train_overrides):
    config = char_config(steps=4, **train_overrides)
    config.checkpoint.every_steps = 2
    config.eval.every_steps = 1000
    config.eval.batches = 1
    return config


@pytest.fixture
def workdir(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "run"))


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` and its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def export(config, workdir):
    export_checkpoint(config, workdir, workdir.parent / "exported")


def generate(config, workdir):
    launcher.sample(config, workdir, launcher.SampleOptions(num_samples=1, max_new_tokens=2))


def read_params(config, workdir):
    train.latest_params(config, workdir)


def resume(config, workdir):
    config.train.steps = 6
    train.train(config, workdir)


@pytest.mark.parametrize(
    "command, field, value",
    [
        # other shapes: these renamed every checkpoint to <step>.unreadable and started over
        pytest.param(generate, "model.n_layer", 4, id="generate-n_layer"),
        pytest.param(export, "model.n_layer", 4, id="export-n_layer"),
        pytest.param(resume, "model.n_layer", 4, id="resume-n_layer"),
        # Lion's state is a subset of AdamW's: this one moved every checkpoint aside as
        # unreadable and trained from step 0 again
        pytest.param(resume, "train.optimizer", "lion", id="resume-optimizer"),
        # the loader state counts batches of 8: "the loader state was saved for {'batch_size':
        # 8, 'seq_len': 64} ...; resume with the same ... batch size", naming no config field
        pytest.param(resume, "train.batch_size", 16, id="resume-batch_size"),
        # the same shapes: these went on with the other model, silently
        pytest.param(generate, "model.activation", "relu", id="generate-activation"),
        pytest.param(resume, "model.activation", "relu", id="resume-activation"),
        pytest.param(resume, "model.position", "rope", id="resume-position"),
    ],
)
def test_a_changed_model_is_one_sentence_and_touches_nothing(workdir, command, field, value):
    before = snapshot(workdir)
    config = trained_config()
    section, name = field.split(".")
    stored = config[section][name]
    config[section][name] = value
    with pytest.raises(
        models.ConfigError,
        match=rf"^{field}={value!r} differs from checkpoint 4 in .*, which was trained "
        rf"with {field}={stored!r}: run with --config\.{field}={stored} ",
    ):
        command(config, workdir)
    assert snapshot(workdir) == before
    assert not (workdir.parent / "exported").exists()


def test_another_presets_checkpoint_names_every_flag_that_differs(workdir):
    """A config differing in several fields was told to set the first alone, which led to the
    next refusal (tiny_moe_2 on a gpt checkpoint: one at a time); the sentence gives them all."""
    before = snapshot(workdir)
    config, stored = trained_config(), trained_config()
    config.model.update(activation="relu", n_layer=4, position="rope")
    config.train.optimizer = "lion"
    with pytest.raises(models.ConfigError) as error:
        resume(config, workdir)
    message = str(error.value)
    assert "\n" not in message and "(3 more differ): run with --config." in message
    flags = re.search(r"run with (.*) to use it", message).group(1).split()
    assert set(flags) == {
        f"--config.model.n_layer={stored.model.n_layer}",
        f"--config.model.activation={stored.model.activation}",
        f"--config.model.position={stored.model.position}",
        f"--config.train.optimizer={stored.train.optimizer}",
    }
    assert snapshot(workdir) == before


@pytest.mark.parametrize("command", [generate, export, read_params])
def test_reading_params_takes_any_optimizer(workdir, command):
    """Sampling, evaluation and export read the params alone: a config whose train.optimizer
    was not the checkpoint's (training's launch flags left out, say) was refused, saying
    that the checkpoint held no opt_state...nu... where the model needed one."""
    before = snapshot(workdir)
    command(trained_config(optimizer="lion"), workdir)
    assert snapshot(workdir) == before


def test_read_params_are_the_checkpoints(workdir):
    step, params = train.latest_params(trained_config(optimizer="adafactor"), workdir)
    names = jax.tree.leaves(ocp.tree.get_param_names(params, include_empty_nodes=False))
    stored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "4" / "state")
    stored = {".".join(k): v for k, v in ocp.tree.to_flat_dict(stored["params"]).items()}
    assert step == 4 and sorted(names) == sorted(stored)
    for name, array in zip(names, jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(array, stored[name])


def test_training_never_rewrites_a_users_metrics_or_plot(tmp_path):
    """A directory that is not a run's (no checkpoints/): its metrics.jsonl lost every record
    after step 0 and its loss.png was drawn over."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "acc": 0.5}\n{"step": 2, "acc": 0.6}\n')
    (tmp_path / "loss.png").write_bytes(b"a user's plot")
    before = snapshot(tmp_path)
    with pytest.raises(
        models.ConfigError,
        match=r"holds metrics\.jsonl and loss\.png but no checkpoints/, so it is not a jaxpt run's",
    ):
        train.train(trained_config(), tmp_path)
    assert snapshot(tmp_path) == before


def test_another_programs_checkpoints_directory_is_not_a_runs(tmp_path):
    """Another trainer's run directory keeps its own checkpoints/: beside it, its
    metrics.jsonl lost every record and its loss.png was drawn over, and a jaxpt step was
    saved among its weights."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model.pt").write_bytes(b"a user's weights")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (tmp_path / "loss.png").write_bytes(b"a user's plot")
    before = snapshot(tmp_path)
    where = re.escape(str(tmp_path / "checkpoints"))
    with pytest.raises(
        models.ConfigError,
        match=rf"^{where} holds model\.pt, which no jaxpt run makes there, so .* is not a jaxpt "
        r"run's: choose a new or empty --workdir \(nothing was changed\)\.$",
    ):
        train.train(trained_config(), tmp_path)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["checkpoints", "tensorboard", "profile"])
def test_a_file_where_a_run_keeps_a_directory_is_one_sentence(tmp_path, name):
    """Tracebacks: orbax's at the first save, after minutes of waiting (checkpoints), a
    NotADirectoryError (tensorboard), a JaxRuntimeError mid-run (profile); generate said
    checkpoints did not exist."""
    (tmp_path / name).write_text("a user's file")
    config = trained_config()
    config.log.profile_from_step = 1
    with pytest.raises(models.ConfigError, match=rf"{name} is a file, where training keeps"):
        train.train(config, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    if name == "checkpoints":
        with pytest.raises(models.ConfigError, match=r"checkpoints is a file, not a run's"):
            generate(config, tmp_path)
    assert (tmp_path / name).read_text() == "a user's file"


@pytest.mark.parametrize("command", [resume, generate], ids=["train", "generate"])
@pytest.mark.parametrize("inside", ["checkpoints/4", "checkpoints", "checkpoints/4/state/x"])
def test_a_workdir_inside_a_runs_checkpoints_names_the_run(workdir, inside, command):
    """--workdir=runs/a/checkpoints/4 (meant to resume runs/a) trained a new run inside
    checkpoint 4, whose run then refused to train ("not a jaxpt checkpoint"); at
    runs/a/checkpoints it started a new run from step 0 among the steps. The read-only modes
    advised training there."""
    before = snapshot(workdir)
    where, run = re.escape(str(workdir / inside)), re.escape(str(workdir))
    with pytest.raises(
        models.ConfigError,
        match=rf"^--workdir={where} is inside the checkpoints of the run in {run}, .*: pass "
        rf"--workdir={run} to resume or read that run",
    ):
        command(trained_config(), workdir / inside)
    assert snapshot(workdir) == before


@pytest.mark.parametrize("inside", ["checkpoints/5", "checkpoints/4/hf"])
@pytest.mark.parametrize("to", ["hf", "jaxpt"])
def test_no_hf_out_inside_a_runs_checkpoints(workdir, inside, to):
    """``jaxpt.hf --out=runs/a/checkpoints/5`` wrote a Hugging Face directory where orbax
    reads step 5, and training runs/a then refused it; the run's files are unchanged."""
    before = snapshot(workdir)
    out = workdir / inside
    with pytest.raises(
        models.ConfigError,
        match=rf"^--out={re.escape(str(out))} is inside the checkpoints of the run in "
        rf"{re.escape(str(workdir))}, .*: choose a --out outside ",
    ):
        if to == "hf":
            export_checkpoint(trained_config(), workdir, out)
        else:
            import_checkpoint(workdir.parent / "never read", out)
    assert snapshot(workdir) == before and not out.exists()


def test_a_resumed_run_never_reads_init_from_and_says_so_once(workdir, capsys):
    """README: a workdir with checkpoints resumes and never reads checkpoint.init_from. Its
    config.json was read at every launch (a hub name fetched the whole snapshot), so a run
    whose origin had moved away was refused instead of resumed."""
    config = trained_config()
    config.train.steps = 5
    config.checkpoint.init_from = str(workdir.parent / "moved away")
    launcher.run(config, workdir=str(workdir), mode="train")
    out = capsys.readouterr().out
    assert checkpoint_steps(workdir) == [2, 4, 5]
    assert out.count("resumed from checkpoint 4\n") == 1
    assert "\n  rules:\n    batch: ('data', 'fsdp', 'expert')\n" in out  # config_text
    assert out.count(f"checkpoint.init_from={workdir.parent / 'moved away'} is not read") == 1


@pytest.mark.parametrize("mode", launcher.MODES)
def test_no_mode_with_init_from_works_inside_a_runs_checkpoint(workdir, mode):
    """Without a checkpoint of its own a workdir reads checkpoint.init_from: --mode=eval then
    wrote eval/0.json into checkpoint 4, and training its run refused it."""
    config = trained_config()
    config.checkpoint.init_from = str(workdir.parent / "pretrained")
    before = snapshot(workdir)
    with pytest.raises(models.ConfigError, match=r"is inside the checkpoints of the run in "):
        launcher.run(config, workdir=str(workdir / "checkpoints" / "4"), mode=mode)
    assert snapshot(workdir) == before


def test_training_never_sets_aside_another_programs_checkpoint(workdir):
    """A step directory that is not a jaxpt checkpoint: training renamed the newest to
    <step>.unreadable-1, and orbax's rotation would have deleted an older one."""
    for step in (1, 9):
        (workdir / "checkpoints" / str(step)).mkdir()
        (workdir / "checkpoints" / str(step) / "model.pt").write_text("another program's")
    before = snapshot(workdir)
    with pytest.raises(
        models.ConfigError, match=r"checkpoints/1 is not a jaxpt checkpoint \(it holds model\.pt\)"
    ):
        resume(trained_config(), workdir)
    assert snapshot(workdir) == before
    assert checkpoint_steps(workdir) == [1, 2, 4, 9]


def test_training_never_deletes_another_programs_unfinished_checkpoint(workdir):
    """Orbax deletes a step's temporary directory before it saves that step: step 6's, which
    the resumed run saves, went with the other program's file in it."""
    unfinished = workdir / "checkpoints" / "6.orbax-checkpoint-tmp"
    unfinished.mkdir()
    (unfinished / "model.pt").write_text("another program's")
    before = snapshot(workdir)
    with pytest.raises(
        models.ConfigError,
        match=r"6\.orbax-checkpoint-tmp is not a jaxpt checkpoint \(it holds model\.pt\)",
    ):
        resume(trained_config(), workdir)
    assert snapshot(workdir) == before


def test_training_resumes_past_its_own_unfinished_checkpoint(workdir, capsys):
    """What a kill in mid-save leaves: the step's and its items' temporary directories."""
    unfinished = workdir / "checkpoints" / "6.orbax-checkpoint-tmp"
    state = workdir / "checkpoints" / "4" / "state"
    shutil.copytree(state, unfinished / f"state{unfinished.suffix}")
    (unfinished / "_CHECKPOINT_METADATA").write_text("{}")
    resume(trained_config(), workdir)
    assert "resumed from checkpoint 4" in capsys.readouterr().out
    assert checkpoint_steps(workdir) == [2, 4, 6] and not unfinished.exists()


def test_orbax_markers_of_any_version_belong_to_a_checkpoint(workdir, capsys):
    """Names that begin with "_" are orbax's (another version may write more): the run resumes
    from that checkpoint."""
    (workdir / "checkpoints" / "4" / "_A_NEWER_ORBAX_MARKER").write_text("{}")
    resume(trained_config(), workdir)
    assert "resumed from checkpoint 4" in capsys.readouterr().out
    assert checkpoint_steps(workdir) == [2, 4, 6]


def test_how_the_model_is_computed_may_change(workdir):
    config = trained_config()
    config.model.update(dtype="bfloat16", remat_policy="full", scan_layers=True)
    step, params = train.latest_params(config, workdir)
    assert step == 4
    _, as_trained = train.latest_params(trained_config(), workdir)
    jax.tree.map(np.testing.assert_array_equal, params, as_trained)  # float32, as stored
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}


@pytest.mark.parametrize(
    "command, field, value, message",
    [
        (
            read_params,
            "model.n_layer",
            4,
            r"holds params\.blocks\.0\.\S+ with shape \(2, .* where this config's model needs "
            r"shape \(4, ",
        ),
        # AdamW's nu, which Lion's state lacks: the checkpoints were moved aside as unreadable
        (
            resume,
            "train.optimizer",
            "lion",
            r"holds opt_state\.\S+\.nu\.\S+ where this config's optimizer state has no such array",
        ),
    ],
)
def test_a_checkpoint_whose_config_lacks_a_field_is_compared_by_shapes(
    workdir, command, field, value, message
):
    section, name = field.split(".")
    for step in (2, 4):  # as if written by a version without that field
        path = workdir / "checkpoints" / str(step) / "config" / "metadata"
        stored = json.loads(path.read_text())
        del stored[section][name]
        path.write_text(json.dumps(stored))
    before = snapshot(workdir)
    config = trained_config()
    config[section][name] = value
    with pytest.raises(models.ConfigError, match=rf"^Checkpoint 4 in .* {message}"):
        command(config, workdir)
    assert snapshot(workdir) == before


def truncate_data_files(checkpoint: Path) -> None:
    for path in (checkpoint / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 100:
            path.write_bytes(path.read_bytes()[:50])


def test_only_training_sets_aside_what_a_crash_left(workdir, capsys):
    """A truncated newest checkpoint, a torn last metrics line, and set-aside directories
    from before (the name of the previous version, and ours)."""
    checkpoints, metrics = workdir / "checkpoints", workdir / "metrics.jsonl"
    truncate_data_files(checkpoints / "4")
    for earlier in ("4.unreadable", "4.unreadable-1"):
        (checkpoints / earlier).mkdir()
        (checkpoints / earlier / "kept").write_text(earlier)
    with metrics.open("a") as f:
        f.write('{"step": 5, "loss": 4.')  # a kill in mid-write
    before = snapshot(workdir)

    assert train.latest_params(trained_config(), workdir)[0] == 2
    assert [r["step"] for r in train.read_metrics(metrics)][-1] == 4
    assert snapshot(workdir) == before  # reading only: nothing moved or rewritten

    resume(trained_config(), workdir)
    out = capsys.readouterr().out
    assert "resumed from checkpoint 2" in out
    assert "dropped a torn last line" in out
    assert (checkpoints / "4.unreadable-2" / "state").is_dir()  # kept, not deleted
    for earlier in ("4.unreadable", "4.unreadable-1"):
        assert (checkpoints / earlier / "kept").read_text() == earlier
    assert checkpoint_steps(workdir) == [2, 4, 6]
    logged = [r["step"] for r in train.read_metrics(metrics) if "loss" in r]
    assert logged == [1, 2, 3, 4, 5, 6]


READ_PARAMS = """
import sys
from jaxpt import train
from tests.test_train import char_config
print(train.latest_params(char_config(), sys.argv[1])[0])
"""


def test_a_damaged_checkpoint_is_one_warning_not_its_abandoned_reads(workdir):
    """Without its OCDBT manifest, reading checkpoint 4's array metadata failed at the first
    array and left the others' reads running: each then failed on orbax's closed event loop,
    and the process printed dozens of tracebacks after the warning. The warning's cause ended
    in the first 300 characters of a JSON spec."""
    (workdir / "checkpoints" / "4" / "state" / "manifest.ocdbt").unlink()
    result = run_in_repo([sys.executable, "-c", READ_PARAMS, str(workdir)])
    assert result.returncode == 0 and result.stdout == "2\n", result.stderr
    assert "Traceback" not in result.stderr
    (warning,) = [line for line in result.stderr.splitlines() if "cannot be read" in line]
    # tensorstore's cause, without the JSON spec it appends (cut mid-way at 300 characters)
    assert re.search(
        r"\(ValueError: NOT_FOUND: [^[]* does not exist\); trying the previous", warning
    )


ABANDONED_READ_ERRORS = """
import sys
from jaxpt.train import _checkpoint

class AbandonedRead:  # its error reaches the unraisable hook, as orbax's abandoned reads' do
    def __init__(self, when):
        self.when = when

    def __del__(self):
        print(f"{self.when}:", end=" ", file=sys.stderr, flush=True)
        raise RuntimeError("Event loop is closed")

with _checkpoint._unreadable_on_error():
    AbandonedRead("in flight")
AbandonedRead("after a read that succeeded")
try:
    with _checkpoint._unreadable_on_error():
        raise ValueError("NOT_FOUND")
except _checkpoint._Unreadable:
    AbandonedRead("after a read that failed")
"""


def test_abandoned_reads_errors_are_dropped_from_the_reads_start_not_only_after_it_failed():
    """Orbax closes its event loop, and the reads it abandoned fail on its threads, before
    the failed restore's error reaches jaxpt: their tracebacks came first, now and then (the
    damaged-checkpoint test above failed about once in ten). Errors of that kind are still
    printed after a read that succeeded."""
    result = run_in_repo([sys.executable, "-c", ABANDONED_READ_ERRORS])
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Event loop is closed") == 1, result.stderr
    assert result.stderr.startswith("in flight: after a read that succeeded: Exception ignored")


def test_no_readable_checkpoint_says_what_to_do(workdir):
    """It said "no checkpoint in ... could be read." and no more."""
    for step in (2, 4):
        truncate_data_files(workdir / "checkpoints" / str(step))
    before = snapshot(workdir)
    with pytest.raises(models.ConfigError) as caught:
        train.latest_params(trained_config(), workdir)
    assert str(caught.value) == (
        f"no checkpoint in {workdir / 'checkpoints'} could be read (the warnings above give each "
        "one's cause): restore their files from a copy, or train this config again with "
        f"--mode=train and --workdir={workdir}, which sets them aside and starts at step 0."
    )
    assert snapshot(workdir) == before


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_must_be_at_least_one(tmp_path, keep):
    config = trained_config()
    config.checkpoint.keep = keep
    with pytest.raises(models.ConfigError, match=rf"^checkpoint\.keep={keep} must be .* >= 1"):
        train.train(config, tmp_path)
    assert not list(tmp_path.iterdir())


def all_finite(workdir: Path, step: int) -> bool:
    return all(np.isfinite(a).all() for a in final_params(workdir, step))


# float32's largest is 3.4028e38: at a constant lr of 3.4e38 the next update overflows.
OVERFLOWING_LR = 3.4e38


def test_skipped_steps_never_rotate_out_the_last_finite_checkpoint(workdir):
    # Step 5 makes the params finite garbage (~1e38); every later step is non-finite.
    config = trained_config(lr=1e38, warmup_steps=0, on_nonfinite="skip")
    config.checkpoint.keep = 2
    config.train.steps = 12
    train.train(config, workdir)
    assert checkpoint_steps(workdir) == [4, 6]  # 6 holds step 5's update; no copies of it
    assert all(all_finite(workdir, step) for step in (4, 6))


@pytest.mark.parametrize(
    "every_steps, message, last_logged",
    [
        # Step 5's update overflows the params; step 6's loss is the first non-finite one.
        (100, r"Step 6 is not finite \(loss \S+, grad_norm \S+\), so training stopped ", 6),
        # A save right after the overflow refuses the params instead of writing them.
        (
            5,
            r"Step 5's params are not finite \(an update overflowed them\), so they were not "
            r"saved and training stopped ",
            5,
        ),
    ],
)
def test_a_non_finite_step_stops_the_run_at_that_step(workdir, every_steps, message, last_logged):
    config = trained_config(lr=OVERFLOWING_LR, warmup_steps=0, schedule="wsd")
    config.train.steps = 30
    config.log.every_steps = 100
    config.checkpoint.every_steps = every_steps
    with pytest.raises(
        train.NonFiniteError,
        match=rf"^{message}.*the last good checkpoint is step 4 in ",
    ):
        train.train(config, workdir)
    logged = [r["step"] for r in train.read_metrics(workdir / "metrics.jsonl") if "loss" in r]
    assert logged == list(range(1, last_logged + 1))  # the bad step is logged, nothing after it
    assert checkpoint_steps(workdir) == [2, 4]


def test_launch_stops_on_a_non_finite_step_in_one_sentence(tmp_path):
    run = launch(tmp_path, f"--config.train.lr={OVERFLOWING_LR}", "--config.train.warmup_steps=0")
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 1, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("launch.py: Step 2 is not finite"), out  # step 1 overflowed the params
    assert "no checkpoint was saved before it" in last
    assert "Traceback" not in out


@pytest.mark.parametrize("line", ["garbage", '{"loss": 1.0}', "[1, 2]"])  # JSON: a KeyError
def test_a_damaged_metrics_line_is_one_sentence(workdir, line):
    metrics = workdir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")
    before = snapshot(workdir)
    with pytest.raises(models.ConfigError, match=r"metrics.jsonl line 2 is not a JSON record"):
        resume(trained_config(), workdir)
    assert snapshot(workdir) == before


def test_the_history_rewrite_is_atomic(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    history = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 9))
    metrics.write_text(history)

    def killed_mid_write(path, text):
        with open(path, "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(Path, "write_text", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        _metrics._drop_records_after(metrics, 4)  # resuming from step 4
    monkeypatch.undo()
    assert metrics.read_text() == history  # the old history, whole


def test_sigint_saves_then_raises_interrupted(tmp_path):
    config = char_config(steps=100_000)
    config.checkpoint.every_steps = 100_000
    metrics = tmp_path / "metrics.jsonl"

    def interrupt_once_training():
        while not metrics.exists() or not metrics.read_text().strip():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_training, daemon=True).start()
    with pytest.raises(train.Interrupted) as stopped:
        train.train(config, tmp_path)
    assert stopped.value.signal == signal.SIGINT and 128 + stopped.value.signal == 130
    assert checkpoint_steps(tmp_path) == [stopped.value.step]


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Five SIGKILLs at seeded random moments around checkpoint writes (a save every 2 steps,
    each step slowed by an evaluation), each run resumed from what the last one left."""
    steps = 16
    flags = [
        f"--config.train.steps={steps}",
        "--config.checkpoint.every_steps=2",
        "--config.checkpoint.keep=2",
        "--config.eval.every_steps=1",
        "--config.eval.batches=4",
    ]
    env = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),  # compile once, not 7 times
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    straight = launch(tmp_path / "straight", *flags, env=env)
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out
    rng = random.Random(11)
    killed = tmp_path / "killed"
    for target in sorted(rng.sample(range(3, steps - 2), 5)):
        run = launch(killed, *flags, env=env)
        for line in run.stdout:  # the live run's progress: "step  N/24 loss ..."
            if re.match(r"step +\d+/", line) and int(line.split()[1].split("/")[0]) >= target:
                break
        time.sleep(rng.uniform(0.0, 0.05))
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert run.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = launch(killed, *flags, env=env)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    want, got = final_params(tmp_path / "straight", steps), final_params(killed, steps)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)
    records = train.read_metrics(killed / "metrics.jsonl")
    assert sorted(r["step"] for r in records if "loss" in r) == list(range(1, steps + 1))
    assert sorted(r["step"] for r in records if "val_loss" in r) == list(range(1, steps + 1))
    assert train_losses(killed) == train_losses(tmp_path / "straight")


def test_a_step_another_process_cannot_read_is_skipped_by_every_process(
    workdir, monkeypatch, caplog
):
    """Several processes each read their part of a checkpoint: where one of them cannot (its
    files alone damaged), the others read an older step too, instead of resuming apart."""
    others = iter([False])  # another process's answer for the newest step; then all read

    def every_process(readable: bool) -> bool:
        return readable and next(others, True)

    monkeypatch.setattr(_checkpoint, "_every_process", every_process)
    before = snapshot(workdir)
    assert train.latest_params(trained_config(), workdir)[0] == 2  # this process read 4
    assert snapshot(workdir) == before
    assert "Checkpoint 4: another process cannot read its part." in caplog.text
