"""Charformer: character-level GPT, 30 layers x 960.

uv run python launch.py --config=configs/charformer.py --workdir=runs/charformer
uv run python launch.py --config=configs/charformer.py:smoke --workdir=runs/charformer-smoke
uv run python launch.py --config=configs/charformer.py --config.train.steps=100 --workdir=...
"""

from jaxpt.config import preset_config


def get_config(arg: str | None = None):
    """``arg``: empty for the full run, ``smoke`` for a one-minute CPU run."""
    config = preset_config("charformer", arg)
    config.data.tokenizer = "char"
    return config
