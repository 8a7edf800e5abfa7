"""The original's `jaxpt.models.tiny_moe_3`."""

from jaxpt.nnx.models import Tiny_MoE_3 as Tiny_MoE_3
from jaxpt.nnx.models import Tiny_MoE_3_Config as Tiny_MoE_3_Config
