"""Small helpers shared by the methods' frozen params dataclasses."""

from __future__ import annotations

import math
from typing import Any

from star_dist.errors import ConfigError


def as_number(method: str, name: str, value: Any) -> float:
    """A config value as a finite float; ConfigError naming the method and parameter otherwise.

    Numbers and numeric strings (from CLI flags) are accepted; booleans are not numbers here.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{method}: {name} must be a number, got the boolean {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{method}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{method}: {name} must be a finite number, got {value!r}")
    return number


def as_flag(method: str, name: str, value: Any) -> bool:
    """A config value as a boolean (YAML true/false); ConfigError otherwise."""
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{method}: {name} must be true or false, got {value!r}")
