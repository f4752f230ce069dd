"""What `run_merge` needs from a runtime, whichever it is (in-process or Ray)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..planner import RunSpec, ShardJob
from ..progress import Progress
from ..shard import Manifest

ShardRunner = Callable[[RunSpec, list[ShardJob], Progress], list[Manifest]]


@dataclass(frozen=True)
class Runtime:
    """A runtime, open for the length of a run."""

    name: str  # "local" | "ray"
    device: Callable[[], str]  # where its workers compute ("cpu" | "cuda"); Ray: once a worker has started
    run: ShardRunner  # merge the shards of one run spec, returning their manifests
    verify: Callable[[list[tuple[str, str]]], list[str]]  # (shard path, sha256) -> the paths that differ
