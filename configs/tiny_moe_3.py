"""Tiny_MoE_3: Soft MoE over 8 GLU experts alternating with GLU layers (no auxiliary losses).

uv run python launch.py --config=configs/tiny_moe_3.py --workdir=runs/tiny_moe_3
uv run python launch.py --config=configs/tiny_moe_3.py:smoke --workdir=runs/tiny_moe_3-smoke
uv run python launch.py --config=configs/tiny_moe_3.py --config.train.steps=100 --workdir=...
"""

from jaxpt.config import preset_config


def get_config(arg: str | None = None):
    """``arg``: empty for the full run, ``smoke`` for a tiny CPU run (minutes on 2 cores)."""
    return preset_config("tiny_moe_3", arg)
