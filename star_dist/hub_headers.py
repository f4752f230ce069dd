"""Plan hub inputs from their safetensors headers: the driver never downloads a weight file.

A 70B fine-tune is 140 GB, and twelve of them are 1.7 TB; the plan needs only each weight
file's header (tens of kB). So the driver fetches a repo's small files (config, index,
tokenizer) into its Hugging Face cache as usual and, for each root weight file its cache does
not already hold, reads the header with two HTTP range requests. It writes a *header stub*:
a sparse file of the real size holding the real header and a hole where the data would be,
and records the pinned file (repo, commit, name, size, sha256) beside it. The stub folder
mirrors the snapshot (its other files are links into the cache), so the planning code reads
it as it reads any model folder, and the plan's identity is the same whether the driver
planned from stubs or from a full cache (size and sha256: the cache's blob is named by it).

A stub's hole must never be merged as zeros: `TensorReader` asks `real_file` for every file
it maps, and a stub is replaced there by the real file, fetched into this process's cache
(`hf_hub_download`). Ray workers never see stubs: `hub.localize` gives them their node's copy.

Layout: `<star_dist cache>/hub-headers/models--<org>--<name>/<commit>/` (the folder) and
`.../<commit>.json` (what each stub stands for).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from .cache import cache_root
from .errors import InputError

HEADER_LIMIT = 100_000_000  # the safetensors library refuses larger headers


@dataclass(frozen=True)
class RemoteFile:
    """A weight file of a pinned repo, as the hub lists it."""

    filename: str
    size: int
    sha256: str


def stub_root() -> Path:
    """Where header stubs are kept."""
    return cache_root() / "hub-headers"


def planning_folder(repo_id: str, snapshot: Path) -> Path:
    """A folder to plan `repo_id` from: the snapshot itself when it already holds every root
    weight file, else a stub folder (headers read by range requests).

    Args:
        repo_id: `org/name`.
        snapshot: the driver's cache snapshot `.../snapshots/<commit>` with the small files.

    Returns:
        The folder the plan reads.
    """
    commit = snapshot.name
    weights = [f for f in list_weight_files(repo_id, commit) if not (snapshot / f.filename).is_file()]
    if not weights:
        return snapshot
    folder = stub_root() / f"models--{repo_id.replace('/', '--')}" / commit
    folder.mkdir(parents=True, exist_ok=True)
    for path in snapshot.iterdir():  # small files, and any weights already cached: links into the cache
        _link(folder / path.name, path)
    known = _read_records(folder)
    for remote in weights:
        stub = folder / remote.filename
        if known.get(remote.filename) != remote or not _is_whole_stub(stub, remote.size):
            write_stub(stub, remote_header(repo_id, commit, remote.filename), remote.size)
        known[remote.filename] = remote
    _write_records(folder, known)
    return folder


def list_weight_files(repo_id: str, commit: str) -> list[RemoteFile]:
    """The repo's root `*.safetensors` files with size and sha256 (one tree listing), to plan
    from headers without downloading weights.

    Args:
        repo_id: `org/name`.
        commit: the pinned commit.
    Returns:
        One RemoteFile per root safetensors file (name, size in bytes, LFS sha256 or "").
    Raises:
        InputError: the listing failed (network, auth, no such repo or commit).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    try:
        tree = list(HfApi().list_repo_tree(repo_id, revision=commit, recursive=False))
    except Exception as exc:
        raise _hub_error(f"{repo_id}@{commit}", "listing its files", exc) from None
    return [RemoteFile(f.path, f.size, f.lfs.sha256 if f.lfs is not None else "")
            for f in tree if isinstance(f, RepoFile) and f.path.endswith(".safetensors") and "/" not in f.path]


