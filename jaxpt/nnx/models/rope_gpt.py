"""The original's `jaxpt.models.rope_gpt`."""

from jaxpt.nnx.models import RoPE_GPT as RoPE_GPT
from jaxpt.nnx.models import RoPE_GPTConfig as RoPE_GPTConfig
