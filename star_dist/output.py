"""The output folder: claimed safely, written atomically, finished with the index last.

Layout of a finished merge:
    model.safetensors | model-0000i-of-0000N.safetensors + model.safetensors.index.json
    config.json, tokenizer and generation files (copied from the base)
    README.md (model card), merge_report.json
    .star_dist/plan.json, .star_dist/shards/<shard>.json (manifests; what makes resume work)
    .star_dist_replaced/ (only while an --overwrite run is unfinished: the previous contents)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import OutputError
from .files import converts_os_errors, fsync_dir, input_os_error
from .lock import LOCK_FILE

STATE_DIR = ".star_dist"
# Where --overwrite keeps the folder's previous contents until the new merge is complete.
REPLACED_DIR = ".star_dist_replaced"
INDEX_FILE = "model.safetensors.index.json"
# Non-weight files a merged model needs, copied from the base as they are.
COPIED_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "*.tiktoken",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


def package_version() -> str:
    try:
        return metadata.version("star-dist")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


@converts_os_errors("write")
def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` so that it either has its old content or all of the new one; a failed
    write (a full disk) leaves no `.tmp` behind.

    Args:
        path: the file to write; its parent folders are created.
        data: the whole new content.
    Raises:
        OutputError: an OSError while writing (no space, read-only, no permission...).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def copy_atomic(src: Path, dest: Path) -> None:
    """Copy a file so that `dest` is never a partial copy (tmp + fsync + rename).

    Args:
        src: the file to copy (read whole into memory: meant for config and tokenizer files).
        dest: where the copy goes; replaced if it exists.
    Raises:
        InputError: `src` cannot be read.
        OutputError: `dest` cannot be written.
    """
    try:
        data = src.read_bytes()  # config and tokenizer files: megabytes at most
    except OSError as exc:
        raise input_os_error(exc, "read", src) from None
    write_atomic(dest, data)


def manifest_path(out_dir: Path, shard_file: str) -> Path:
    """Where a shard's manifest lives: its presence marks the shard finished, which is what resume reads.

    Args:
        out_dir: the output folder.
        shard_file: the shard's file name (e.g. "model-00001-of-00004.safetensors").
    Returns:
        out_dir/.star_dist/shards/<shard_file>.json.
    """
    return out_dir / STATE_DIR / "shards" / f"{shard_file}.json"


def check_output_apart(out_dir: Path, input_folders: list[Path]) -> None:
    """The output folder may not be, hold, or lie inside an input folder: `--overwrite`
    empties it, and shards written among an input's files would corrupt that input.

    Args:
        out_dir: the output folder (compared after resolving symlinks).
        input_folders: the base's folder and every model's or adapter's folder.
    Raises:
        OutputError: the output folder is, holds, or lies inside one of them.
    """
    out = out_dir.resolve()
    for folder in input_folders:
        inp = folder.resolve()
        if out == inp or out.is_relative_to(inp) or inp.is_relative_to(out):
            relation = "is" if out == inp else "lies inside" if out.is_relative_to(inp) else "holds"
            raise OutputError(
                f"{out_dir}: the output folder {relation} the input folder {folder}; "
                "choose an output folder apart from every input"
            )


@converts_os_errors("claim the output folder")
def claim_output_dir(out_dir: Path, identity: dict[str, Any], overwrite: bool) -> bool:
    """Make `out_dir` ours. Returns True when resuming an earlier run of the same plan.

    An empty or missing folder is used; a folder holding an unfinished or finished run of
    the same plan (same `identity["fingerprint"]`) is resumed; anything else is refused
    unless `overwrite`, saying what changed when it is an earlier run's folder. Overwriting
    moves the old contents aside into REPLACED_DIR (renames, no copy) instead of deleting
    them: they come back if this run fails on bad data (`release_output_dir`) and are
    deleted only once the new merge is complete (`drop_replaced`). Called only after the plan
    validated and under the folder's lock, so bad input never touches the folder.

    Args:
        out_dir: the output folder (created if missing).
        identity: the plan's identity (`plan_identity`), written to .star_dist/plan.json.
        overwrite: whether a folder holding anything else may have its contents set aside.
    Returns:
        True when resuming an earlier run of the same plan, False for a fresh start.
    Raises:
        OutputError: a non-empty folder of something else without `overwrite`, or an OSError writing it.
    """
    entries = sorted(p.name for p in out_dir.iterdir() if p.name != LOCK_FILE) if out_dir.exists() else []
    state = out_dir / STATE_DIR / "plan.json"
    earlier = _read_state(state)
    resuming = bool(entries) and earlier.get("fingerprint") == identity["fingerprint"]
    if entries and not resuming and not _only_our_leftovers(out_dir, entries, earlier):
        if not overwrite:
            raise OutputError(_not_empty_message(out_dir, entries, earlier, identity))
        _set_aside(out_dir, [name for name in entries if name != REPLACED_DIR])
    for stale in out_dir.glob("*.tmp") if out_dir.exists() else []:
        stale.unlink()  # a killed run's partial shard: never under a final name
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(state, json.dumps(identity, sort_keys=True).encode())
    return resuming


def _read_state(state: Path) -> dict[str, Any]:
    try:
        earlier = json.loads(state.read_text())
    except (OSError, ValueError):
        return {}
    return earlier if isinstance(earlier, dict) else {}


def _only_our_leftovers(out_dir: Path, entries: list[str], earlier: dict[str, Any]) -> bool:
    """A folder holding nothing but a state folder with no plan and no finished shard: what a
    run that failed while claiming the folder leaves. It counts as empty."""
    shards = out_dir / STATE_DIR / "shards"
    return entries == [STATE_DIR] and not earlier and not (shards.is_dir() and any(shards.iterdir()))


def _not_empty_message(out_dir: Path, entries: list[str], earlier: dict[str, Any], identity: dict[str, Any]) -> str:
    fix = "pass --overwrite to replace its contents, or choose another folder"
    if earlier.get("fingerprint"):
        changes = identity_changes(earlier, identity)
        return (
            f"{out_dir}: holds an earlier star-dist run of a different merge, so it cannot resume "
            f"({'; '.join(changes) or 'the plan changed'}); {fix}"
        )
    shown = [e for e in entries if e != REPLACED_DIR] or entries
    return f"{out_dir}: output folder is not empty ({len(entries)} entries, e.g. {shown[0]!r}); {fix}"


def identity_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> list[str]:
    """What differs between two plan identities, in words, for refusing a resume into a changed merge.

    Args:
        old: the identity recorded in the folder's .star_dist/plan.json.
        new: this run's identity (`plan_identity`).
        limit: the most input files named one by one; the rest are counted.
    Returns:
        One phrase per change (version, config, settings, shard layout, LoRA scales, input files); empty if none.
    """
    changes = []
    if old.get("star_dist") != new.get("star_dist"):
        changes.append(f"star_dist version {old.get('star_dist')} -> {new.get('star_dist')}")
    if old.get("format") != new.get("format"):
        return [*changes, "it was written by another star_dist version"]
    for key, words in (("config", "the merge config changed"), ("settings", "--threads-per-worker changed"),
                       ("shards", "the shard layout changed (--max-shard-size or the tensors)"),
                       ("lora", "a LoRA adapter's scale changed")):
        if old.get(key) != new.get(key):
            changes.append(words)
    old_files, new_files = old.get("files") or {}, new.get("files") or {}
    moved = [f"input {f} changed since that run (size, mtime or ctime)"
             for f in sorted(set(old_files) & set(new_files)) if old_files[f] != new_files[f]]
    moved += [f"input {f} is new" for f in sorted(set(new_files) - set(old_files))]
    moved += [f"input {f} is no longer used" for f in sorted(set(old_files) - set(new_files))]
    if len(moved) > limit:
        moved = [*moved[:limit], f"and {len(moved) - limit} more input changes"]
    return changes + moved


def _set_aside(out_dir: Path, names: list[str]) -> None:
    """Move `names` into REPLACED_DIR. If it exists already, an earlier --overwrite run was
    interrupted: it holds the folder's original contents, and `names` are that run's partial
    output, which is deleted instead."""
    aside = out_dir / REPLACED_DIR
    if aside.exists():
        for name in names:
            _remove(out_dir / name)
        return
    aside.mkdir()
    for name in names:
        os.replace(out_dir / name, aside / name)
    fsync_dir(out_dir)


def _remove(target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink()


def release_output_dir(out_dir: Path, remove_folder: bool) -> None:
    """Undo a fresh run's writes: empty the folder this run claimed, put back what an
    --overwrite set aside, and remove the folder if this run created it. Best effort: it
    runs while another error is on its way to the user (which must not be masked), and on a
    folder that may have just turned read-only or full.

    Args:
        out_dir: the output folder this run claimed.
        remove_folder: whether this run created the folder, so the whole folder goes.
    """
    if remove_folder:
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    with contextlib.suppress(OSError):
        for target in out_dir.iterdir():
            if target.name not in (REPLACED_DIR, LOCK_FILE):
                _remove(target)
        aside = out_dir / REPLACED_DIR
        if aside.is_dir():
            for entry in aside.iterdir():
                os.replace(entry, out_dir / entry.name)
            aside.rmdir()
            fsync_dir(out_dir)


def drop_replaced(out_dir: Path) -> None:
    """After a complete merge: delete what --overwrite set aside."""
    shutil.rmtree(out_dir / REPLACED_DIR, ignore_errors=True)


def write_index(out_dir: Path, manifests: list[dict[str, Any]], total_size: int) -> None:
    """The sharded index, written last: its presence means every shard is complete.

    Args:
        out_dir: the output folder.
        manifests: every shard's manifest ("file" and its "tensors"), in file order.
        total_size: the bytes of every tensor's data, all shards together (headers not counted).
    Raises:
        OutputError: the index cannot be written.
    """
    weight_map = {name: m["file"] for m in manifests for name in m["tensors"]}
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_atomic(out_dir / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())


def copy_base_files(base_folder: Path, out_dir: Path, out_dtype: str | None) -> list[str]:
    """Copy config, tokenizer and generation files; record a changed dtype in config.json.

    Args:
        base_folder: the base model's folder.
        out_dir: the output folder.
        out_dtype: the output's safetensors dtype code ("F32", "F16", "BF16", "F64"); None: the base's, unchanged.
    Returns:
        The names of the files copied, in `COPIED_PATTERNS` order.
    Raises:
        InputError: a base file cannot be read.
        OutputError: a file cannot be written.
    """
    copied = []
    for pattern in COPIED_PATTERNS:
        for src in sorted(base_folder.glob(pattern)):
            if src.is_file():
                copy_atomic(src, out_dir / src.name)
                copied.append(src.name)
    config_path = out_dir / "config.json"
    if out_dtype and config_path.exists():
        config = json.loads(config_path.read_text())
        dtype_key = "dtype" if "dtype" in config else "torch_dtype"
        config[dtype_key] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}[out_dtype]
        write_atomic(config_path, (json.dumps(config, indent=2) + "\n").encode())
    return copied
