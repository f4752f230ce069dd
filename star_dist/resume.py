"""Which shards an earlier run finished, and whether to trust them without re-reading them.

A shard's manifest is written by the worker after the shard, with the shard's size, mtime
and sha256 (computed while writing). A resume trusts a shard whose manifest has this plan's
fingerprint and whose file still has that size and mtime: re-hashing 140 GB of output over
NFS on every resume would cost more than it protects. `--verify-resume` re-hashes them,
in the runtime's workers, in parallel; a shard computed on another device than this run's
is redone, so CPU and GPU results never mix in one output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .output import manifest_path
from .planner import MergePlan, RunSpec, ShardJob
from .shard import Manifest


def trusted_manifest(run: RunSpec, job: ShardJob) -> Manifest | None:
    """The manifest of a shard an earlier run finished, if the file still matches it (same
    plan fingerprint, size and mtime); None means redo it.

    Args:
        run: this run's spec (output folder, fingerprint).
        job: one shard job of this run's plan.

    Returns:
        The manifest, or None.
    """
    out_dir = Path(run.out_dir)
    try:
        manifest = json.loads(manifest_path(out_dir, job.file_name).read_text())
        st = os.stat(out_dir / job.file_name)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != run.fingerprint:
        return None
    if st.st_size != manifest.get("size") or st.st_mtime_ns != manifest.get("mtime_ns"):
        return None
    return manifest


def finished_shards(plan: MergePlan) -> dict[str, Manifest]:
    """file name -> manifest, for every shard of the plan an earlier run finished."""
    return {job.file_name: m for job in plan.shards if (m := trusted_manifest(plan.run, job)) is not None}


def on_other_device(done: dict[str, Manifest], device: str) -> list[str]:
    """The finished shards computed on another device than `device` (to be redone): a resume
    never mixes CPU and GPU bytes in one output.

    Args:
        done: file name -> manifest of the shards an earlier run finished.
        device: this run's device type, "cpu" or "cuda".
    Returns:
        The file names to redo, sorted; a manifest that records no device counts as this one.
    """
    return sorted(name for name, m in done.items() if m.get("device", device) != device)


def hash_differs(path: str, sha256: str) -> bool:
    """Whether the file's sha256 differs from the manifest's (or the file cannot be read), for --verify-resume.

    Args:
        path: the shard file.
        sha256: the hex digest its manifest records.
    Returns:
        True when the shard must be redone.
    """
    from .safetensors_format import sha256_file

    try:
        return sha256_file(Path(path)) != sha256
    except OSError:
        return True
