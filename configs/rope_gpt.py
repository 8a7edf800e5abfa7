"""RoPE-GPT: GPT-2 124M with rotary positions.

uv run python launch.py --config=configs/rope_gpt.py --workdir=runs/rope_gpt
uv run python launch.py --config=configs/rope_gpt.py:smoke --workdir=runs/rope_gpt-smoke
uv run python launch.py --config=configs/rope_gpt.py --config.train.steps=100 --workdir=...
"""

from jaxpt.config import preset_config


def get_config(arg: str | None = None):
    """``arg``: empty for the full run, ``smoke`` for a tiny CPU run (minutes on 2 cores)."""
    config = preset_config("rope_gpt", arg)
    return config
