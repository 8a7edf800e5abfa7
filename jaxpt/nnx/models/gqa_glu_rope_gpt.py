"""The original's `jaxpt.models.gqa_glu_rope_gpt`."""

from jaxpt.nnx.models import GQA_GLU_RoPE_GPT as GQA_GLU_RoPE_GPT
from jaxpt.nnx.models import GQA_GLU_RoPE_GPTConfig as GQA_GLU_RoPE_GPTConfig
