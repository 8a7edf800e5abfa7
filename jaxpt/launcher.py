"""What ``launch.py`` runs, importable so tests can drive it without a subprocess."""

from __future__ import annotations

from jaxpt import train


def run(config, *, workdir: str, mode: str) -> None:
    """Runs ``mode`` (``train``) for ``config`` in ``workdir``."""
    print(config, flush=True)
    if mode == "train":
        train.train(config, workdir)
