"""Benchmarks: each script runs at a tiny size on CPU (their figures are not checked here)."""

import json
import math
import sys

import pytest

from .conftest import ROOT, run_in_repo


@pytest.mark.parametrize(
    ("script", "size"),
    [
        ("train_step", ["--batches=2", "--seq=8", "--warmup=1", "--steps=1"]),
        ("profile_step", ["--batch=2", "--seq=8", "--steps=1"]),
    ],
)
def test_step_benches_time_the_bigram(script, size, tmp_path):
    # they set model fields (remat_policy, sdpa_implementation, scan_layers) that the bigram
    # table has not, and stopped with a traceback
    result = run_in_repo(
        [sys.executable, f"bench/{script}.py", "--preset=bigram", f"--out={tmp_path}", *size]
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / f"{script}.json").read_text())
    assert record["preset"] == "bigram" and record["remat"] is None


@pytest.mark.parametrize(
    ("command", "sentence"),
    [
        ("compile_time.py --model=bigram", "--model=bigram has no layers: compile time against"),
        ("train_step.py --preset=bigram --remat=full", "model.remat_policy is not a Bigram"),
        ("train_step.py --preset=gtp", "model.name='gtp' is not one of"),
        # a traceback after compiling (no median of no steps, int('x')), or, with no warm-up,
        # the compilation timed as a step
        (
            "train_step.py --preset=bigram --seq=8 --batches=1 --steps=0",
            "flag --steps=0: 0 is not a positive",
        ),
        (
            "presets.py --tokens=8 --warmup=0 --steps=1 bigram",
            "flag --warmup=0: 0 is not a positive",
        ),
        (
            "train_step.py --preset=bigram --seq=8 --batches=1,x",
            "--batches takes positive integers",
        ),
        ("compile_time.py --layers=x", "--layers takes positive integers"),
        ("kernels.py --sweep=los", "--sweep names kernels among norm and loss"),
        ("presets.py", "presets.py: name the presets to time"),  # an UnboundLocalError
    ],
)
def test_bad_bench_flags_get_one_sentence(command, sentence, tmp_path):
    # they stopped with a traceback (compile_time.py: a TypeError from inside the model config)
    result = run_in_repo([sys.executable, *f"bench/{command} --out={tmp_path}".split()])
    assert result.returncode == 1
    assert sentence in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


def markdown_tables(text: str) -> list[str]:
    """Each block of consecutive ``|`` lines of ``text``, its lines joined by newlines."""
    tables, lines = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            tables.append("\n".join(lines))
            lines = []
    return tables


@pytest.mark.parametrize("summary", ["gpu_summary", "scaling_summary"])
def test_summaries_print_the_readme_tables_from_the_committed_json(summary):
    # they read only a device call's runs (--runs was required), and the README's tables had
    # been edited by hand (a row annotated, another layout): bench/results regenerated neither
    results = ROOT / "bench" / "results"
    committed = {path.name: path.read_bytes() for path in results.iterdir()}
    result = run_in_repo([sys.executable, f"bench/{summary}.py"])
    assert result.returncode == 0, result.stderr
    readme = (ROOT / "README.md").read_text()
    tables = markdown_tables(result.stdout)
    assert tables and all(f"\n\n{table}\n\n" in readme for table in tables)
    assert {path.name: path.read_bytes() for path in results.iterdir()} == committed


def write_gpu_runs(runs, devices: dict[str, str]) -> None:
    """What bench/gpu.sh writes into ``runs``, its figures round numbers; ``devices``: each
    file's device where not "H"."""
    device = lambda name: devices.get(name, "H")
    files = {
        "train_step": dict(
            device=device("train_step"),
            date="d",
            jax="j",
            scan_layers=False,
            logits_dtype="bf16",
            rows=[dict(batch=b, seq=1024, tokens_per_s=500.0 * b, mfu=0.4) for b in (16, 32)],
        ),
        "torch_gpt2": dict(
            env=dict(device=device("torch_gpt2")),
            runs=[dict(mode="compile", micro_batch=b, tokens_per_s=400.0 * b) for b in (16, 32)],
        ),
        "hf_generate": dict(
            env=dict(device=device("hf_generate")),
            runs=[
                dict(variant="static_cache_autocompile", batch=b, new_tokens_per_s=100.0 * b)
                for b in (1, 32)
            ],
        ),
        "generate": dict(
            device=device("generate"),
            rows=[dict(impl="jaxpt", batch=b, new_tokens_per_s=300.0 * b) for b in (1, 32)],
        ),
        "unrolled/generate": dict(
            device=device("unrolled/generate"),
            rows=[dict(impl="jaxpt", batch=b, new_tokens_per_s=400.0 * b) for b in (1, 32)],
        ),
        "presets": dict(
            device=device("presets"), rows=[dict(name="gpt", tokens_per_s=1.0, mfu=0.5)]
        ),
        "launch/scaling": dict(
            runs=[dict(name="one", device=device("launch/scaling"), tokens_per_s=2.0, mfu=0.3)]
        ),
    }
    for name, record in files.items():
        (runs / name).parent.mkdir(parents=True, exist_ok=True)
        (runs / f"{name}.json").write_text(json.dumps(record))


