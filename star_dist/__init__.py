"""star_dist: exact, streaming, distributed model merging with STAR and the usual baselines.

    import star_dist
    star_dist.merge("merge.yaml", "out/")              # in-process, or on Ray when that pays
    star_dist.merge(config_dict, "out/", runtime="ray") # on a local or existing Ray cluster
    print(star_dist.plan("merge.yaml").summary())      # a dry run: headers only
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import MergeConfig, ModelSpec, RunOptions, parse_size
from .errors import (
    ClusterError,
    ConfigError,
    InputError,
    MergeError,
    OutputError,
    PublishError,
    StarDistError,
    VerifyError,
)

if TYPE_CHECKING:  # imported on first use (below): `star-dist --help` need not import torch
    from .planner import MergePlan
    from .run import MergeResult

__all__ = [
    "merge",
    "plan",
    "load_config",
    "MergeConfig",
    "ModelSpec",
    "RunOptions",
    "MergePlan",
    "MergeResult",
    "StarDistError",
    "ConfigError",
    "InputError",
    "OutputError",
    "MergeError",
    "ClusterError",
    "VerifyError",
    "PublishError",
]

ConfigLike = MergeConfig | Mapping[str, Any] | str | Path


def load_config(config: ConfigLike) -> MergeConfig:
    """A MergeConfig from a MergeConfig, a mergekit-style dict, or a YAML file path."""
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, Mapping):
        return MergeConfig.from_dict(config)
    return MergeConfig.from_yaml(config)


def _options(**kwargs: Any) -> RunOptions:
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(RunOptions)})
    if unknown:
        valid = ", ".join(f.name for f in dataclasses.fields(RunOptions))
        raise ConfigError(f"unknown run option(s) {', '.join(unknown)}; valid: {valid}")
    if "max_shard_size" in kwargs and isinstance(kwargs["max_shard_size"], str):
        kwargs["max_shard_size"] = parse_size(kwargs["max_shard_size"])
    return RunOptions(**kwargs)


def merge(config: ConfigLike, out_dir: str | Path, **options: Any) -> MergeResult:
    """Merge the models of `config` into the Hugging Face folder `out_dir`.

    `runtime="auto"` (the default, as on the command line) joins `address=` or RAY_ADDRESS
    when given, starts an embedded Ray cluster when the plan says several workers would
    finish sooner, and otherwise runs in this process; `runtime="local"` always runs here,
    `runtime="ray"` always on Ray. Other options: see `RunOptions` (max_shard_size,
    overwrite, quiet, workers, device, threads_per_worker, verify_resume). Rerunning an
    interrupted merge with the same arguments resumes it.
    """
    from .run import run_merge

    run_options = _options(**options)  # cheap to check, so first
    return run_merge(load_config(config), out_dir, run_options)


def plan(config: ConfigLike, out_dir: str | Path = "merged", **options: Any) -> MergePlan:
    """Validate the inputs from their headers and return the plan, writing nothing."""
    from .planner import build_plan

    return build_plan(load_config(config), out_dir, _options(**options))


def __getattr__(name: str) -> Any:
    """`star_dist.MergePlan` and `star_dist.MergeResult`, imported when first asked for (they
    bring torch), and the submodules as attributes once imported."""
    if name == "MergePlan":
        from .planner import MergePlan

        return MergePlan
    if name == "MergeResult":
        from .run import MergeResult

        return MergeResult
    raise AttributeError(f"module 'star_dist' has no attribute {name!r}")
