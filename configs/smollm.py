"""SmolLM-135M: Llama-style GQA, rotary, GLU, RMSNorm.

uv run python launch.py --config=configs/smollm.py --workdir=runs/smollm
uv run python launch.py --config=configs/smollm.py:smoke --workdir=runs/smollm-smoke
uv run python launch.py --config=configs/smollm.py --config.train.steps=100 --workdir=...
"""

from jaxpt.config import preset_config


def get_config(arg: str | None = None):
    """``arg``: empty for the full run, ``smoke`` for a one-minute CPU run."""
    config = preset_config("smollm", arg)
    # Trained from scratch on GPT-2 BPE; with SmolLM's own tokenizer (a directory holding its
    # tokenizer.json) set data.tokenizer to it and model.vocab_size back to 49152.
    config.model.vocab_size = 50304
    return config
