"""run_merge: config → plan → workers → finalize. The whole recipe, on one screen."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DTYPE_NAMES, MergeConfig, RunOptions
from .errors import ConfigError, DataError, InputError, StarDistError
from .files import converts_os_errors
from .lock import OutputLock
from .lora import merged_adapter_config
from .output import (
    STATE_DIR,
    check_output_apart,
    claim_output_dir,
    copy_base_files,
    drop_replaced,
    manifest_path,
    release_output_dir,
    write_atomic,
    write_index,
)
from .plan import MergePlan, ShardJob, build_plan
from .progress import Progress
from .report import merge_report, model_card, write_report
from .shard import Manifest, completed_manifest

ShardRunner = Callable[[list[ShardJob], Progress], list[Manifest]]


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge wrote, and how much of it an earlier run had already done."""

    out_dir: Path
    files: list[str]
    shards_total: int
    shards_resumed: int
    report: dict[str, Any]
    warnings: tuple[str, ...] = ()


def run_merge(config: MergeConfig, out_dir: str | Path, options: RunOptions) -> MergeResult:
    """Plan (validating every input), lock and claim the output folder, merge, finalize.

    Args:
        config: the validated merge config.
        out_dir: the output folder (created if missing; resumed if it holds this plan's run).
        options: how to run it (runtime, workers, device, threads, --overwrite).

    Returns:
        What was written, and how many shards an earlier run had already done.
    """
    plan = build_plan(config, out_dir, options)  # headers only; raises before any write
    check_output_apart(plan.out_dir, plan.input_folders)
    with OutputLock(plan.out_dir) as lock:  # one run per output folder, held by the driver
        resuming = _claim(plan, options, fresh_folder=lock.created_folder)
        done = {job.file_name: m for job in plan.shards if (m := completed_manifest(job)) is not None}
        todo = sorted((j for j in plan.shards if j.file_name not in done), key=lambda j: (-j.cost, j.index))
        try:
            manifests = list(done.values()) + _run_shards(plan, options, todo, done)
        except StarDistError as exc:
            # Bad data met mid-merge (NaN, overflow), or a failure before any shard was done (no
            # cluster, a full disk): leave the folder as this run found it. A crash after some
            # shards keeps them for the resume, as an interruption does.
            bad_input = isinstance(exc, (DataError, InputError, ConfigError))
            if not resuming and (bad_input or not _shards_written(plan, done)):
                release_output_dir(plan.out_dir, remove_folder=lock.created_folder)
            raise
        report = finalize(plan, manifests)
        drop_replaced(plan.out_dir)  # the new merge is complete: the overwritten contents can go
    files = sorted(p.name for p in plan.out_dir.iterdir() if p.is_file() and not p.name.startswith(STATE_DIR))
    return MergeResult(plan.out_dir, files, len(plan.shards), len(done), report, tuple(plan.warnings))


def _claim(plan: MergePlan, options: RunOptions, fresh_folder: bool) -> bool:
    """Claim the locked folder (True: resuming); a folder this run created goes again if the
    claim fails (a read-only or full disk), so a failed start leaves nothing behind."""
    try:
        return claim_output_dir(plan.out_dir, plan.identity, options.overwrite)
    except StarDistError:
        if fresh_folder:
            release_output_dir(plan.out_dir, remove_folder=True)
        raise


def _run_shards(
    plan: MergePlan, options: RunOptions, todo: list[ShardJob], done: dict[str, Manifest]
) -> list[Manifest]:
    """Merge the shards still to do on the chosen runtime, with a progress bar."""
    with open_runtime(options, todo) as run_shards:  # connects before any progress is drawn
        progress = Progress(sum(j.bytes_out for j in todo), sum(len(j.tensors) for j in todo), options.quiet)
        for warning in plan.warnings:
            progress.message(f"star-dist: warning: {warning}")
        if done:
            progress.message(f"resuming: {len(done)} of {len(plan.shards)} shards already complete")
        try:
            return run_shards(todo, progress)
        finally:
            progress.close()


def _shards_written(plan: MergePlan, done: dict[str, Manifest]) -> bool:
    """Whether this run finished any shard an earlier run had not. A manifest is written only
    after its shard, so its presence is enough: no need to hash shards on the failure path."""
    return any(job.file_name not in done and manifest_path(plan.out_dir, job.file_name).exists()
               for job in plan.shards)


@contextlib.contextmanager
def open_runtime(options: RunOptions, todo: list[ShardJob]) -> Iterator[ShardRunner]:
    """The runner for the chosen runtime, with its cluster (if any) up for the duration.
    Jobs arrive most expensive first, for balance; nothing to do starts no cluster."""
    if options.runtime == "local" or not todo:
        from .runtime.local import run_shards

        yield run_shards
        return
    from .runtime import ray as ray_runtime

    with ray_runtime.ray_session(options) as embedded:
        yield ray_runtime.shard_runner(options, len(todo), embedded)


@converts_os_errors("finish the output")
def finalize(plan: MergePlan, manifests: list[Manifest]) -> dict[str, Any]:
    """Copied files, model card and report first; the index last, only after every shard."""
    out = plan.out_dir
    report = merge_report(plan, manifests)
    if plan.config.output_format == "adapter":
        ranks = {name.removesuffix(".weight"): entry["adapter_rank"] for name, entry in report["tensors"].items()}
        config = merged_adapter_config(plan.inputs[0].config, ranks, plan.config.base_model)
        write_atomic(out / "adapter_config.json", (json.dumps(config, indent=2) + "\n").encode())
    else:
        out_dtype = DTYPE_NAMES[plan.config.output_dtype] if plan.config.output_dtype else None
        copy_base_files(plan.base.folder, out, out_dtype)
    write_report(out, report)
    write_atomic(out / "README.md", model_card(plan, report).encode())
    if len(plan.shards) > 1:
        total_size = sum(t.out_bytes for job in plan.shards for t in job.tensors)
        write_index(out, sorted(manifests, key=lambda m: m["file"]), total_size)
    return report