@pytest.mark.parametrize("other", [None, "torch_gpt2", "unrolled/generate", "launch/scaling"])
def test_gpu_summary_compares_figures_of_one_device(other, tmp_path):
    # it divided jaxpt's figures by the references' whatever device each came from
    write_gpu_runs(tmp_path, {} if other is None else {other: "A"})
    command = [sys.executable, "bench/gpu_summary.py", f"--runs={tmp_path}", f"--out={tmp_path}"]
    result = run_in_repo(command)
    if other is not None:
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert (
            "the runs name different devices" in result.stderr
            and f"'{other}': 'A'" in result.stderr
        )
        assert not (tmp_path / "gpu.json").exists()
        return
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "gpu.json").read_text())
    assert summary["device"] == "H" and summary["train_ratio"] == 500 / 400
    assert summary["decode_unrolled_b32_ratio"] == 400 / 100


def test_gpu_summary_marks_a_failed_reference_run(tmp_path):
    # a reference run that recorded an error and no figure (torch.compile out of memory at 16
    # x 1024) stopped the summary with a KeyError traceback, and its other figures were lost
    write_gpu_runs(tmp_path, {})
    torch = json.loads((tmp_path / "torch_gpt2.json").read_text())
    torch["runs"][0] = dict(mode="compile", micro_batch=16, error="OOM: CUDA out of memory")
    (tmp_path / "torch_gpt2.json").write_text(json.dumps(torch))
    command = [sys.executable, "bench/gpu_summary.py", f"--runs={tmp_path}", f"--out={tmp_path}"]
    result = run_in_repo(command)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "gpu.json").read_text())
    assert summary["train_ref_tokens_per_s"] is None and summary["train_ratio"] is None
    assert summary["train_ref_error"] == "OOM: CUDA out of memory"
    assert summary["train_big_ratio"] == (500 * 32) / (400 * 32)
    assert summary["decode_b32_ratio"] == (300 * 32) / (100 * 32)
    rows = result.stdout.splitlines()
    train_row = "| GPT-2 124M train step, tokens/s | 8,000 (MFU 40.0%) | torch.compile failed | - |"
    assert train_row in rows
    assert "| same at 32 x 1024 | 16,000 | torch.compile 12,800 | 1.25x |" in rows


def write_scaling_run(runs, name: str, mesh: dict[str, int], tokens_per_s: list[float]) -> None:
    """A run as bench/scaling.sh leaves it: its log (scaling.sh's first line, then launch.py's
    summary) and its metrics.jsonl, a step logged every 5 with ``tokens_per_s`` in turn."""
    flags = " ".join(f"--config.mesh.{axis}={size}" for axis, size in mesh.items())
    axes = dict(data=1, fsdp=1, tensor=1, expert=1) | mesh
    sizes = ", ".join(f"{axis}={size}" for axis, size in axes.items())
    (runs / f"{name}.log").write_text(
        f"date: 2026-11-27 flags: --config.mesh.data=1 {flags}\n"
        "model gpt: 124,475,904 parameters; 16,384 tokens per step (16 x 1024); ...\n"
        f"mesh ({sizes}) over {math.prod(mesh.values())} NVIDIA H200 devices\n"
    )
    (runs / name).mkdir()
    steps = [
        dict(step=5 * (i + 1), loss=3.0, tokens_per_s=t, mfu=0.4)
        for i, t in enumerate(tokens_per_s)
    ]
    (runs / name / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))


def test_scaling_summary_takes_device_and_date_from_the_runs(tmp_path):
    # it stamped every run with the summarising machine's device and today's date (a CPU and
    # another day, where the runs' folder was summarised after it came back from the GPUs)
    write_scaling_run(tmp_path, "one", dict(data=1), [90.0, 100.0, 110.0])
    write_scaling_run(tmp_path, "data2", dict(data=2), [150.0, 180.0, 190.0])
    command = [
        sys.executable,
        "bench/scaling_summary.py",
        f"--runs={tmp_path}",
        f"--out={tmp_path}",
    ]
    result = run_in_repo([*command, "--from_step=5"])
    assert result.returncode == 0, result.stderr
    runs = {r["name"]: r for r in json.loads((tmp_path / "scaling.json").read_text())["runs"]}
    assert {(r["device"], r["date"]) for r in runs.values()} == {("NVIDIA H200", "2026-11-27")}
    assert runs["data2"]["mesh"] == dict(data=2, fsdp=1, tensor=1, expert=1)
    assert (runs["one"]["tokens_per_s"], runs["data2"]["tokens_per_s"]) == (105.0, 185.0)
    assert "| data2 | 2 | data=2 | 124M | 185 | 40.0% | 0.881 | 1.000 |" in result.stdout
