"""Bigram: next-token logits from a (V, V) table.

uv run python launch.py --config=configs/bigram.py --workdir=runs/bigram
uv run python launch.py --config=configs/bigram.py:smoke --workdir=runs/bigram-smoke
uv run python launch.py --config=configs/bigram.py --config.train.steps=100 --workdir=...
"""

from jaxpt.config import preset_config


def get_config(arg: str | None = None):
    """``arg``: empty for the full run, ``smoke`` for a one-minute CPU run."""
    config = preset_config("bigram", arg)
    config.data.tokenizer = "char"
    return config