def remote_header(repo_id: str, commit: str, filename: str) -> bytes:
    """The file's header (its 8-byte length prefix included), by two HTTP range requests.

    Args:
        repo_id: `org/name`.
        commit: the pinned commit.
        filename: the weight file, relative to the repo root.

    Returns:
        The first 8 + n bytes of the file, n being the header length it declares.
    """
    where = f"hf://{repo_id}@{commit}/{filename}"
    prefix = _range(repo_id, commit, filename, 0, 8)
    (length,) = struct.unpack("<Q", prefix)
    if length > HEADER_LIMIT:
        raise InputError(f"{where}: header length {length} is larger than safetensors allows; the file is corrupt")
    return prefix + _range(repo_id, commit, filename, 8, length)


def write_stub(path: Path, header: bytes, size: int) -> None:
    """A sparse file of `size` bytes: the header, then a hole (no disk used for the data), so
    planning reads the real header and sizes without the download.

    Args:
        path: where the stub goes; a link or file already there is replaced.
        header: the file's header bytes, its 8-byte length prefix included.
        size: the real file's size in bytes (at least len(header) is written).
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a link from an earlier folder state
    with open(tmp, "wb") as fh:
        fh.write(header)
        fh.truncate(max(size, len(header)))
    os.replace(tmp, path)


def stub_record(path: str | Path) -> RemoteFile | None:
    """What a stub stands for; None for any other file (a real file, or a link into a cache)."""
    path = Path(path)
    if path.is_symlink() or not str(path).startswith(str(stub_root())):
        return None
    return _read_records(path.parent).get(path.name)


def real_file(path: str) -> str:
    """`path` itself, or for a header stub the real file, fetched into this process's cache.

    Args:
        path: a file about to be read for its data.

    Returns:
        A path whose bytes are the file's real bytes.
    """
    if not path.startswith(str(stub_root())):
        return path  # the common case: one string comparison
    record = stub_record(path)
    if record is None:
        return path
    from .hub import HubFile, fetch

    folder = Path(path).parent
    repo_id = folder.parent.name.removeprefix("models--").replace("--", "/", 1)
    return str(fetch(HubFile(path, repo_id, folder.name, record.filename, record.size)))


def _range(repo_id: str, commit: str, filename: str, start: int, length: int) -> bytes:
    """Bytes [start, start + length) of a hub file, refused unless exactly those came back."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    where = f"hf://{repo_id}@{commit}/{filename}"
    headers = {**build_hf_headers(), "Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
    try:
        response = get_session().get(hf_hub_url(repo_id, filename, revision=commit), headers=headers)
        hf_raise_for_status(response)
    except Exception as exc:
        raise _hub_error(where, "reading its header", exc) from None
    data = response.content
    if response.status_code != 206 or len(data) != length:
        raise InputError(
            f"{where}: asked the hub for bytes {start}..{start + length} of its header, got "
            f"{len(data)} (HTTP {response.status_code}); the file is shorter than its header says or the "
            "server ignores range requests"
        )
    return data


def hub_failure(exc: Exception) -> str:
    """`Type: first line` of what huggingface_hub raised (its messages run to many lines)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {(text.splitlines()[0] if text else type(exc).__name__)[:200]}"


def _hub_error(where: str, doing: str, exc: Exception) -> InputError:
    return InputError(f"{where}: {doing} on the Hugging Face hub failed ({hub_failure(exc)}); "
                      "check the network and HF_TOKEN, or download the model first")


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    os.symlink(target, link)


def _is_whole_stub(path: Path, size: int) -> bool:
    return path.is_file() and not path.is_symlink() and path.stat().st_size == size


def _records_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".json")


def _read_records(folder: Path) -> dict[str, RemoteFile]:
    try:
        raw = json.loads(_records_path(folder).read_text())
        return {name: RemoteFile(**value) for name, value in raw.items()}
    except (OSError, ValueError, TypeError):
        return {}


def _write_records(folder: Path, records: dict[str, RemoteFile]) -> None:
    path = _records_path(folder)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({name: asdict(r) for name, r in sorted(records.items())}, indent=1))
    os.replace(tmp, path)
