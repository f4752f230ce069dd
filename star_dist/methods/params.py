"""Small helpers shared by the methods' frozen params dataclasses."""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class NoParams:
    """For methods with no parameter of their own (λ and weights belong to the engine)."""
