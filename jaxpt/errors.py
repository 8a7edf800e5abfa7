"""The errors jaxpt raises for bad input. Each carries one sentence naming what is wrong (the
field or file, the value, the rule) and what to do; ``launch.py`` prints it without a traceback.
"""


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the field, the value and the rule."""


class DataError(ValueError):
    """Data that cannot be used as given (empty, corrupt, or inconsistent with the model)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset, shard or tokenizer file that does not exist."""
