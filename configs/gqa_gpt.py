"""GQA-GPT: grouped-query attention, 9 query / 3 KV heads, 576 wide.

uv run python launch.py --config=configs/gqa_gpt.py --workdir=runs/gqa_gpt
uv run python launch.py --config=configs/gqa_gpt.py:smoke --workdir=runs/gqa_gpt-smoke
uv run python launch.py --config=configs/gqa_gpt.py --config.train.steps=100 --workdir=...
"""

from jaxpt.config import preset_config


def get_config(arg: str | None = None):
    """``arg``: empty for the full run, ``smoke`` for a tiny CPU run (minutes on 2 cores)."""
    config = preset_config("gqa_gpt", arg)
    return config
