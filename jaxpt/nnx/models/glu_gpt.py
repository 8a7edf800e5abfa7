"""The original's `jaxpt.models.glu_gpt`."""

from jaxpt.nnx.models import GLU_GPT as GLU_GPT
from jaxpt.nnx.models import GLU_GPTConfig as GLU_GPTConfig
