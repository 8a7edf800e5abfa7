"""The models: typed configs, the decoder and bigram, and the registry of named presets.

``get(name)`` -> ``default_config()``, ``init(key, cfg)``, ``apply(params, tokens, cfg)``;
``register(name, cfg)`` adds a preset; ``config_from(config.model)`` converts a run config's
model section.
"""

from jaxpt.errors import ConfigError as ConfigError
from jaxpt.errors import check_range as check_range
from jaxpt.models._config import BigramConfig as BigramConfig
from jaxpt.models._config import ModelConfig as ModelConfig
from jaxpt.models._decoder import Block as Block
from jaxpt.models._decoder import Decoder as Decoder
from jaxpt.models._decoder import block as block
from jaxpt.models._mixers import AUX_KEYS as AUX_KEYS
from jaxpt.models._mixers import MIXERS as MIXERS
from jaxpt.models._mixers import Mixer as Mixer
from jaxpt.models._registry import Model as Model
from jaxpt.models._registry import config_from as config_from
from jaxpt.models._registry import get as get
from jaxpt.models._registry import names as names
from jaxpt.models._registry import register as register
from jaxpt.models._registry import unregister as unregister
