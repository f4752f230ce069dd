"""The explicit method table and building methods from config dicts."""

from __future__ import annotations

import pytest

from star_dist.errors import ConfigError
from star_dist.methods import (
    METHODS,
    Average,
    IsoC,
    IsoCts,
    JointMethod,
    Star,
    StreamingMethod,
    TaskArithmetic,
    Ties,
    Tsv,
    get_method,
    method_param_names,
)


def test_table() -> None:
    assert {
        "star": Star,
        "task_arithmetic": TaskArithmetic,
        "ties": Ties,
        "average": Average,
        "tsv": Tsv,
        "iso_c": IsoC,
        "iso_cts": IsoCts,
    } == METHODS
    for name, cls in METHODS.items():
        assert cls.name == name
        assert "arxiv.org" in cls.reference or "aclanthology.org" in cls.reference
    assert issubclass(Ties, JointMethod) and issubclass(Star, StreamingMethod)


def test_param_names() -> None:
    assert method_param_names("star") == ["eta"]
    assert method_param_names("ties") == ["density", "normalize", "int8_mask"]
    assert method_param_names("task_arithmetic") == ["normalize"]
    assert method_param_names("average") == ["normalize"]


def test_get_method_builds_params_and_ignores_engine_keys() -> None:
    star = get_method("star", {"eta": 75, "lambda": 0.8, "weight": 2.0})
    assert isinstance(star, Star) and star.params_dict() == {"eta": 75.0}
    ties_defaults = {"normalize": True, "int8_mask": False}
    assert get_method("ties", {"density": 0.5}).params_dict() == {"density": 0.5, **ties_defaults}
    assert get_method("ties", {}).params_dict() == {"density": 0.2, **ties_defaults}
    assert isinstance(get_method("average", {"lambda": 1.0}), Average)
    assert get_method("task_arithmetic", {}).params_dict() == {"normalize": False}


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as err:
        get_method("dare", {})
    assert str(err.value) == ("unknown merge method 'dare'; valid methods: average, iso_c, iso_cts, star, "
                              "task_arithmetic, ties, tsv")
    with pytest.raises(ConfigError, match="valid methods"):
        method_param_names("slerp")


def test_unknown_parameter_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        get_method("star", {"eta": 40, "rank": 8})
    assert str(err.value) == (
        "star: unknown parameter(s) 'rank'; valid parameters: eta (plus the engine's lambda and weight)"
    )
    with pytest.raises(ConfigError, match=r"valid parameters: normalize \(plus"):
        get_method("average", {"density": 0.5})


def test_bad_values_raise_from_the_params() -> None:
    with pytest.raises(ConfigError, match=r"star: eta must be in \(0, 100\]"):
        get_method("star", {"eta": 0})
    with pytest.raises(ConfigError, match=r"ties: density must be in \(0, 1\]"):
        get_method("ties", {"density": 2})
