"""Tiny_MoE_2: top-2 of 8 squared-ReLU experts in every layer, QK-norm, zero-init projections.

uv run python launch.py --config=configs/tiny_moe_2.py --workdir=runs/tiny_moe_2
uv run python launch.py --config=configs/tiny_moe_2.py:smoke --workdir=runs/tiny_moe_2-smoke
uv run python launch.py --config=configs/tiny_moe_2.py --config.train.steps=100 --workdir=...
"""

from jaxpt.config import preset_config


def get_config(arg: str | None = None):
    """``arg``: empty for the full run, ``smoke`` for a tiny CPU run (minutes on 2 cores)."""
    config = preset_config("tiny_moe_2", arg)
    config.train.load_balance_loss_coeff = 1e-2  # times aux["load_balance_loss"]
    config.train.z_loss_coeff = 5e-4  # times aux["z_loss"]
    return config
