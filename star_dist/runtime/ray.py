"""The Ray runtime: a pool of thin worker actors that each run `merge_shard`.

The driver submits shard jobs (paths and names, never tensors), keeps one job in flight
per actor, collects manifests with `ray.wait`, and re-raises a failure with the shard's
name. Actors restart after a crash and Ray retries the call on the new process
(`max_restarts`, `max_task_retries`); a shard whose actor is gone for good goes to a fresh
actor. Without an address, an embedded cluster is started on loopback and stopped after.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..config import RunOptions
from ..errors import ClusterError, MergeError, StarDistError
from ..plan import ShardJob
from ..progress import Progress
from ..shard import Manifest

# Keeps a local cluster's every port on 127.0.0.1 (DESIGN §5); must be set before Ray starts.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Test hook: the first worker to see this path absent creates it and dies mid-shard.
CRASH_ONCE_ENV = "STAR_DIST_CRASH_ONCE_MARKER"
ACTOR_RESTARTS = 3
SHARD_ATTEMPTS = 3  # fresh actors a shard may go to after its actor is gone for good
WAIT_SLICE_S = 1.0


class ShardWorker:
    """A Ray actor: plain Python around `merge_shard`, tagging its log lines with its id."""

    def __init__(self, worker_id: int, threads: int, crash_marker: str | None = None) -> None:
        import torch

        self.worker_id = worker_id
        self.crash_marker = crash_marker
        torch.set_num_threads(threads)

    def info(self) -> dict[str, Any]:
        import ray

        return {"worker": self.worker_id, "pid": os.getpid(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def merge(self, job: ShardJob) -> Manifest:
        from ..shard import merge_shard

        start = time.perf_counter()
        print(f"[worker {self.worker_id}] {job.file_name}: {len(job.tensors)} tensors", flush=True)
        if self.crash_marker and not Path(self.crash_marker).exists():
            Path(self.crash_marker).write_text(str(os.getpid()))
            os._exit(1)  # a fault test: die as a killed process would, mid-shard
        manifest = merge_shard(job, worker=self.info())
        print(f"[worker {self.worker_id}] {job.file_name}: done in {time.perf_counter() - start:.1f}s", flush=True)
        return manifest


@dataclass(frozen=True)
class PoolShape:
    workers: int
    num_cpus: float
    num_gpus: float


def pool_shape(resources: dict[str, float], options: RunOptions, n_jobs: int) -> PoolShape:
    """One actor per GPU when GPUs are used, else one per `threads_per_worker` CPUs.

    Asking for more workers than the cluster holds shares the slots fractionally, so every
    actor can start (an actor waiting for a slot would hold its shard forever).
    """
    gpus = resources.get("GPU", 0.0)
    cpus = resources.get("CPU", 1.0)
    use_gpu = options.device == "cuda" or (options.device == "auto" and gpus >= 1)
    if options.device == "cuda" and gpus < 1:
        if not options.workers:
            raise ClusterError(
                "--device cuda: the Ray cluster has no GPUs now; pass --workers N to request N GPU "
                "workers anyway (an autoscaling cluster then adds GPU nodes)"
            )
        # GPU nodes are yet to come: ask for whole GPUs so the autoscaler sees the demand.
        return PoolShape(max(1, min(options.workers, n_jobs)), 1.0, 1.0)
    if use_gpu:
        workers = max(1, min(options.workers or int(gpus), n_jobs))
        return PoolShape(workers, min(1.0, cpus / workers), min(1.0, gpus / workers))
    threads = options.threads_per_worker
    workers = max(1, min(options.workers or int(cpus // threads) or 1, n_jobs))
    return PoolShape(workers, min(float(threads), cpus / workers), 0.0)


def run_shards(jobs: list[ShardJob], progress: Progress, options: RunOptions) -> list[Manifest]:
    """Merge the shards on Ray actors (inside `ray_session`); manifests in completion order."""
    import ray

    shape = pool_shape(ray.cluster_resources(), options, len(jobs))
    progress.message(f"ray: {shape.workers} worker(s), {shape.num_cpus:g} CPU and {shape.num_gpus:g} GPU each")
    pool = ActorPool(shape, options.threads_per_worker, os.environ.get(CRASH_ONCE_ENV))
    try:
        return pool.run(jobs, progress)
    finally:
        pool.shutdown()


class ActorPool:
    """Hands shards to idle actors (one in flight each) and replaces actors that die."""

    def __init__(self, shape: PoolShape, threads: int, crash_marker: str | None) -> None:
        import ray

        self._actor_cls = ray.remote(ShardWorker).options(
            num_cpus=shape.num_cpus,
            num_gpus=shape.num_gpus,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=ACTOR_RESTARTS,
        )
        self._threads = threads
        self._crash_marker = crash_marker
        self._next_id = 0
        self.idle = [self._new_actor() for _ in range(shape.workers)]
        self.in_flight: dict[Any, tuple[ShardJob, Any]] = {}

    def _new_actor(self) -> Any:
        self._next_id += 1
        return self._actor_cls.remote(self._next_id - 1, self._threads, self._crash_marker)

    def run(self, jobs: list[ShardJob], progress: Progress) -> list[Manifest]:
        import ray

        queue = list(jobs)  # most expensive first, as the driver sorted them
        deaths: dict[str, int] = {}
        manifests: list[Manifest] = []
        while queue or self.in_flight:
            while queue and self.idle:
                job, actor = queue.pop(0), self.idle.pop()
                self.in_flight[actor.merge.remote(job)] = (job, actor)
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=WAIT_SLICE_S)
            for ref in ready:
                job, actor = self.in_flight.pop(ref)
                try:
                    manifest = ray.get(ref, timeout=60)
                except ray.exceptions.RayActorError as exc:  # gone for good, past its restarts
                    deaths[job.file_name] = deaths.get(job.file_name, 0) + 1
                    if deaths[job.file_name] >= SHARD_ATTEMPTS:
                        raise MergeError(f"shard {job.file_name}: worker died {SHARD_ATTEMPTS} times ({exc})") from None
                    progress.message(f"shard {job.file_name}: worker died, retrying on a fresh worker")
                    queue.insert(0, job)
                    self.idle.append(self._new_actor())  # never reuse a dead actor
                    continue
                except ray.exceptions.RayTaskError as exc:
                    raise _unwrap(exc, job) from None
                manifests.append(manifest)
                self.idle.append(actor)
                progress.advance(len(job.tensors), job.bytes_out)
        return manifests

    def shutdown(self) -> None:
        import ray

        for actor in self.idle + [a for _, a in self.in_flight.values()]:
            with contextlib.suppress(Exception):
                ray.kill(actor)


def _unwrap(exc: Exception, job: ShardJob) -> StarDistError:
    """A worker's own StarDistError comes back as itself, with the shard's name added."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, StarDistError):
        return type(cause)(f"shard {job.file_name}: {cause}")
    first = str(cause or exc).strip().splitlines()
    return MergeError(f"shard {job.file_name}: worker failed: {first[-1] if first else type(exc).__name__}")


