"""Hub inputs: pinned once in the driver, fetched per node by the workers that read them.

The driver resolves `org/name[@revision]` to one commit (so every node reads the same
bytes, even if the branch moves mid-run) and plans from its own cache. A shard job names
each hub file it reads by (repo, commit, filename); a worker fetches exactly those files
into its own node's cache (`hf_hub_download`, which honours HF_HOME, HF_HUB_CACHE,
HF_HUB_OFFLINE and a pre-filled cache) and reads them there, so a node without the
driver's file system downloads only the shards its jobs touch.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .hub_headers import hub_failure, planning_folder, stub_record, stub_root


# huggingface_hub costs 0.2 s to import, paid by every merge process: only hub inputs load it.
def snapshot_download(*args: Any, **kwargs: Any) -> str:
    """`huggingface_hub.snapshot_download`, imported on first use."""
    from huggingface_hub import snapshot_download as download

    return download(*args, **kwargs)


def hf_hub_download(*args: Any, **kwargs: Any) -> str:
    """`huggingface_hub.hf_hub_download`, imported on first use."""
    from huggingface_hub import hf_hub_download as download

    return download(*args, **kwargs)


# What a model folder needs besides its weights: configs and tokenizer files (never pickles).
SMALL_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
HUB_PATTERNS = ["*.safetensors", *SMALL_PATTERNS]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


@dataclass(frozen=True)
class HubFile:
    """One file of a pinned hub repo, as a shard job names it."""

    driver_path: str  # where the driver read it (its own cache): the key TensorEntry.file holds
    repo_id: str
    commit: str
    filename: str  # relative to the repo root
    size: int

    @property
    def uri(self) -> str:
        """The file's identity, whatever cache holds it."""
        return f"hf://{self.repo_id}@{self.commit}/{self.filename}"


def is_hub_id(source: str) -> bool:
    """`org/name` or `org/name@revision` that is not an existing local path."""
    return not os.path.exists(os.path.expanduser(source)) and bool(_HUB_ID.fullmatch(source))


def download_snapshot(source: str, weights: bool = True) -> Path:
    """The driver's local folder for hub id `source`, pinned to one commit (its name).

    Args:
        source: `org/name` or `org/name@revision` (a branch, tag or commit).
        weights: False to plan only: weight files the cache lacks are header stubs
            (hub_headers.py), fetched for real only if their data is read. Offline, the
            cache must hold them either way.

    Returns:
        The cache's snapshot folder `.../snapshots/<commit>`, or its stub folder (same name).
    """
    from huggingface_hub.constants import is_offline_mode

    repo_id, _, revision = source.partition("@")
    headers_only = not weights and not is_offline_mode()
    try:
        folder = snapshot_download(repo_id, revision=revision or None,
                                   allow_patterns=SMALL_PATTERNS if headers_only else HUB_PATTERNS)
    except Exception as exc:  # network, auth, offline-and-not-cached: all end the same way
        raise InputError(
            f"{source}: not a local folder, and fetching it from the Hugging Face hub failed "
            f"({hub_failure(exc)}); download it first or check HF_TOKEN"
        ) from None
    if not headers_only:
        return Path(folder)
    try:
        return planning_folder(repo_id, Path(folder))
    except OSError as exc:
        raise InputError(
            f"{exc.filename or stub_root()}: cannot write the header stubs of {source} ({exc.strerror}); "
            "set STAR_DIST_CACHE to a writable folder"
        ) from None


def hub_files(repo_id: str, snapshot: Path, files: set[str]) -> list[HubFile]:
    """The HubFile of each of `files` (driver paths inside `snapshot`, a pinned snapshot), so a
    worker on another node can fetch the same bytes into its own cache.

    Args:
        repo_id: the hub repo, `org/name` (no revision).
        snapshot: the driver's snapshot folder, named by its commit.
        files: driver paths of the files the plan reads, inside `snapshot`.
    Returns:
        One HubFile per file (repo, commit, path in the repo, size in bytes), sorted by driver path.
    """
    out = []
    for path in sorted(files):
        filename = Path(os.path.relpath(path, snapshot)).as_posix()
        out.append(HubFile(path, repo_id, snapshot.name, filename, os.stat(path).st_size))
    return out


def content_id(hub_file: HubFile) -> list[Any]:
    """What identifies a hub file's bytes in the plan fingerprint: its size and the blob the
    snapshot links to (named by its hash: the sha256 of a weight file), or for a header
    stub the sha256 the hub listed; not the cache path or the download's mtime."""
    path = hub_file.driver_path
    record = stub_record(path)
    if record is not None:
        return [hub_file.size, record.sha256]
    blob = Path(os.path.realpath(path)).name if os.path.islink(path) else os.stat(path).st_mtime_ns
    return [hub_file.size, blob]


def fetch(hub_file: HubFile, cache_dir: str | Path | None = None) -> Path:
    """This node's copy of `hub_file`, downloaded into its own cache if not there yet.

    Args:
        hub_file: the pinned file a shard reads.
        cache_dir: the cache to use; None: this node's (HF_HUB_CACHE / HF_HOME).

    Returns:
        The local path, checked to have the size the driver planned with.
    """
    try:
        local = Path(hf_hub_download(hub_file.repo_id, hub_file.filename, revision=hub_file.commit,
                                     cache_dir=cache_dir))
    except Exception as exc:
        raise InputError(
            f"{hub_file.uri}: this node could not fetch it into its Hugging Face cache "
            f"({hub_failure(exc)}); pre-fill the node's cache (HF_HOME) or let it "
            "reach the hub"
        ) from None
    if local.stat().st_size != hub_file.size:
        raise InputError(
            f"{hub_file.uri}: this node's copy {local} has {local.stat().st_size} bytes, the driver planned "
            f"with {hub_file.size}; clear the node's cached copy"
        )
    return local


def localize(job: Any, cache_dir: str | Path | None = None) -> tuple[Any, dict[str, str]]:
    """The shard job with each hub file it reads replaced by this node's copy.

    Args:
        job: a ShardJob (its `hub_files` name the pinned files it reads).
        cache_dir: the node's hub cache; None: the default (HF_HUB_CACHE / HF_HOME).

    Returns:
        The job reading local paths, and {hub uri: local path} of what was fetched.
    """
    if not job.hub_files:
        return job, {}
    local = {f.driver_path: str(fetch(f, cache_dir)) for f in job.hub_files}
    tensors = tuple(dataclasses.replace(t, base=_moved(t.base, local), models=tuple(_moved(s, local) for s in t.models))
                    for t in job.tensors)
    fetched = {f.uri: local[f.driver_path] for f in job.hub_files}
    return dataclasses.replace(job, tensors=tensors), fetched


def _moved(source: Any, local: dict[str, str]) -> Any:
    """A TensorEntry, LoraSource (two entries) or None, pointing at this node's files."""
    if source is None:
        return None
    if hasattr(source, "a"):  # LoraSource
        return dataclasses.replace(source, a=_moved(source.a, local), b=_moved(source.b, local))
    return dataclasses.replace(source, file=local.get(source.file, source.file))
