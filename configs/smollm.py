"""SmolLM-135M: Llama-style GQA, rotary, GLU, RMSNorm.

uv run python launch.py --config=configs/smollm.py --workdir=runs/smollm
uv run python launch.py --config=configs/smollm.py:smoke --workdir=runs/smollm-smoke
uv run python launch.py --config=configs/smollm.py --config.train.steps=100 --workdir=...
"""

from jaxpt.config import preset_config


def get_config(arg: str | None = None):
    """``arg``: empty for the full run, ``smoke`` for a tiny CPU run (minutes on 2 cores)."""
    config = preset_config("smollm", arg)
    # The preset is SmolLM-135M as published (vocab 49152, its own tokenizer). This run trains
    # it from scratch on GPT-2 BPE, a run-level choice, so the table holds GPT-2's 50257 ids
    # padded to a multiple of 64. With SmolLM's tokenizer (a directory holding its
    # tokenizer.json) set data.tokenizer to it and drop the vocab_size line.
    config.data.tokenizer = "gpt2"
    config.model.vocab_size = 50304
    return config
