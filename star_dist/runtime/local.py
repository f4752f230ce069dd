"""The in-process runtime: shards one after another in the driver. No Ray, no overhead."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ..config import RunOptions
from ..errors import MergeError, StarDistError
from ..files import shard_os_error
from ..merge_tensor import resolve_device
from ..planner import RunSpec, ShardJob
from ..progress import Progress
from ..resume import hash_differs
from ..shard import Manifest, merge_shard
from .api import Runtime

VERIFY_THREADS = 4  # hashing is I/O-bound and hashlib releases the GIL: a few threads overlap reads


def local_runtime(options: RunOptions) -> Runtime:
    """This process as the one worker; a device it does not have fails here, before any shard."""
    device = resolve_device(options.device).type
    return Runtime("local", lambda: device, run_shards, verify_shards)


def run_shards(run: RunSpec, jobs: list[ShardJob], progress: Progress) -> list[Manifest]:
    """Merge each shard in turn in this process, reporting progress tensor by tensor.

    Args:
        run: what every shard shares (method, weights, numerics, output folder).
        jobs: the shards to merge, in the order given.
        progress: the progress bar, advanced once per tensor.
    Returns:
        The shards' manifests, in the order of `jobs`.
    Raises:
        MergeError: a shard whose merge failed (named in the message).
        OutputError: an OSError on the output folder.
        InputError: an OSError reading an input.
    """
    return [_merge_one(run, job, progress) for job in jobs]


def verify_shards(shards: list[tuple[str, str]]) -> list[str]:
    """Re-hash finished shards on a few threads; returns the paths whose sha256 differs."""
    with ThreadPoolExecutor(max_workers=VERIFY_THREADS) as pool:
        differs = list(pool.map(lambda item: hash_differs(*item), shards))
    return [path for (path, _), bad in zip(shards, differs, strict=True) if bad]


def _merge_one(run: RunSpec, job: ShardJob, progress: Progress) -> Manifest:
    """One shard; a failure comes back as one line naming the shard, as from a Ray worker."""
    try:
        return merge_shard(run, job, on_tensor=lambda _name, nbytes: progress.advance(1, nbytes))
    except StarDistError:
        raise  # already names the file and tensor
    except OSError as exc:
        raise shard_os_error(exc, job.file_name, run.out_dir) from None
    except Exception as exc:  # a bug or a library failure: still name where it happened
        raise MergeError(f"shard {job.file_name}: merge failed: {type(exc).__name__}: {exc}") from exc
