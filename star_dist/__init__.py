"""star_dist: exact, streaming, distributed model merging with STAR and the usual baselines.

    import star_dist
    star_dist.merge("merge.yaml", "out/")              # in-process
    star_dist.merge(config_dict, "out/", runtime="ray") # on a local or existing Ray cluster
    print(star_dist.plan("merge.yaml").summary())      # a dry run: headers only
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import MergeConfig, ModelSpec, RunOptions, parse_size
from .errors import (
    ClusterError,
    ConfigError,
    InputError,
    MergeError,
    OutputError,
    StarDistError,
)
from .plan import MergePlan, build_plan
from .run import MergeResult, run_merge

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
    if "max_shard_size" in kwargs:
        kwargs["max_shard_size"] = parse_size(kwargs["max_shard_size"])
    return RunOptions(**kwargs)


def merge(config: ConfigLike, out_dir: str | Path, *, runtime: str = "local", **options: Any) -> MergeResult:
    """Merge the models of `config` into the Hugging Face folder `out_dir`.

    Runs in this process by default; `runtime="ray"` uses Ray (an embedded local cluster,
    or `address=` an existing one). Other options: see `RunOptions` (max_shard_size,
    overwrite, quiet, workers, device, threads_per_worker). Rerunning an interrupted merge
    with the same arguments resumes it.
    """
    return run_merge(load_config(config), out_dir, _options(runtime=runtime, **options))


def plan(config: ConfigLike, out_dir: str | Path = "merged", **options: Any) -> MergePlan:
    """Validate the inputs from their headers and return the plan, writing nothing."""
    return build_plan(load_config(config), out_dir, _options(**options))
