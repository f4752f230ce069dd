"""The in-process runtime: shards one after another in the driver. No Ray, no overhead."""

from __future__ import annotations

from ..plan import ShardJob
from ..progress import Progress
from ..shard import Manifest, merge_shard


def run_shards(jobs: list[ShardJob], progress: Progress) -> list[Manifest]:
    """Merge each shard in turn, reporting progress tensor by tensor."""
    return [merge_shard(job, on_tensor=lambda _name, nbytes: progress.advance(1, nbytes)) for job in jobs]
