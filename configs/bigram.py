"""Bigram: next-token logits from a (V, V) table.

uv run python -m jaxpt.data.prepare --dataset=corpus/ --tokenizer=char --out=data/chars
uv run python launch.py --config=configs/bigram.py --config.data.dataset=data/chars \\
    --workdir=runs/bigram
uv run python launch.py --config=configs/bigram.py:smoke --workdir=runs/bigram-smoke
uv run python launch.py --config=configs/bigram.py --config.train.steps=100 ...

The full run needs a corpus prepared with the char tokenizer (its vocabulary is the corpus's
characters): ``data.dataset`` names it. ``:smoke`` trains on the embedded corpus.
"""

from jaxpt.config import preset_config


def get_config(arg: str | None = None):
    """``arg``: empty for the full run, ``smoke`` for a tiny CPU run (minutes on 2 cores)."""
    config = preset_config("bigram", arg)
    config.data.tokenizer = "char"
    return config
