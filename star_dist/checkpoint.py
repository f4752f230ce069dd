"""One input model: where its folder is, and every tensor's name, shape, dtype and file.

Indexing reads headers only. Tensor data is read later, lazily, by the worker that needs it
(`safetensors_format.TensorReader`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .safetensors_format import TensorEntry, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


@dataclass(frozen=True)
class Checkpoint:
    """A full model checkpoint (a Hugging Face folder of safetensors files)."""

    source: str  # what the user wrote: a path or a hub id
    folder: Path
    tensors: dict[str, TensorEntry]

    @classmethod
    def open(cls, source: str) -> Checkpoint:
        folder = resolve_model_folder(source)
        return cls(source, folder, index_folder(folder))


def index_folder(folder: Path) -> dict[str, TensorEntry]:
    """All tensors of a model folder, from `model.safetensors` or a sharded index."""
    index_path = folder / INDEX_FILE
    if index_path.exists():
        return _index_sharded(index_path)
    single = folder / SINGLE_FILE
    if single.exists():
        tensors, _ = read_header(single)
        return tensors
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:  # a lone file with another name (some exports do this)
        tensors, _ = read_header(folder / found[0])
        return tensors
    hint = ""
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        hint = " (pickle checkpoints are not read: re-save with save_pretrained(safe_serialization=True))"
    if (folder / ADAPTER_CONFIG).exists():
        hint = " (this is a PEFT adapter folder, which is not a base model)"
    raise InputError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found{hint}")


def _index_sharded(index_path: Path) -> dict[str, TensorEntry]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{index_path}: corrupt index ({exc.__class__.__name__}: {exc})") from None
    tensors: dict[str, TensorEntry] = {}
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        path = index_path.parent / file
        if not path.exists():
            raise InputError(f"{path}: missing, but {index_path.name} maps tensor {names[0]!r} to it")
        entries, _ = read_header(path)
        for name in names:
            if name not in entries:
                raise InputError(f"{path}: tensor {name!r} is listed in {index_path.name} but not in the file")
            tensors[name] = entries[name]
    return tensors


def is_adapter_folder(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).exists() and not (folder / "config.json").exists()


def resolve_model_folder(source: str) -> Path:
    """A local folder for `source`: the path itself, or a hub id fetched into the HF cache.

    Hub ids (`org/name`, optionally `org/name@revision`) go through `huggingface_hub`'s
    `snapshot_download`, which honours HF_HUB_CACHE and HF_HUB_OFFLINE, so a pre-filled
    cache works without network access.
    """
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{source}: is a file; give the model folder that holds it")
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise InputError(f"{source}: no such folder (and not a hub id of the form org/name)")
    return _download_from_hub(source)


def _download_from_hub(source: str) -> Path:
    repo_id, _, revision = source.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError(
            f"{source}: not a local folder; to load hub ids install huggingface_hub "
            "(pip install 'star-dist[hub]')"
        ) from None
    try:
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # network, auth, offline-and-not-cached: all end the same way
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{source}: not a local folder, and fetching it from the Hugging Face hub failed "
            f"({type(exc).__name__}: {first_line[:200]}); download it first or check HF_TOKEN"
        ) from None
    return Path(folder)
