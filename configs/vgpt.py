"""VGPT: GPT-2 124M shape at vocab 50257 with plain N(0, 0.02) init.

uv run python launch.py --config=configs/vgpt.py --workdir=runs/vgpt
uv run python launch.py --config=configs/vgpt.py:smoke --workdir=runs/vgpt-smoke
uv run python launch.py --config=configs/vgpt.py --config.train.steps=100 --workdir=...
"""

from jaxpt.config import preset_config


def get_config(arg: str | None = None):
    """``arg``: empty for the full run, ``smoke`` for a tiny CPU run (minutes on 2 cores)."""
    config = preset_config("vgpt", arg)
    return config
