"""Does this node see the storage the plan assumes? Checked by each worker before any shard.

On a real cluster a worker node has its own mounts: an input folder or the output folder
the driver sees may be missing there, or be another disk at the same path. A worker that
merged anyway would fail late (a missing file mid-shard) or, worse, write shards where the
driver never looks. So each worker checks, once, at start: every input file it may read is
there with the size the driver planned with, and it can create and remove a file in the
output folder's state directory. Hub files are not checked here: each node fetches its own.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, OutputError

FIX = "mount the shared file system at the same path on every node, or give hub ids for the inputs"


@dataclass(frozen=True)
class StorageCheck:
    """What a worker must see: input files (absolute path, size) and the output folder."""

    files: tuple[tuple[str, int], ...]
    out_dir: str
    state_dir: str = ".star_dist"  # created by the driver's claim, before any worker starts


def node_name() -> str:
    """This node, as a message names it: host name, and Ray's node IP and id when in Ray."""
    name = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
            return f"{name} ({ray.util.get_node_ip_address()}, Ray node {node_id[:8]})"
    except Exception:  # outside a Ray worker: the host name says enough
        pass
    return name


def check_node_storage(check: StorageCheck, node: str) -> None:
    """Raise InputError or OutputError, one line naming `node`, the path and the fix, unless
    this node sees every input file with the planned size and can write into the output.

    Args:
        check: the plan's input files and output folder.
        node: this node's name, for the message.
    """
    for path, size in check.files:
        try:
            seen = os.stat(path).st_size
        except OSError as exc:
            raise InputError(f"node {node}: cannot see input {path} ({exc.strerror}); {FIX}") from None
        if seen != size:
            raise InputError(
                f"node {node}: input {path} has {seen} bytes here but {size} where the merge was planned "
                f"(another disk at the same path?); {FIX}"
            )
    _probe_output(check, node)


def _probe_output(check: StorageCheck, node: str) -> None:
    """Create and remove a file in the output's state folder, which the driver made."""
    probe = Path(check.out_dir) / check.state_dir / f"probe-{socket.gethostname()}-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"node {node}: cannot write into the output folder {check.out_dir} ({exc.strerror}); {FIX} "
            "(the driver writes the index there)"
        ) from None
