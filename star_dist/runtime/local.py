"""The in-process runtime: shards one after another in the driver. No Ray, no overhead."""

from __future__ import annotations

from ..errors import MergeError, StarDistError
from ..files import shard_os_error
from ..plan import ShardJob
from ..progress import Progress
from ..shard import Manifest, merge_shard


def run_shards(jobs: list[ShardJob], progress: Progress) -> list[Manifest]:
    """Merge each shard in turn, reporting progress tensor by tensor."""
    return [_merge_one(job, progress) for job in jobs]


def _merge_one(job: ShardJob, progress: Progress) -> Manifest:
    """One shard; a failure comes back as one line naming the shard, as from a Ray worker."""
    try:
        return merge_shard(job, on_tensor=lambda _name, nbytes: progress.advance(1, nbytes))
    except StarDistError:
        raise  # already names the file and tensor
    except OSError as exc:
        raise shard_os_error(exc, job.file_name, job.out_dir) from None
    except Exception as exc:  # a bug or a library failure: still name where it happened
        raise MergeError(f"shard {job.file_name}: merge failed: {type(exc).__name__}: {exc}") from exc
