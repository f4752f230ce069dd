"""The explicit table of merge methods and how to build one from config values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from star_dist.errors import ConfigError
from star_dist.methods.base import MergeMethod
from star_dist.methods.iso_c import IsoC
from star_dist.methods.iso_cts import IsoCts
from star_dist.methods.linear import Average, TaskArithmetic
from star_dist.methods.star import Star
from star_dist.methods.ties import Ties
from star_dist.methods.tsv import Tsv

METHODS: dict[str, type[MergeMethod]] = {
    "star": Star,
    "task_arithmetic": TaskArithmetic,
    "ties": Ties,
    "average": Average,
    "tsv": Tsv,
    "iso_c": IsoC,
    "iso_cts": IsoCts,
}

# Keys the engine owns (the global scale and per-model weights); methods never see them.
ENGINE_KEYS = frozenset({"lambda", "weight"})


def _method_class(name: str) -> type[MergeMethod]:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(METHODS))
        raise ConfigError(f"unknown merge method {name!r}; valid methods: {valid}") from None


def method_param_names(name: str) -> list[str]:
    """The parameter names a method accepts (besides the engine's `lambda` and `weight`)."""
    params_type = _method_class(name).Params  # type: ignore[attr-defined]
    return [f.name for f in fields(params_type)]


def get_method(
    name: str,
    params: Mapping[str, Any] | None = None,
    model_params: Sequence[Mapping[str, Any]] = (),
) -> MergeMethod:
    """Build a method from its name, its parameters, and each model's own (engine keys ignored).

    ConfigError lists the valid method names for an unknown method, the valid parameter names
    for an unknown parameter, and the per-model ones for a parameter a model may not set;
    value checks come from the params dataclass.

    Args:
        name: the method's name (star, task_arithmetic, ties, average, tsv, iso_c, iso_cts).
        params: the top-level method parameters (η, density...); None: the method's defaults.
        model_params: each model's own parameters, in model order (TIES: density); empty: none.
    Returns:
        The method, its params validated (with per-model params when some model sets its own).
    Raises:
        ConfigError: an unknown method or parameter, a parameter set per model that may not be, a bad value.
    """
    cls = _method_class(name)
    own = {k: v for k, v in (params or {}).items() if k not in ENGINE_KEYS}
    valid = method_param_names(name)
    unknown = sorted(k for k in own if k not in valid)
    if unknown:
        allowed = ", ".join(valid) if valid else "none"
        raise ConfigError(
            f"{name}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
            f"valid parameters: {allowed} (plus the engine's lambda and weight)"
        )
    for i, per_model in enumerate(model_params):
        bad = sorted(k for k in per_model if k not in cls.per_model_params and k not in ENGINE_KEYS)
        if bad:
            allowed = ", ".join(("weight", *cls.per_model_params))
            raise ConfigError(
                f"models[{i}].parameters: {', '.join(map(repr, bad))} cannot be set per model for {name}; "
                f"per-model parameters: {allowed}"
            )
    params_obj = cls.Params(**own)  # type: ignore[attr-defined]
    if not any(model_params) or not cls.per_model_params:
        return cls(params_obj)  # type: ignore[call-arg]
    per_model_objs = tuple(
        cls.Params(**{**own, **{k: v for k, v in m.items() if k not in ENGINE_KEYS}})  # type: ignore[attr-defined]
        for m in model_params
    )
    return cls(params_obj, per_model_objs)  # type: ignore[call-arg]
