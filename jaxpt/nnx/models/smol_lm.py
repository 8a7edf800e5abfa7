"""The original's `jaxpt.models.smol_lm`."""

from jaxpt.nnx.models import SmolLM as SmolLM
from jaxpt.nnx.models import SmolLM_Config as SmolLM_Config
from jaxpt.nnx.models._hf import convert_to_hf as convert_to_hf
from jaxpt.nnx.models._hf import from_hf_pretrained as from_hf_pretrained
from jaxpt.nnx.models._hf import load_hf_pretrained as load_hf_pretrained
