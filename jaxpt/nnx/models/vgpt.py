"""The original's `jaxpt.models.vgpt`."""

from jaxpt.nnx.models import VGPT as VGPT
from jaxpt.nnx.models import VGPTConfig as VGPTConfig
