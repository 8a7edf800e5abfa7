"""The model registry: ``get(name)`` -> ``default_config()``, ``init``, ``apply``."""

from jaxpt.errors import ConfigError as ConfigError
from jaxpt.models._config import decoder_config as decoder_config
from jaxpt.models._decoder import AUX_KEYS as AUX_KEYS
from jaxpt.models._decoder import MIXERS as MIXERS
from jaxpt.models._decoder import Mixer as Mixer
from jaxpt.models._decoder import is_cacheable as is_cacheable
from jaxpt.models._decoder import is_causal as is_causal
from jaxpt.models._registry import Model as Model
from jaxpt.models._registry import decoder_preset as decoder_preset
from jaxpt.models._registry import get as get
from jaxpt.models._registry import names as names