@contextlib.contextmanager
def ray_session(options: RunOptions) -> Iterator[bool]:
    """Connect to `options.address`, or start an embedded loopback cluster; yields whether
    the cluster is embedded (and so is stopped on exit)."""
    import ray

    if ray.is_initialized():  # a caller (a notebook, a test session) already connected
        yield False
        return
    for key, value in LOOPBACK_ENV.items():
        os.environ[key] = value
    embedded = options.address is None
    try:
        if embedded:
            os.environ.pop("RAY_ADDRESS", None)
            ray.init(
                address="local",  # a new cluster, never one a `ray start` left running here
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                log_to_driver=not options.quiet,
                logging_level="ERROR",
                configure_logging=True,
            )
        else:
            check_reachable(options.address, options.connect_timeout_s)
            ray.init(address=options.address, log_to_driver=not options.quiet, logging_level="ERROR")
    except ClusterError:
        raise
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
        where = "start a local Ray cluster" if embedded else f"connect to the Ray cluster at {options.address}"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ClusterError(f"could not {where}: {type(exc).__name__}: {detail}") from None
    try:
        yield embedded
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast with a clear error when the cluster's port does not answer (Ray would
    otherwise retry for minutes). 'auto' is checked through RAY_ADDRESS or Ray's record of
    the last cluster started on this machine."""
    target = address
    if address == "auto":
        target = os.environ.get("RAY_ADDRESS") or _last_local_cluster() or ""
        if not target:
            raise ClusterError(
                "--address auto: no running Ray cluster found (RAY_ADDRESS is unset and no "
                "`ray start` record exists); start one with `ray start --head` or drop --address"
            )
    parsed = urlparse(target if "://" in target else f"tcp://{target}")
    host, port = parsed.hostname, parsed.port or (10001 if parsed.scheme == "ray" else 6379)
    if not host:
        raise ClusterError(f"--address {address!r}: expected auto, host:port or ray://host:port")
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as exc:
            last_error = exc
            time.sleep(0.5)
    raise ClusterError(
        f"Ray cluster at {host}:{port} is not reachable after {timeout_s:g}s ({last_error}); "
        "check the address, or that `ray start --head` is running"
    )


def _last_local_cluster() -> str | None:
    path = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
