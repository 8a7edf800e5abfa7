"""One-sentence checks of model config fields: each failure is a ConfigError naming the field,
its value and the rule."""

from __future__ import annotations

from collections.abc import Collection

from jaxpt.errors import ConfigError


def require(ok: bool, message: str) -> None:
    """Raises ConfigError(message) unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def require_choice(field: str, value, choices: Collection[str]) -> None:
    """``model.<field>`` must be one of ``choices``."""
    require(
        value in choices,
        f"model.{field}={value!r} is not one of {sorted(choices)}: pick one of those.",
    )


def require_positive_int(field: str, value) -> None:
    """``model.<field>`` must be an integer above zero."""
    require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"model.{field}={value!r} must be a positive integer.",
    )
