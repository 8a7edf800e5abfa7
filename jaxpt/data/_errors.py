"""Errors for bad data input: each carries one sentence naming what is wrong and what to do."""


class DataError(ValueError):
    """Data that cannot be used as given (empty, corrupt, or inconsistent with the model)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset, shard or tokenizer file that does not exist."""
