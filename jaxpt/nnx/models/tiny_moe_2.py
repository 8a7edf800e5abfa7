"""The original's `jaxpt.models.tiny_moe_2`."""

from jaxpt.nnx.models import Tiny_MoE_2 as Tiny_MoE_2
from jaxpt.nnx.models import Tiny_MoE_2_Config as Tiny_MoE_2_Config
