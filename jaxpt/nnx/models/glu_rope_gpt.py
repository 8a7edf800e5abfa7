"""The original's `jaxpt.models.glu_rope_gpt`."""

from jaxpt.nnx.models import GLU_RoPE_GPT as GLU_RoPE_GPT
from jaxpt.nnx.models import GLU_RoPE_GPTConfig as GLU_RoPE_GPTConfig
