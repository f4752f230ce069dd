"""run_merge: config → plan → workers → finalize. The whole recipe, on one screen."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DTYPE_NAMES, MergeConfig, RunOptions
from .errors import ConfigError, DataError, InputError, OutputError, StarDistError, VerifyError
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
from .planner import MergePlan, build_plan
from .progress import Progress
from .report import merge_report, model_card, write_report
from .resume import finished_shards, on_other_device
from .runtime.api import Runtime
from .runtime.choose import choose_runtime
from .runtime.storage import StorageCheck
from .shard import Manifest


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge wrote, and how much of it an earlier run had already done."""

    out_dir: Path
    files: list[str]
    shards_total: int
    shards_resumed: int
    report: dict[str, Any]
    warnings: tuple[str, ...] = ()
    runtime: str = "local"  # where it ran ("local" | "ray") and why, in words
    runtime_reason: str = ""
    bytes_read_per_worker: dict[str, int] = dataclasses.field(default_factory=dict)  # this run's shards only
    verification: str = ""  # one line: what the final architecture check found, or why it was skipped


def run_merge(config: MergeConfig, out_dir: str | Path, options: RunOptions) -> MergeResult:
    """Plan (validating every input), lock and claim the output folder, merge, finalize.

    Args:
        config: the validated merge config.
        out_dir: the output folder (created if missing; resumed if it holds this plan's run).
        options: how to run it (runtime, workers, device, threads, --overwrite, --verify-resume).

    Returns:
        What was written, and how many shards an earlier run had already done.
    """
    plan = build_plan(config, out_dir, options)  # headers only; raises before any write
    check_output_apart(plan.out_dir, plan.input_folders)
    choice = choose_runtime(plan, options)
    with OutputLock(plan.out_dir) as lock:  # one run per output folder, held by the driver
        resuming = _claim(plan, options, fresh_folder=lock.created_folder)
        done = finished_shards(plan)  # manifest, size and mtime check out
        try:
            done, manifests = _execute(plan, dataclasses.replace(options, runtime=choice.runtime,
                                                                 address=choice.address), done)
        except StarDistError as exc:
            # Bad data met mid-merge (NaN, overflow), or a failure before any shard was done (no
            # cluster, a full disk): leave the folder as this run found it. A crash after some
            # shards keeps them for the resume, as an interruption does.
            bad_input = isinstance(exc, (DataError, InputError, ConfigError))
            if not resuming and (bad_input or not _shards_written(plan, done)):
                release_output_dir(plan.out_dir, remove_folder=lock.created_folder)
            raise
        report = finalize(plan, [*done.values(), *manifests])
        drop_replaced(plan.out_dir)  # the new merge is complete: the overwritten contents can go
    verification = verify_output(plan.out_dir) if options.verify else "verify: skipped (--no-verify)"
    files = sorted(p.name for p in plan.out_dir.iterdir() if p.is_file() and not p.name.startswith(STATE_DIR))
    return MergeResult(plan.out_dir, files, len(plan.shards), len(done), report, tuple(plan.warnings),
                       choice.runtime, choice.reason, bytes_read_per_worker(plan, manifests), verification)


def _claim(plan: MergePlan, options: RunOptions, fresh_folder: bool) -> bool:
    """Claim the locked folder (True: resuming); a folder this run created goes again if the
    claim fails (a read-only or full disk), so a failed start leaves nothing behind."""
    try:
        return claim_output_dir(plan.out_dir, plan.identity, options.overwrite)
    except StarDistError:
        if fresh_folder:
            release_output_dir(plan.out_dir, remove_folder=True)
        raise


def _execute(plan: MergePlan, options: RunOptions, done: dict[str, Manifest]
             ) -> tuple[dict[str, Manifest], list[Manifest]]:
    """Recheck the finished shards on the runtime (device; hashes with --verify-resume), then
    merge the rest with a progress bar. Returns (shards kept from earlier runs, new manifests)."""
    say = _stderr_unless(options.quiet)
    for warning in plan.warnings:
        say(f"star-dist: warning: {warning}")
    uniform = len({m.get("device") for m in done.values()}) <= 1  # one device: nothing to redo for mixing
    if len(done) == len(plan.shards) and uniform and not options.verify_resume:
        return done, []  # nothing to do starts no cluster
    with open_runtime(plan, options, len(plan.shards) - len(done)) as runtime:  # connects before any bar
        done = _recheck(plan, options, runtime, done, say)
        todo = sorted((j for j in plan.shards if j.file_name not in done), key=lambda j: (-j.cost, j.index))
        if not todo:
            return done, []
        if done:
            say(f"resuming: {len(done)} of {len(plan.shards)} shards already complete")
        progress = Progress(sum(j.bytes_out for j in todo), sum(len(j.tensors) for j in todo), options.quiet)
        try:
            return done, runtime.run(plan.run, todo, progress)
        finally:
            progress.close()


def _stderr_unless(quiet: bool) -> Callable[[str], None]:
    """A one-line notice to stderr (stdout carries results), or nothing under --quiet."""
    return (lambda _text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))


