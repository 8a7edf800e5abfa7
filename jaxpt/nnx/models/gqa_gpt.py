"""The original's `jaxpt.models.gqa_gpt`."""

from jaxpt.nnx.models import GQA_GPT as GQA_GPT
from jaxpt.nnx.models import GQA_GPTConfig as GQA_GPTConfig
