"""The original's `jaxpt.models.gpt`."""

from jaxpt.nnx.models import GPT as GPT
from jaxpt.nnx.models import GPTConfig as GPTConfig
from jaxpt.nnx.models._hf import from_huggingface_pretrained as from_huggingface_pretrained
