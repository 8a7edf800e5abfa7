"""Every model class and config of the original's ``jaxpt.models`` (its ``__all__`` with the
names that exist [D1])."""

from jaxpt.nnx.models._classes import GLU_GPT as GLU_GPT
from jaxpt.nnx.models._classes import GPT as GPT
from jaxpt.nnx.models._classes import GQA_GPT as GQA_GPT
from jaxpt.nnx.models._classes import VGPT as VGPT
from jaxpt.nnx.models._classes import Bigram as Bigram
from jaxpt.nnx.models._classes import Charformer as Charformer
from jaxpt.nnx.models._classes import GLU_RoPE_GPT as GLU_RoPE_GPT
from jaxpt.nnx.models._classes import GQA_GLU_RoPE_GPT as GQA_GLU_RoPE_GPT
from jaxpt.nnx.models._classes import NoPE_GPT as NoPE_GPT
from jaxpt.nnx.models._classes import RoPE_GPT as RoPE_GPT
from jaxpt.nnx.models._classes import SmolLM as SmolLM
from jaxpt.nnx.models._classes import Tiny_MoE as Tiny_MoE
from jaxpt.nnx.models._classes import Tiny_MoE_2 as Tiny_MoE_2
from jaxpt.nnx.models._classes import Tiny_MoE_3 as Tiny_MoE_3
from jaxpt.nnx.models._config import Config as Config
from jaxpt.nnx.models._config import GLU_GPTConfig as GLU_GPTConfig
from jaxpt.nnx.models._config import GLU_RoPE_GPTConfig as GLU_RoPE_GPTConfig
from jaxpt.nnx.models._config import GPTConfig as GPTConfig
from jaxpt.nnx.models._config import GQA_GLU_RoPE_GPTConfig as GQA_GLU_RoPE_GPTConfig
from jaxpt.nnx.models._config import GQA_GPTConfig as GQA_GPTConfig
from jaxpt.nnx.models._config import NoPE_GPTConfig as NoPE_GPTConfig
from jaxpt.nnx.models._config import RoPE_GPTConfig as RoPE_GPTConfig
from jaxpt.nnx.models._config import SmolLM_Config as SmolLM_Config
from jaxpt.nnx.models._config import Tiny_MoE_2_Config as Tiny_MoE_2_Config
from jaxpt.nnx.models._config import Tiny_MoE_3_Config as Tiny_MoE_3_Config
from jaxpt.nnx.models._config import Tiny_MoE_Config as Tiny_MoE_Config
from jaxpt.nnx.models._config import VGPTConfig as VGPTConfig
from jaxpt.nnx.models._hf import from_huggingface_pretrained as from_huggingface_pretrained
