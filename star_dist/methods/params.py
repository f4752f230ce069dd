"""Small helpers shared by the methods' frozen params dataclasses."""

from __future__ import annotations

import math
from typing import Any

from star_dist.errors import ConfigError


def as_number(method: str, name: str, value: Any) -> float:
    """A config value as a finite float, so a bad value fails at config time, naming its parameter.

    Numbers and numeric strings (from CLI flags) are accepted; booleans are not numbers here.

    Args:
        method: the method's name, for the message.
        name: the parameter's name, for the message.
        value: the value as given (a number or a numeric string).
    Returns:
        The value as a finite float.
    Raises:
        ConfigError: a boolean, a non-numeric value, NaN or ±inf.
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
    """A config value as a boolean (YAML true/false), refusing strings and numbers that only look like one.

    Args:
        method: the method's name, for the message.
        name: the parameter's name, for the message.
        value: the value as given.
    Returns:
        The value, a bool.
    Raises:
        ConfigError: anything but a bool.
    """
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{method}: {name} must be true or false, got {value!r}")


# |Σw| at or below this fraction of Σ|w| is a zero sum up to rounding: 0.1 + 0.2 − 0.3 is
# 5.6e-17 in binary floats, not 0, and dividing by it would scale the merge by ~1e16.
ZERO_SUM_RTOL = 1e-6


def sums_to_zero(weights: list[float]) -> bool:
    """Whether the weights sum to 0 relative to their size, |Σw| ≤ 1e-6·Σ|w| (all-zero: yes).

    Relative, not absolute: weights 1e-9 and 1e-9 sum to a fine divisor, 1 and −1 + 1e-12 do not.
    """
    return abs(math.fsum(weights)) <= ZERO_SUM_RTOL * math.fsum(abs(w) for w in weights)


def zero_sum_error(method: str, weights: list[float], fix: str) -> ConfigError:
    """The one-line refusal for weights whose sum is ~0 and would be divided by (see `sums_to_zero`).

    Args:
        method: the method's name, for the message.
        weights: the per-model weights, in model order.
        fix: what the user can do instead, in words.
    Returns:
        The ConfigError, for the caller to raise.
    """
    terms = " + ".join(repr(w) for w in weights)
    return ConfigError(
        f"{method}: the model weights sum to 0 ({weights}) up to rounding ({terms} = {math.fsum(weights):.3g}, "
        f"~0 next to their size), so dividing by their sum would blow the merge up; {fix}"
    )
