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
from .files import require_regular_file
from .safetensors_format import TensorEntry, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Checkpoint:
    """A full model checkpoint (a Hugging Face folder of safetensors files)."""

    source: str  # what the user wrote: a path or a hub id
    folder: Path
    tensors: dict[str, TensorEntry]
    notes: tuple[str, ...] = ()  # how an ambiguous folder was read, for the plan's warnings

    @classmethod
    def open(cls, source: str) -> Checkpoint:
        return cls.from_folder(source, resolve_model_folder(source))

    @classmethod
    def from_folder(cls, source: str, folder: Path) -> Checkpoint:
        return cls(source, folder, index_folder(folder), layout_notes(folder))


def index_folder(folder: Path) -> dict[str, TensorEntry]:
    """All tensors of a model folder, read as `transformers` reads it: `model.safetensors`
    when the folder has one (even beside an index, which transformers then ignores), else
    the sharded index, else a lone safetensors file."""
    single = folder / SINGLE_FILE
    if single.exists():
        tensors, _ = read_header(single)
        return tensors
    index_path = folder / INDEX_FILE
    if index_path.exists():
        return _index_sharded(index_path)
    if is_adapter_folder(folder):  # its adapter_model.safetensors must not pass for the model
        hint = " (this is a PEFT adapter folder, which is not a base model)"
        raise InputError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found{hint}")
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:  # a lone file with another name (some exports do this)
        tensors, _ = read_header(folder / found[0])
        return tensors
    hint = ""
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        hint = " (pickle checkpoints are not read: re-save with save_pretrained(safe_serialization=True))"
    raise InputError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found{hint}")


def layout_notes(folder: Path) -> tuple[str, ...]:
    """Say so when a folder holds both weight layouts: the index is ignored, as by transformers."""
    if (folder / SINGLE_FILE).exists() and (folder / INDEX_FILE).exists():
        return (
            f"{folder}: holds both {SINGLE_FILE} and {INDEX_FILE}; reading {SINGLE_FILE}, as transformers "
            "does (the index and its shards are ignored); remove the stale one to silence this",
        )
    return ()


def _index_sharded(index_path: Path) -> dict[str, TensorEntry]:
    """Every tensor the index maps, from its shard's header. Each shard must hold exactly the
    tensors the index gives it: a tensor the index leaves out, or one stored in two shards,
    would be loaded by transformers (which reads whole shards) but not merged by the index."""
    weight_map = _read_weight_map(index_path)
    tensors: dict[str, TensorEntry] = {}
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(_shard_file(index_path, name, file), []).append(name)
    for file, names in sorted(by_file.items()):
        path = index_path.parent / file
        if not os.path.exists(path):  # False for a name too long, where Path.exists raises
            raise InputError(f"{path}: missing, but {index_path.name} maps tensor {names[0]!r} to it")
        entries, _ = read_header(path)
        for name in names:
            if name not in entries:
                raise InputError(f"{path}: tensor {name!r} is listed in {index_path.name} but not in the file")
            tensors[name] = entries[name]
        _check_unlisted(index_path, path, entries, weight_map)
    return tensors


def _check_unlisted(index_path: Path, path: Path, entries: dict[str, TensorEntry], weight_map: dict) -> None:
    """Refuse a shard tensor the index does not map to this shard (ambiguous, never dropped)."""
    for name in sorted(entries):
        mapped = weight_map.get(name)
        if mapped is None:
            raise InputError(
                f"{path}: tensor {name!r} is in the file but missing from {index_path.name}; the merge would "
                "drop it while transformers loads it: add it to the index's weight_map, or re-save the model"
            )
        if os.path.normpath(str(mapped)) != os.path.normpath(os.path.relpath(path, index_path.parent)):
            raise InputError(
                f"{path}: tensor {name!r} is stored in two shards (here and in {mapped}, where "
                f"{index_path.name} maps it); which copy is the model's is ambiguous: re-save the model"
            )


