"""GQA-GLU-RoPE-GPT: GQA (12 / 4 heads), rotary positions, SiLU GLU.

uv run python launch.py --config=configs/gqa_glu_rope.py --workdir=runs/gqa_glu_rope
uv run python launch.py --config=configs/gqa_glu_rope.py:smoke --workdir=runs/gqa_glu_rope-smoke
uv run python launch.py --config=configs/gqa_glu_rope.py --config.train.steps=100 --workdir=...
"""

from jaxpt.config import preset_config


def get_config(arg: str | None = None):
    """``arg``: empty for the full run, ``smoke`` for a tiny CPU run (minutes on 2 cores)."""
    config = preset_config("gqa_glu_rope_gpt", arg)
    return config
