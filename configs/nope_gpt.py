"""NoPE-GPT: GPT-2 124M without position embeddings, ReLU MLP.

uv run python launch.py --config=configs/nope_gpt.py --workdir=runs/nope_gpt
uv run python launch.py --config=configs/nope_gpt.py:smoke --workdir=runs/nope_gpt-smoke
uv run python launch.py --config=configs/nope_gpt.py --config.train.steps=100 --workdir=...
"""

from jaxpt.config import preset_config


def get_config(arg: str | None = None):
    """``arg``: empty for the full run, ``smoke`` for a tiny CPU run (minutes on 2 cores)."""
    config = preset_config("nope_gpt", arg)
    return config
