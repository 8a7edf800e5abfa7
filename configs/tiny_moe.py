"""Tiny_MoE: top-2 of 8 GLU experts alternating with GLU layers (rotary, GQA 12 / 4).

uv run python launch.py --config=configs/tiny_moe.py --workdir=runs/tiny_moe
uv run python launch.py --config=configs/tiny_moe.py:smoke --workdir=runs/tiny_moe-smoke
uv run python launch.py --config=configs/tiny_moe.py --config.model.load_factor=1.25 --workdir=...
"""

from jaxpt.config import preset_config


def get_config(arg: str | None = None):
    """``arg``: empty for the full run, ``smoke`` for a tiny CPU run (minutes on 2 cores)."""
    config = preset_config("tiny_moe", arg)
    config.train.load_balance_loss_coeff = 1e-2  # times aux["load_balance_loss"]
    config.train.z_loss_coeff = 1e-3  # times aux["z_loss"]
    return config