def _recheck(plan: MergePlan, options: RunOptions, runtime: Runtime, done: dict[str, Manifest],
             say: Callable[[str], None]) -> dict[str, Manifest]:
    """The finished shards this run keeps: computed on this run's device, and with
    --verify-resume, still hashing to their manifests (re-hashed in the workers)."""
    if not done:
        return done
    device = runtime.device()
    other = on_other_device(done, device)
    if other:
        say(f"redoing {len(other)} shard(s) computed on another device than this run's ({device})")
    kept = {name: m for name, m in done.items() if name not in other}
    if options.verify_resume and kept:
        bad = runtime.verify([(str(plan.out_dir / name), m["sha256"]) for name, m in sorted(kept.items())])
        if bad:
            say(f"--verify-resume: redoing {len(bad)} shard(s) whose bytes changed: "
                f"{', '.join(Path(b).name for b in bad[:3])}")
        kept = {name: m for name, m in kept.items() if str(plan.out_dir / name) not in bad}
    return kept


def _shards_written(plan: MergePlan, done: dict[str, Manifest]) -> bool:
    """Whether this run finished any shard an earlier run had not. A manifest is written only
    after its shard, so its presence is enough: no need to hash shards on the failure path."""
    return any(job.file_name not in done and manifest_path(plan.out_dir, job.file_name).exists()
               for job in plan.shards)


def bytes_read_per_worker(plan: MergePlan, manifests: list[Manifest]) -> dict[str, int]:
    """Input bytes each worker read this run ("worker 0", or "local" in-process), for the result.

    Args:
        plan: the plan, whose shard jobs say how many bytes each shard reads.
        manifests: the manifests of the shards this run wrote (not those resumed).
    Returns:
        Worker label -> bytes read, sorted by label; empty when this run wrote no shard.
    """
    jobs = {job.file_name: job for job in plan.shards}
    out: dict[str, int] = {}
    for m in manifests:
        worker = m.get("worker", {}).get("worker")
        key = "local" if worker is None else f"worker {worker}"
        out[key] = out.get(key, 0) + jobs[m["file"]].bytes_read
    return dict(sorted(out.items()))


@contextlib.contextmanager
def open_runtime(plan: MergePlan, options: RunOptions, n_jobs: int) -> Iterator[Runtime]:
    """The chosen runtime (`options.runtime`: "local" or "ray"), with its cluster (if any) up
    for the duration. Ray workers first check that their node sees the plan's storage.

    Args:
        plan: the plan; its input files and output folder are what Ray workers check they see.
        options: run options with `runtime` already chosen ("local" or "ray", not "auto").
        n_jobs: how many shards are left to merge; Ray starts no more workers than that.
    Returns:
        A context manager yielding the Runtime; leaving it removes the actors and ends the Ray session.
    Raises:
        ClusterError: the Ray cluster cannot be joined or started, or cannot hold the workers asked for.
    """
    if options.runtime == "local":
        from .runtime.local import local_runtime

        yield local_runtime(options)
        return
    from .runtime import ray as ray_runtime

    storage = StorageCheck(tuple(plan.local_files.items()), str(plan.out_dir), STATE_DIR)
    with ray_runtime.ray_session(options) as embedded, \
            ray_runtime.ray_runtime(options, max(n_jobs, 1), embedded, storage) as runtime:
        yield runtime


def check_shards_visible(out_dir: Path, manifests: list[Manifest]) -> None:
    """Before the index: the driver sees every shard with the size its worker wrote. A worker
    writing to another disk mounted at the same path would otherwise leave an index of
    shards that are not there.

    Args:
        out_dir: the output folder, as the driver sees it.
        manifests: every shard's manifest ("file" and its "size" in bytes).
    Raises:
        OutputError: a shard missing here, or with another size than its manifest says.
    """
    for m in sorted(manifests, key=lambda m: m["file"]):
        path = out_dir / m["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = None
        if size != m["size"]:
            seen = "it is missing here" if size is None else f"here it has {size} bytes"
            raise OutputError(
                f"{path}: its worker wrote {m['size']} bytes, but {seen}; the driver and the workers do "
                "not share the output folder: mount the shared file system at the same path on every node"
            )


def verify_output(out_dir: Path) -> str:
    """The finished folder against its config.json's architecture (headers only); a mismatch
    fails the run, keeping the files for inspection. Returns the one-line outcome."""
    from .verify import verify_folder

    try:
        return verify_folder(out_dir, strict=False).summary()  # what it inherits from the base only warns
    except VerifyError as exc:
        raise VerifyError(f"{exc} (the merged files are kept for inspection)") from None


@converts_os_errors("finish the output")
def finalize(plan: MergePlan, manifests: list[Manifest]) -> dict[str, Any]:
    """Copied files, model card and report first; the index last, only after every shard,
    each checked to be there with the size its manifest says.

    Args:
        plan: the plan that was run.
        manifests: every shard's manifest, resumed and new.
    Returns:
        The merge report, as written to merge_report.json.
    Raises:
        OutputError: a shard not visible to the driver, or a file that cannot be written.
        InputError: a base file that cannot be read.
    """
    out = plan.out_dir
    check_shards_visible(out, manifests)
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
