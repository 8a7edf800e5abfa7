"""GLU-GPT: GPT-2 124M with a SiLU-gated GLU.

uv run python launch.py --config=configs/glu_gpt.py --workdir=runs/glu_gpt
uv run python launch.py --config=configs/glu_gpt.py:smoke --workdir=runs/glu_gpt-smoke
uv run python launch.py --config=configs/glu_gpt.py --config.train.steps=100 --workdir=...
"""

from jaxpt.config import preset_config


def get_config(arg: str | None = None):
    """``arg``: empty for the full run, ``smoke`` for a tiny CPU run (minutes on 2 cores)."""
    config = preset_config("glu_gpt", arg)
    return config
