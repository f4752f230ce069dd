"""Built architectures, remembered: the architecture check without importing transformers again.

Importing transformers and a model class costs about 2.7 s of CPU per process (measured:
scripts/bench/verify.py), more than the rest of a tiny `star-dist plan`. What the check needs
from it (every parameter's name and shape, tied groups, the model's ignore patterns) depends
only on config.json's bytes and the transformers and accelerate versions, so it is kept as a
small JSON file under that key. A repeated plan or merge of the same base, or a merge's final
check of its own output, then reads it in milliseconds.

Where: `$STAR_DIST_CACHE`, else `$XDG_CACHE_HOME/star_dist`, else `~/.cache/star_dist`, in
`architectures/`. Best effort: a cache that cannot be read or written is ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from .cache import cache_root

FORMAT = 1  # bump when what is stored changes


def cache_dir() -> Path:
    """The folder the architectures are kept in."""
    return cache_root() / "architectures"


def cache_key(config_file: Path) -> str | None:
    """The key of a config.json's architecture under the installed libraries; None when they
    cannot be imported (then nothing is cached, and the check says why it skipped).

    Args:
        config_file: the folder's config.json.

    Returns:
        A sha256 hex digest, or None.
    """
    versions = [_version(name) for name in ("transformers", "accelerate")]
    if None in versions or not all(_importable(name) for name in ("transformers", "accelerate")):
        return None
    try:
        config = config_file.read_bytes()
    except OSError:
        return None
    return hashlib.sha256(json.dumps([FORMAT, versions]).encode() + b"\0" + config).hexdigest()


def load(key: str | None) -> dict[str, Any] | None:
    """The stored architecture for `key`, or None."""
    if key is None:
        return None
    try:
        data = json.loads((cache_dir() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def store(key: str | None, data: dict[str, Any]) -> None:
    """Keep `data` under `key` (tmp + rename, so a reader never sees half a file); best effort,
    a cache that cannot be written is skipped silently.

    Args:
        key: the architecture's key (`cache_key`); None: store nothing.
        data: the architecture, as JSON-serializable data.
    """
    if key is None:
        return
    folder = cache_dir()
    tmp = folder / f"{key}.{os.getpid()}.tmp"
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data))
        os.replace(tmp, folder / f"{key}.json")
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):  # blocked (sys.modules[name] = None) or broken
        return False
