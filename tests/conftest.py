"""Test setup: 8 virtual CPU devices (before jax is imported) for sharding tests, and private
caches for the embedded corpus, for compiled programs and for Python bytecode, shared by the
xdist workers and the subprocesses the tests launch, and new in every run; SIGINT as a
terminal's, even in a background job; a Hugging Face hub that answers without the network."""

import atexit
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import huggingface_hub
import pytest

# Tiny test models spend their time in XLA's compiler, not in the compiled code: skip the
# expensive LLVM passes (results are the same, compiles take about half as long), and emit
# fusions with XLA:CPU's loop emitters instead of its MLIR fusion emitters, whose compiles
# take about twice as long (a tiny_moe train step: 4.1 s -> 1.9 s; the same losses). jaxlib
# 0.11 has no loop emitters and aborts on the flag, as on any flag it does not know.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if tuple(map(int, importlib.metadata.version("jaxlib").split(".")[:2])) < (0, 11):
    FAST_COMPILE += " --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# A shell starts a background job (`cmd &`) with SIGINT ignored, which every child inherits:
# the tests that press Ctrl-C on a launch.py or prepare run need a terminal's default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("JAXPT_CACHE_DIR", tempfile.mkdtemp(prefix="jaxpt-test-cache-"))

# Many tests compile the same programs (the char-level GPT smoke step in-process and in every
# launch.py subprocess): compile each once per run. The cache starts empty in every run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxpt-test-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# Under PYTHONDONTWRITEBYTECODE every subprocess compiles jax, orbax, matplotlib and the rest
# from source again. Let them share bytecode in a directory of this run instead (the
# environment and the sources stay untouched).
if os.environ.get("PYTHONDONTWRITEBYTECODE") and "PYTHONPYCACHEPREFIX" not in os.environ:
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="jaxpt-test-pycache-")
    atexit.register(shutil.rmtree, os.environ["PYTHONPYCACHEPREFIX"], ignore_errors=True)


def use_devices(monkeypatch, n: int) -> list:
    """Makes ``jax.devices()``, so the mesh ``train.train`` builds, the first ``n`` of the
    eight test devices: a run that needs no more than data parallelism runs its program on
    ``n`` of them, not eight (each a thread competing for the CI machine's two cores)."""
    import jax

    devices = jax.devices()[:n]
    monkeypatch.setattr(jax, "devices", lambda backend=None: devices)
    monkeypatch.setattr(jax, "device_count", lambda backend=None: len(devices))
    return devices


ROOT = Path(__file__).resolve().parents[1]
PANCHATANTRA = ROOT.parent / "shared/data/panchatantra-ryder.txt"  # an English book


def shared_book() -> Path:
    """``PANCHATANTRA`` (../shared/data beside the checkout), or a skip where it is absent."""
    if not PANCHATANTRA.is_file():
        pytest.skip(f"{PANCHATANTRA} is absent (shared test data)")
    return PANCHATANTRA


def run_in_repo(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``args`` run to completion from the repository root on one CPU device, compiling with
    ``FAST_COMPILE``, their output captured as text; ``kwargs`` go to ``subprocess.run``."""
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}
    return subprocess.run(
        args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, **kwargs
    )


class FakeHubSession:
    """huggingface_hub's HTTP client as `data.hub_or_cache` asks it whether the hub answers:
    records each request's URL and settings, and answers, or raises ``error``."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.requests: list[tuple[str, dict]] = []

    def head(self, url: str, **settings) -> None:
        self.requests.append((url, settings))
        if self.error is not None:
            raise self.error


@pytest.fixture(autouse=True)
def hub_session(monkeypatch) -> FakeHubSession:
    """The hub answers every test without the network (the libraries' own requests are faked
    where a test needs them); a test of an unreachable hub sets ``hub_session.error``."""
    session = FakeHubSession()
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: session)
    return session


def interrupt_while_importing(args: list[str], **kwargs) -> tuple[int, list[str], set[str]]:
    """``python -X importtime <args>`` from the repository root, sent SIGINT as soon as numpy
    has imported (jax and the rest then import for seconds, before any main runs): its exit
    status, its stderr lines but the import times, and the modules it had finished importing
    (``kwargs`` go to ``subprocess.Popen``)."""
    run = subprocess.Popen(
        [sys.executable, "-X", "importtime", *args],
        cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": FAST_COMPILE},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )
    lines = []
    while not lines or lines[-1].rsplit("|", 1)[-1].strip() != "numpy":
        lines.append(run.stderr.readline())
        assert lines[-1], "the command ended before it imported numpy"
    run.send_signal(signal.SIGINT)
    lines += run.communicate(timeout=60)[1].splitlines(keepends=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import ")}
    said = [line for line in lines if not line.startswith("import time:")]
    return run.returncode, said, imported
