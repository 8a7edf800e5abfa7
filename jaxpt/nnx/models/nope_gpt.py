"""The original's `jaxpt.models.nope_gpt`."""

from jaxpt.nnx.models import NoPE_GPT as NoPE_GPT
from jaxpt.nnx.models import NoPE_GPTConfig as NoPE_GPTConfig
