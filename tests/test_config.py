"""Config loading: mergekit keys, every problem reported at once, sizes with units."""

from __future__ import annotations

from pathlib import Path

import pytest

from star_dist.config import MergeConfig, parse_size
from star_dist.errors import ConfigError


def test_mergekit_style_yaml(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "ft").mkdir()
    path = tmp_path / "merge.yaml"
    path.write_text(
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: ft\n    parameters: {weight: 0.7}\n"
        "  - model: org/hub-model\nparameters: {density: 0.5, lambda: 0.8}\ndtype: float32\nout_dtype: bfloat16\n"
    )
    config = MergeConfig.from_yaml(path)
    assert config.merge_method == "ties"
    assert config.base_model == str(tmp_path / "base")  # relative to the config file
    assert config.models[0].model == str(tmp_path / "ft") and config.models[0].weight == 0.7
    assert config.models[1].model == "org/hub-model" and config.models[1].weight is None
    assert config.lambda_ == 0.8 and config.method_params() == {"density": 0.5}
    assert config.out_dtype == "bfloat16"
    again = MergeConfig.from_dict(config.to_dict())
    assert again == config


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        MergeConfig.from_dict({"merge_method": "star", "models": [], "dtype": "int8", "colour": 1})
    text = str(info.value)
    for part in ("unknown key 'colour'", "base_model is missing", "no models to merge", "dtype 'int8'"):
        assert part in text


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"eta": 0}, "eta"),
        ({"eta": 100.5}, "eta"),
        ({"lambda": "big"}, "lambda 'big' is not a number"),
    ],
)
def test_star_parameter_ranges(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MergeConfig.from_dict({"merge_method": "star", "base_model": "b", "models": ["m"], "parameters": params})


@pytest.mark.parametrize("density", [0, -0.1, 1.5])
def test_ties_density_range(density: float) -> None:
    with pytest.raises(ConfigError, match="density"):
        MergeConfig.from_dict(
            {"merge_method": "ties", "base_model": "b", "models": ["m"], "parameters": {"density": density}}
        )


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        MergeConfig.from_dict({"merge_method": "slerp", "base_model": "b", "models": ["m"]})
    for name in ("star", "task_arithmetic", "ties", "average"):
        assert name in str(info.value)


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 1000**3
    assert parse_size("500MB") == 500 * 1000**2
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("1.5kb") == 1500
    assert parse_size(1234) == 1234
    with pytest.raises(ConfigError, match="e.g. 5GB"):
        parse_size("5 parsecs")
    with pytest.raises(ConfigError, match="^--max-memory-per-worker '0GB' must be positive$"):
        parse_size("0GB", "--max-memory-per-worker")


def test_api_sizes_take_text_as_the_command_line_does(tiny_fp32: Path) -> None:
    """plan()/merge() read "22GiB" for the memory budget as they do "60kB" for shards, and a
    bad one names the keyword."""
    import star_dist

    plan = star_dist.plan(tiny_fp32 / "merge.yaml", max_shard_size="60kB", max_memory_per_worker="22GiB")
    assert plan.estimate is not None and plan.estimate.budget_bytes == 22 * 1024**3
    with pytest.raises(ConfigError, match="^max_memory_per_worker 'lots': use a number with a unit"):
        star_dist.plan(tiny_fp32 / "merge.yaml", max_memory_per_worker="lots")


def test_mergekit_ties_yaml_runs_unchanged(tmp_path: Path) -> None:
    """The keys of a typical mergekit TIES config, with mergekit's meaning for each."""
    path = tmp_path / "ties.yaml"
    path.write_text(
        "models:\n  - model: a\n    parameters: {density: 0.5, weight: 0.5}\n  - model: b\n"
        "    parameters: {density: 0.3}\nmerge_method: ties\nbase_model: base\n"
        "parameters: {weight: 0.8, normalize: true, int8_mask: true}\ndtype: bfloat16\n"
        "tokenizer_source: base\n"
    )
    config = MergeConfig.from_yaml(path)
    assert config.model_weights() == [0.5, 0.8]  # a top-level weight is every model's default
    assert config.model_method_params() == [{"density": 0.5}, {"density": 0.3}]
    assert config.method_params() == {"normalize": True, "int8_mask": True}
    assert config.output_dtype == "bfloat16" and config.compute_dtype == "float32"  # never below float32
    assert MergeConfig.from_dict(config.to_dict()) == config


def test_dtype_is_the_default_output_dtype() -> None:
    def cfg(**extra: object) -> MergeConfig:
        return MergeConfig.from_dict({"base_model": "b", "models": ["m"], **extra})

    assert cfg().output_dtype is None and cfg().compute_dtype == "float32"
    assert cfg(dtype="float32").output_dtype == "float32"
    assert cfg(dtype="float64").compute_dtype == "float64"
    assert cfg(dtype="bfloat16", out_dtype="float16").output_dtype == "float16"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"parameters": {"lambda": float("nan")}}, "parameters.lambda nan is not a finite number"),
        ({"parameters": {"lambda": True}}, "parameters.lambda True is a boolean"),
        ({"parameters": {"weight": "x"}}, "parameters.weight 'x' is not a number"),
        ({"models": [{"model": "m", "parameters": {"weight": float("inf")}}]}, "is not a finite number"),
        ({"models": [{"model": "m", "parameters": 0.5}]}, "models[0].parameters: expected a mapping"),
        ({"models": [{"model": "m", "parameters": {"eta": 30}}]}, "'eta' cannot be set per model for star"),
        ({"tokenizer_source": "union"}, "tokenizer_source 'union'"),
        ({"merge_method": "ties", "parameters": {"normalize": "yes"}}, "normalize must be true or false"),
    ],
)
def test_bad_engine_and_per_model_values(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        MergeConfig.from_dict({"base_model": "b", "models": ["m"], **data})
    assert message in str(info.value)