def _read_weight_map(index_path: Path) -> dict[str, object]:
    """The index's `weight_map`: a JSON object of tensor name -> shard file."""
    require_regular_file(index_path, "index")  # a FIFO would block the read
    try:
        index = json.loads(index_path.read_text())
    except OSError as exc:
        raise InputError(f"{index_path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(f"{index_path}: corrupt index (not JSON: {first_line[:200]})") from None
    except RecursionError:
        raise InputError(f"{index_path}: corrupt index (not JSON: nested too deeply)") from None
    if not isinstance(index, dict) or "weight_map" not in index:
        raise InputError(f'{index_path}: corrupt index (not a JSON object with a "weight_map" key)')
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise InputError(
            f"{index_path}: corrupt index (weight_map is a JSON {_json_kind(weight_map)}, "
            "not an object mapping tensor names to shard files)"
        )
    if not weight_map:
        raise InputError(f"{index_path}: corrupt index (weight_map lists no tensor)")
    return weight_map


def _shard_file(index_path: Path, name: str, file: object) -> str:
    """A weight_map value, checked: a file name inside the model folder (as transformers
    reads it). Checked on the text, not the resolved path, so a hub cache's symlinks to
    its blobs folder stay valid."""
    # A NUL or a line break is in no shard's name (and would break the one-line message).
    if not isinstance(file, str) or not file or "\0" in file or "".join(file.splitlines()) != file:
        raise InputError(
            f"{index_path}: corrupt index (tensor {name!r} maps to {json.dumps(file)[:80]}, not a shard file name)"
        )
    normal = os.path.normpath(file)
    if os.path.isabs(file) or file.startswith(("/", "\\")) or normal == ".." or normal.startswith(".." + os.sep):
        raise InputError(
            f"{index_path}: tensor {name!r} maps to {file!r}, which is outside the model folder; "
            "shard files must be named relative to the folder that holds the index, inside it"
        )
    if normal == ".":
        raise InputError(f"{index_path}: corrupt index (tensor {name!r} maps to {file!r}, not a shard file name)")
    return normal


def _json_kind(value: object) -> str:
    kinds = ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"), (list, "array"))
    return "null" if value is None else next((k for t, k in kinds if isinstance(value, t)), type(value).__name__)


def is_adapter_folder(folder: Path) -> bool:
    """A PEFT adapter folder: adapter_config.json and no model weights. Some hub repos ship
    the base's config.json beside the adapter, so that file does not make it a model."""
    has_weights = (folder / SINGLE_FILE).exists() or (folder / INDEX_FILE).exists()
    return (folder / ADAPTER_CONFIG).exists() and not has_weights


def resolve_model_folder(source: str, weights: bool = True) -> Path:
    """A local folder for `source`: the path itself, or a hub id fetched into the HF cache.

    Hub ids (`org/name`, optionally `org/name@revision`) are pinned to one commit and fetched
    into the driver's cache (star_dist.hub), honouring HF_HUB_CACHE and HF_HUB_OFFLINE, so a
    pre-filled cache works without network access. `weights=False` (planning) fetches only
    the headers of weight files not cached yet (star_dist.hub_headers).

    Args:
        source: a local folder (`~` expanded), or a hub id `org/name` or `org/name@revision`.
        weights: False to plan only: uncached weight files of a hub id become header stubs.
    Returns:
        The local folder: the path itself, or the hub snapshot's (or stub) folder named by its commit.
    Raises:
        InputError: a file or missing path that is no hub id, or a hub fetch that failed.
    """
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{source}: is a file; give the model folder that holds it")
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        where = "" if path.is_absolute() else f" (looked in {Path.cwd()})"
        raise InputError(f"{source}: no such folder{where}, and not a hub id of the form org/name")
    return _download_from_hub(source, weights)


def _download_from_hub(source: str, weights: bool) -> Path:
    from .hub import download_snapshot  # pinned to one commit, in this (the driver's) cache

    return download_snapshot(source, weights)
