"""GPT-2 124M.

uv run python launch.py --config=configs/gpt.py --workdir=runs/gpt
uv run python launch.py --config=configs/gpt.py:smoke --workdir=runs/gpt-smoke
uv run python launch.py --config=configs/gpt.py --config.train.steps=100 --workdir=...
"""

from jaxpt.config import preset_config


def get_config(arg: str | None = None):
    """``arg``: empty for the full run, ``smoke`` for a tiny CPU run (minutes on 2 cores)."""
    config = preset_config("gpt", arg)
    return config
