"""merge_shard(run, job) -> manifest: the unit of work. Plain Python, no Ray inside.

It runs the same in the driver's process (`--runtime local`) and inside a Ray actor, and
writes exactly the same bytes in both, as long as the thread count is the same (LAPACK
and BLAS reductions depend on it), which is why the run spec carries it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .device import exact_float32_matmuls
from .lora import PEFT_PREFIX
from .merge_tensor import TensorMerger, resolve_device
from .methods import MergeMethod, get_method
from .output import manifest_path, write_atomic
from .planner import RunSpec, ShardJob, TensorJob
from .safetensors_format import TORCH_TO_CODE, StreamingShardWriter, TensorReader

Manifest = dict[str, Any]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with exactly `n` intra-op threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def merge_shard(
    run: RunSpec,
    job: ShardJob,
    on_tensor: Callable[[str, int], None] | None = None,
    worker: dict[str, Any] | None = None,
    overlap: bool = True,
) -> Manifest:
    """Merge every tensor of one output shard, write it atomically, then its manifest.

    With `overlap` the next tensor's inputs are read ahead and the last one is written and
    hashed by a helper thread while the current one merges; without it every step runs in
    turn. The bytes are the same either way.

    Args:
        run: what every shard of the run shares (method, weights, output folder, fingerprint).
        job: this shard: its file name and tensors.
        on_tensor: called as `on_tensor(name, out_bytes)` after each tensor, for progress bars.
        worker: who ran it (id, pid, GPU ids, node), recorded in the manifest.
        overlap: read ahead and write behind on helper threads (default True).
    Returns:
        The shard's manifest, also written beside the shard after the shard is in place.
    """
    start = time.perf_counter()
    if run.output_format == "adapter":
        return _merge_adapter(run, job, start, worker, on_tensor)
    out_dir = Path(run.out_dir)
    method = method_of(run)
    device = resolve_device(run.device)
    writer = StreamingShardWriter(
        out_dir / job.file_name, [(t.name, t.out_dtype, t.shape) for t in job.tensors], background=overlap
    )
    report: dict[str, Any] = {}
    try:
        with torch_threads(run.threads), exact_float32_matmuls(device), TensorReader(prefetch_pages=overlap) as reader:
            merger = TensorMerger(method, run.weights, run.lambda_, reader, device, run.compute_dtype)
            for tensor_job in read_ahead(job.tensors, merger.prefetch if overlap else None):
                report[tensor_job.name] = merger.merge_into(tensor_job, writer)
                if on_tensor is not None:
                    on_tensor(tensor_job.name, tensor_job.out_bytes)
        size, sha256 = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return _finish(run, job, size, sha256, report, start, worker)


def read_ahead(
    jobs: Sequence[TensorJob], prefetch: Callable[[TensorJob], None] | None
) -> Iterator[TensorJob]:
    """The jobs in order, each yielded after `prefetch` was called on the one after it.

    The one place where "the next tensor" is known: a prefetch step may only hint the kernel
    (today), or later stage the next tensor on a device while the current one computes.

    Args:
        jobs: the shard's tensor jobs, in write order.
        prefetch: called with the next job before the current one is yielded; None: no read-ahead.
    Returns:
        An iterator over `jobs`, in order (a generator: each prefetch runs when the previous job is taken).
    """
    for i, tensor_job in enumerate(jobs):
        if prefetch is not None and i + 1 < len(jobs):
            prefetch(jobs[i + 1])
        yield tensor_job


def method_of(run: RunSpec) -> MergeMethod:
    """The run's merge method, with its global and per-model parameters."""
    return get_method(run.method, dict(run.method_params), [dict(p) for p in run.model_params])


def _finish(
    run: RunSpec, job: ShardJob, size: int, sha256: str, report: dict[str, Any], start: float,
    worker: dict[str, Any] | None,
) -> Manifest:
    """Write the shard's manifest (after the shard itself is in place) and return it."""
    manifest: Manifest = {
        "file": job.file_name,
        "size": size,
        "mtime_ns": os.stat(Path(run.out_dir) / job.file_name).st_mtime_ns,  # with size: what resume trusts
        "device": resolve_device(run.device).type,  # where it was computed: a resume never mixes devices
        "sha256": sha256,
        "fingerprint": run.fingerprint,
        "tensors": [t.name for t in job.tensors],
        "report": report,
        "worker": {"pid": os.getpid(), **(worker or {}), "seconds": round(time.perf_counter() - start, 3)},
    }
    write_atomic(manifest_path(Path(run.out_dir), job.file_name), json.dumps(manifest, indent=1).encode())
    return manifest


def _merge_adapter(
    run: RunSpec, job: ShardJob, start: float, worker: dict[str, Any] | None,
    on_tensor: Callable[[str, int], None] | None,
) -> Manifest:
    """One PEFT adapter file: every module's merged factors. Ranks are known only after
    STAR, so the (small) factors are computed first and then written with their header;
    the bar advances per module by its planned (upper-bound) bytes, as the plan counted them."""
    method = method_of(run)
    factors: list[tuple[str, torch.Tensor]] = []
    report: dict[str, Any] = {}
    device = resolve_device(run.device)
    with torch_threads(run.threads), exact_float32_matmuls(device), TensorReader() as reader:
        merger = TensorMerger(method, run.weights, run.lambda_, reader, device, run.compute_dtype)
        for tensor_job in job.tensors:
            lora_b, lora_a, report[tensor_job.name] = merger.merge_factors(tensor_job)
            module = PEFT_PREFIX + tensor_job.name.removesuffix(".weight")
            factors += [(f"{module}.lora_A.weight", lora_a), (f"{module}.lora_B.weight", lora_b)]
            if on_tensor is not None:
                on_tensor(tensor_job.name, tensor_job.out_bytes)
    factors.sort(key=lambda item: item[0])
    writer = StreamingShardWriter(
        Path(run.out_dir) / job.file_name,
        [(name, TORCH_TO_CODE[t.dtype], tuple(t.shape)) for name, t in factors],
    )
    try:
        for name, tensor in factors:
            writer.write(name, tensor)
        size, sha256 = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return _finish(run, job, size, sha256, report, start, worker)


__all__ = ["merge_shard", "method_of", "torch_threads", "Manifest"]
