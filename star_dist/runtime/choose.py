"""`--runtime auto`: join a given cluster, start Ray only when it pays, else run here.

Starting the embedded Ray cluster and its actors costs about 10 s (measured: a tiny merge
takes 2.3 s in-process and 11.7 s through the CLI's own cluster). That pays off only when
spreading the shards over W workers saves more than that: estimated work × (1 − 1/W) above
the start-up cost, with W = min(CPU groups or GPUs here, shards) at least 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import RunOptions
from ..planner import MergePlan

RAY_STARTUP_S = 10.0


@dataclass(frozen=True)
class RuntimeChoice:
    """Where the merge runs and why, in words `plan` prints."""

    runtime: str  # "local" | "ray"
    address: str | None  # a cluster to join; None with "ray": the embedded one
    reason: str


def estimate_seconds(plan: MergePlan) -> float:
    """Single-worker wall time of the plan's work on the CPU, from the plan's cost model
    (estimate.py: FLOPs at this CPU's measured rates for the run's threads per worker, plus
    bytes moved), to weigh Ray's start-up.

    Args:
        plan: the merge plan, with its cost estimate.
    Returns:
        Seconds for one CPU worker to do all the work; 0.0 when the plan has no estimate.
    """
    if plan.estimate is None:
        return 0.0
    return plan.estimate.cpu.seconds * plan.estimate.workers


def local_parallelism(options: RunOptions) -> tuple[int, str]:
    """How many workers this machine could run at once, and what they are (GPUs or CPU groups)."""
    if options.device != "cpu":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus:
            return gpus, f"{gpus} GPU(s)"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    groups = max(1, cpus // options.threads_per_worker)
    return groups, f"{groups} CPU group(s) of {options.threads_per_worker} thread(s)"


def choose_runtime(plan: MergePlan, options: RunOptions) -> RuntimeChoice:
    """The runtime for `options.runtime` ("auto" decides here).

    Args:
        plan: the merge plan (its cost estimate and shard count).
        options: the run options.

    Returns:
        The runtime, the cluster address to join (if any), and the reason.
    """
    if options.runtime == "local":
        return RuntimeChoice("local", None, "--runtime local")
    if options.runtime == "ray":
        where = f"joining {options.address}" if options.address else "an embedded local cluster"
        return RuntimeChoice("ray", options.address, f"--runtime ray: {where}")
    if options.address:
        return RuntimeChoice("ray", options.address, f"--address {options.address} given: joining that cluster")
    if os.environ.get("RAY_ADDRESS"):
        return RuntimeChoice("ray", "auto", f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}: joining that cluster")
    return _embedded_or_local(plan, options)


def _embedded_or_local(plan: MergePlan, options: RunOptions) -> RuntimeChoice:
    seconds = estimate_seconds(plan)
    slots, what = local_parallelism(options)
    workers = min(slots, len(plan.shards), options.workers or slots)
    if workers < 2:
        why = "the plan has 1 shard" if len(plan.shards) < 2 else f"this machine has {what}"
        return RuntimeChoice("local", None, f"{why}: one worker at a time, in this process")
    saved = seconds * (1 - 1 / workers)
    if saved <= RAY_STARTUP_S:
        return RuntimeChoice(
            "local", None,
            f"about {seconds:.0f}s of work: {workers} workers would save {saved:.0f}s, less than Ray's "
            f"~{RAY_STARTUP_S:.0f}s start-up, so in this process",
        )
    return RuntimeChoice(
        "ray", None,
        f"about {seconds:.0f}s of work: {workers} workers on {what} save about {saved:.0f}s, more than "
        f"Ray's ~{RAY_STARTUP_S:.0f}s start-up, so on an embedded Ray cluster",
    )
