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
    for name in ("max_shard_size", "max_memory_per_worker"):  # "5GB" as on the command line
        if isinstance(kwargs.get(name), str):
            kwargs[name] = parse_size(kwargs[name], name)
    return RunOptions(**kwargs)


def merge(config: ConfigLike, out_dir: str | Path, **options: Any) -> MergeResult:
    """Merge the models of `config` into the Hugging Face folder `out_dir`.

    `runtime="auto"` (the default, as on the command line) joins `address=` or RAY_ADDRESS
    when given, starts an embedded Ray cluster when the plan says several workers would
    finish sooner, and otherwise runs in this process; `runtime="local"` always runs here,
    `runtime="ray"` always on Ray. The keywords are `RunOptions`' fields. Rerunning an
    interrupted merge with the same arguments resumes it.

    Args:
        config: a MergeConfig, a mergekit-style dict, or the path of a YAML file.
        out_dir: the output folder: missing, empty, an earlier run of this merge (resumed), or any with overwrite.
        max_shard_size: largest output shard, in bytes (int) or as text ("5GB", "500MB", "2GiB"); default 5 GB.
        overwrite: replace the contents of a non-empty folder (kept aside until the merge completes); default False.
        quiet: no progress bar and no notices on stderr; default False.
        runtime: "auto" (default), "ray" or "local", as above.
        address: the Ray cluster to join: "auto", "host:port" or "ray://host:port"; None (default): none given.
        workers: how many workers; None (default): one per GPU, else one per `threads_per_worker` CPU cores.
        device: "auto" (default: a GPU where the worker has one), "cpu" or "cuda".
        threads_per_worker: torch threads per CPU worker (default 1); the output bytes depend on it.
        connect_timeout_s: seconds to wait for the Ray cluster to answer (default 30).
        start_timeout_s: seconds to wait for a first Ray worker to start before failing (default 300).
        verify_resume: re-hash the shards an earlier run finished before keeping them; default False.
        verify: check the output against its config.json's architecture when done; default True.
        max_memory_per_worker: what one worker may use on its device, in bytes (int) or as text ("22GiB");
            None (default): what the device has.
    Returns:
        The MergeResult: the files written, shards done and resumed, the report, where it ran and why.
    Raises:
        ConfigError: an invalid config, an unknown or invalid keyword, or a tensor that fits no device's memory.
        InputError: an input that is missing, corrupt, or does not fit the base.
        OutputError: an output folder that is not empty (without overwrite), overlaps an input, or cannot be written.
        MergeError: a tensor that cannot be merged (NaN or Inf) or a worker that failed past its retries.
        ClusterError: a Ray cluster that cannot be reached, or where no worker starts in time.
        VerifyError: an output that does not match its config.json's architecture (the files are kept).
    """
    from .run import run_merge

    run_options = _options(**options)  # cheap to check, so first
    return run_merge(load_config(config), out_dir, run_options)


def plan(config: ConfigLike, out_dir: str | Path = "merged", **options: Any) -> MergePlan:
    """Validate the inputs from their headers and return the plan, writing nothing.

    Args:
        config: a MergeConfig, a mergekit-style dict, or the path of a YAML file.
        out_dir: the output folder the plan names (default "merged"); not read or created.
        **options: the keywords `merge` takes (`RunOptions`' fields), all checked; max_shard_size,
            device, max_memory_per_worker, workers and threads_per_worker shape the plan.
    Returns:
        The MergePlan: shards, bytes, memory and time estimates; `.summary()` is what `star-dist plan` prints.
    Raises:
        ConfigError: an invalid config, an unknown or invalid keyword, or a tensor that fits no device's memory.
        InputError: an input that is missing, corrupt, or does not fit the base.
    """
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
