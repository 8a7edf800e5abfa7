"""The original's `jaxpt.models.tiny_moe`."""

from jaxpt.nnx.models import Tiny_MoE as Tiny_MoE
from jaxpt.nnx.models import Tiny_MoE_Config as Tiny_MoE_Config
