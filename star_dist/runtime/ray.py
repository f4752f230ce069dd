"""The Ray runtime: a pool of thin worker actors that each run `merge_shard`.

The driver submits shard jobs (paths and names, never tensors) only to actors that have
started, keeps one job in flight per actor, collects manifests with `ray.wait`, and
re-raises a failure with the shard's name. Actors restart after a crash and Ray retries
the call on the new process (`max_restarts`, `max_task_retries`); a shard whose actor is
gone for good goes to a fresh actor. An actor Ray cannot place waits harmlessly; if none
starts at all within `start_timeout_s`, the run fails with what was asked and what the
cluster has, instead of hanging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..config import RunOptions
from ..errors import ClusterError, MergeError, StarDistError
from ..files import shard_os_error
from ..planner import RunSpec, ShardJob
from ..progress import Progress
from ..shard import Manifest
from .api import Runtime
from .ray_cluster import ray_session
from .storage import StorageCheck

__all__ = ["ray_session", "ray_runtime", "pool_shape", "actor_device", "PoolShape"]

ACTOR_RESTARTS = 2  # process restarts of one actor, each retrying the call it died in
SHARD_ATTEMPTS = 2  # actors a shard may exhaust before the run fails on it
WAIT_SLICE_S = 1.0
WAITING_NOTICE_S = 15.0  # say that workers are pending after this long with none running


def actor_device(requested: str, gpu_ids: list[str], cuda_available: bool) -> str:
    """Where an actor computes. A GPU only when Ray assigned it one: a CPU actor on a GPU
    node must not grab the node's GPUs, and fake GPU slots (no CUDA) compute on the CPU
    under 'auto'.

    Args:
        requested: the run's device option: "auto", "cpu" or "cuda".
        gpu_ids: the GPU ids Ray assigned this actor (`ray.get_gpu_ids()`), as strings; empty: none.
        cuda_available: whether torch sees a CUDA device in this process.
    Returns:
        "cuda" or "cpu".
    Raises:
        MergeError: "cuda" requested, but the actor has no GPU from Ray or CUDA sees none.
    """
    if requested == "cpu":
        return "cpu"
    if gpu_ids and cuda_available:
        return "cuda"
    if requested == "cuda":
        why = f"Ray assigned GPU {','.join(gpu_ids)} but CUDA sees none" if gpu_ids else "Ray assigned it no GPU"
        raise MergeError(f"device 'cuda' requested but this worker has no CUDA device ({why})")
    return "cpu"


log = logging.getLogger("star_dist.worker")


def _log_to_stderr() -> None:
    """In a worker process, star_dist's INFO lines go to stderr, which Ray forwards to the
    driver unless --quiet (log_to_driver); the root logger stays as Ray set it."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class ShardWorker:
    """A Ray actor: plain Python around `merge_shard`, tagging its log lines with its id."""

    def __init__(self, worker_id: int, threads: int, device: str, storage: StorageCheck | None = None) -> None:
        import torch

        self.worker_id = worker_id
        self.requested_device = device
        self.storage = storage
        self.node: str | None = None  # set once this node's storage checked out
        torch.set_num_threads(threads)
        _log_to_stderr()

    def info(self) -> dict[str, Any]:
        """Who this worker is, on which node and cluster, and where it computes; raises, naming the node, if that device
        does not exist or this node does not see the inputs and the output folder."""
        import ray
        import torch

        from .storage import check_node_storage, node_name

        if self.node is None:
            node = node_name()
            if self.storage is not None:
                check_node_storage(self.storage, node)
            self.node = node
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        device = actor_device(self.requested_device, gpu_ids, torch.cuda.is_available())
        return {"worker": self.worker_id, "pid": os.getpid(), "gpu_ids": gpu_ids, "device": device, "node": self.node,
                "cluster": ray.get_runtime_context().gcs_address}  # which cluster: `--address auto` may pick

    def verify(self, path: str, sha256: str) -> bool:
        """Whether a finished shard's bytes still hash to its manifest's sha256."""
        from ..resume import hash_differs

        return not hash_differs(path, sha256)

    def merge(self, run: RunSpec, job: ShardJob) -> Manifest:
        """One shard, on this worker's device, its hub files read from this node's cache."""
        from ..hub import localize
        from ..shard import merge_shard

        start = time.perf_counter()
        info = self.info()
        log.info("[worker %d] %s: %d tensors on %s", self.worker_id, job.file_name, len(job.tensors), info["device"])
        job, fetched = localize(job)  # hub files: this node's own cache, fetched if missing
        if fetched:
            info = {**info, "hub_files": fetched}
        manifest = merge_shard(dataclasses.replace(run, device=info["device"]), job, worker=info)
        log.info("[worker %d] %s: done in %.1fs", self.worker_id, job.file_name, time.perf_counter() - start)
        return manifest


@dataclass(frozen=True)
class PoolShape:
    workers: int
    num_cpus: float
    num_gpus: float
    runnable: int  # how many of the workers the cluster can hold at once right now

    def describe(self) -> str:
        waiting = f", {self.workers - self.runnable} waiting for room" if self.runnable < self.workers else ""
        return f"{self.workers} worker(s), {self.num_cpus:g} CPU and {self.num_gpus:g} GPU each{waiting}"


def pool_shape(nodes: list[dict[str, float]], options: RunOptions, n_jobs: int, embedded: bool = False) -> PoolShape:
    """One actor per whole GPU when GPUs are used, else one per `threads_per_worker` CPUs,
    sized on each node's own resources (an actor cannot span nodes).

    `nodes` are the alive nodes' resources. Asking for more CPU workers than fit shares the
    CPUs fractionally (CPUs can be shared, GPUs are not); workers that still do not fit wait
    for room, and only started workers get shards.

    Args:
        nodes: each alive node's Ray resources ({"CPU": 16.0, "GPU": 1.0, ...}).
        options: the run options (device, workers, threads_per_worker).
        n_jobs: how many shards are to merge: never more workers than that.
        embedded: whether the cluster was started by this run (no autoscaler: missing GPUs won't come).
    Returns:
        The PoolShape: worker count, CPUs and GPUs per actor, and how many fit now.
    Raises:
        ClusterError: device "cuda" with no GPU in the cluster (embedded, or without `workers` to ask for).
    """
    total_gpus = sum(int(n.get("GPU", 0.0)) for n in nodes)
    if options.device == "cuda" or (options.device == "auto" and total_gpus >= 1):
        return _gpu_shape(nodes, options, n_jobs, embedded, total_gpus)
    cpus = [n.get("CPU", 0.0) for n in nodes]
    threads = float(options.threads_per_worker)
    # An actor asks for its threads, but never more than the biggest node has; a cluster
    # with no CPUs yet (a 0-CPU head) asks in full, for an autoscaler to see.
    per_actor = min(threads, max(cpus)) if max(cpus, default=0.0) > 0 else threads
    slots = _fits(cpus, per_actor)
    workers = max(1, min(options.workers or slots or 1, n_jobs))
    if workers > slots and slots > 0:
        per_actor = _largest_share(cpus, workers, per_actor)
        slots = _fits(cpus, per_actor)
    return PoolShape(workers, per_actor, 0.0, min(workers, slots))


def _gpu_shape(nodes: list[dict[str, float]], options: RunOptions, n_jobs: int, embedded: bool,
               total_gpus: int) -> PoolShape:
    if total_gpus < 1:
        if embedded:
            raise ClusterError(
                "--device cuda: this machine has no GPU that Ray can see; use --device cpu or auto, "
                "or join a GPU cluster with --address"
            )
        if not options.workers:
            raise ClusterError(
                "--device cuda: the Ray cluster has no GPUs now; pass --workers N to request N GPU "
                "workers anyway (an autoscaling cluster then adds GPU nodes)"
            )
        # GPU nodes are yet to come: ask for whole GPUs so the autoscaler sees the demand.
        return PoolShape(min(options.workers, n_jobs), 1.0, 1.0, 0)
    gpu_nodes = [n for n in nodes if int(n.get("GPU", 0.0)) >= 1]
    # One CPU per GPU actor, unless the leanest GPU node has fewer CPUs than GPUs.
    num_cpus = min(1.0, *(n.get("CPU", 0.0) / int(n["GPU"]) for n in gpu_nodes))
    num_cpus = _round_down_for_ray(num_cpus)
    workers = max(1, min(options.workers or total_gpus, n_jobs))
    return PoolShape(workers, num_cpus, 1.0, min(workers, total_gpus))


def _fits(capacities: list[float], per_actor: float) -> int:
    """How many actors of `per_actor` CPUs the nodes hold (true division: 0.3 // 0.1 is 2)."""
    if per_actor <= 0:
        return 0
    return sum(int(c / per_actor + 1e-9) for c in capacities)


def _largest_share(capacities: list[float], workers: int, ceiling: float) -> float:
    """The largest CPU share ≤ `ceiling` at which `workers` actors fit across the nodes."""
    shares = {c / k for c in capacities if c > 0 for k in range(1, workers + 1)}
    fitting = [s for s in shares if s <= ceiling and _fits(capacities, s) >= workers]
    share = max(fitting, default=sum(capacities) / workers)
    return _round_down_for_ray(share)


def _round_down_for_ray(amount: float) -> float:
    """Ray keeps resources to 1e-4: round down (so the actor still fits), past float noise
    (0.3 / 3 is 0.0999…, and means 0.1)."""
    return math.floor(amount * 1e4 + 1e-6) / 1e4


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


@contextlib.contextmanager
def ray_runtime(options: RunOptions, n_jobs: int, embedded: bool, storage: StorageCheck) -> Iterator[Runtime]:
    """The actor pool on the cluster now (inside `ray_session`), sized first so that a shape
    that cannot work fails before any progress is drawn; its actors go when the run ends.

    Args:
        options: the run options (device, workers, threads, start timeout).
        n_jobs: how many shards are to merge (caps the worker count).
        embedded: whether `ray_session` started the cluster for this run.
        storage: the input files and output folder each worker checks its node sees.
    Returns:
        A context manager yielding the "ray" Runtime; leaving it kills the actors.
    Raises:
        ClusterError: a pool shape the cluster cannot hold (see `pool_shape`).
    """
    nodes = alive_nodes()
    shape = pool_shape(nodes, options, n_jobs, embedded)
    pool = ActorPool(shape, options, storage)
    try:
        yield Runtime("ray", pool.device, functools.partial(pool.run, nodes=nodes), pool.verify)
    finally:
        pool.shutdown()


class ActorPool:
    """Hands shards to started, idle actors (one in flight each) and replaces actors that die."""

    def __init__(self, shape: PoolShape, options: RunOptions, storage: StorageCheck | None = None) -> None:
        import ray

        self._actor_cls = ray.remote(ShardWorker).options(
            num_cpus=shape.num_cpus,
            num_gpus=shape.num_gpus,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=ACTOR_RESTARTS,
        )
        self._shape = shape
        self._options = options
        self._storage = storage
        self._device: str | None = None  # the first started worker's
        self._next_id = 0
        self.starting: dict[Any, Any] = {}  # info() ref -> actor not yet known to run
        self.idle: list[Any] = []
        self.in_flight: dict[Any, tuple[ShardJob, Any]] = {}
        for _ in range(shape.workers):
            self._new_actor()

    def _new_actor(self) -> None:
        actor = self._actor_cls.remote(self._next_id, self._options.threads_per_worker, self._options.device,
                                       self._storage)
        self._next_id += 1
        self.starting[actor.info.remote()] = actor

    def device(self) -> str:
        """Where this pool's workers compute: the first to start says (the pool is uniform)."""
        import ray

        deadline = time.monotonic() + self._options.start_timeout_s
        while self._device is None:
            if time.monotonic() > deadline or not self.starting:
                raise ClusterError(self._no_worker_message(self._options.start_timeout_s, alive_nodes()))
            ready, _ = ray.wait(list(self.starting), num_returns=1, timeout=WAIT_SLICE_S)
            for ref in ready:
                self._started(ref)
        return self._device

    def verify(self, shards: list[tuple[str, str]]) -> list[str]:
        """Re-hash finished shards on the started workers, spread round-robin; the paths that differ."""
        import ray

        self.device()  # at least one worker is up
        actors = list(self.idle)
        refs = [actors[i % len(actors)].verify.remote(path, sha) for i, (path, sha) in enumerate(shards)]
        same = ray.get(refs, timeout=max(600.0, 60.0 * len(shards)))
        return [path for (path, _), ok in zip(shards, same, strict=True) if not ok]

    def run(self, run: RunSpec, jobs: list[ShardJob], progress: Progress, nodes: list[dict[str, float]]
            ) -> list[Manifest]:
        """Every job merged on the pool, most expensive first as given; their manifests."""
        import ray

        progress.message(f"ray: {self._shape.describe()}")
        queue = list(jobs)  # most expensive first, as the driver sorted them
        deaths: dict[str, int] = {}
        manifests: list[Manifest] = []
        idle_since = time.monotonic()  # when the pool last had no running worker
        noticed = False
        while queue or self.in_flight:
            while queue and self.idle:
                job, actor = queue.pop(0), self.idle.pop()
                self.in_flight[actor.merge.remote(run, job)] = (job, actor)
            ready, _ = ray.wait([*self.in_flight, *self.starting], num_returns=1, timeout=WAIT_SLICE_S)
            for ref in ready:
                if ref in self.starting:
                    self._started(ref)
                    continue
                job, actor = self.in_flight.pop(ref)
                manifest = self._collect(ref, job, run.out_dir, deaths, progress)
                if manifest is None:
                    queue.insert(0, job)
                    continue
                manifests.append(manifest)
                self.idle.append(actor)
                progress.advance(len(job.tensors), job.bytes_out)
            if self.in_flight or self.idle or not queue:
                idle_since = time.monotonic()
                continue
            waited = time.monotonic() - idle_since
            if waited >= self._options.start_timeout_s:
                raise ClusterError(self._no_worker_message(waited, nodes))
            if waited >= WAITING_NOTICE_S and not noticed:
                noticed = True
                progress.message(f"ray: waiting for a worker to start ({self._asks()})")
        return manifests

    def _started(self, ref: Any) -> None:
        import ray

        actor = self.starting.pop(ref)
        try:
            info = ray.get(ref, timeout=60)
        except ray.exceptions.RayTaskError as exc:  # info() refused: no such device, or storage unseen
            raise _unwrap(exc, "a worker") from None
        except ray.exceptions.RayActorError as exc:  # the process could not start
            raise ClusterError(f"a Ray worker could not start: {_first_line(exc)}") from None
        self._device = self._device or info["device"]
        self.idle.append(actor)

    def _collect(self, ref: Any, job: ShardJob, out_dir: str, deaths: dict[str, int], progress: Progress
                 ) -> Manifest | None:
        """The shard's manifest, or None when its actor died for good and it must be redone."""
        import ray

        try:
            return ray.get(ref, timeout=60)
        except ray.exceptions.RayActorError as exc:  # gone for good, past its restarts
            deaths[job.file_name] = deaths.get(job.file_name, 0) + 1
            if deaths[job.file_name] >= SHARD_ATTEMPTS:
                processes = SHARD_ATTEMPTS * (ACTOR_RESTARTS + 1)
                raise MergeError(
                    f"shard {job.file_name}: its worker process died {processes} times on it "
                    f"({_first_line(exc)}); finished shards are kept, rerun to resume"
                ) from None
            progress.message(f"shard {job.file_name}: worker died, retrying on a fresh worker")
            self._new_actor()  # never reuse a dead actor
            return None
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc, f"shard {job.file_name}", (job.file_name, out_dir)) from None

    def _asks(self) -> str:
        return f"each asks for {self._shape.num_cpus:g} CPU and {self._shape.num_gpus:g} GPU"

    def _no_worker_message(self, waited: float, nodes: list[dict[str, float]]) -> str:
        have = "; ".join(f"{n.get('CPU', 0.0):g} CPU, {n.get('GPU', 0.0):g} GPU" for n in nodes) or "no nodes"
        return (
            f"no Ray worker started within {waited:.0f}s ({self._asks()}; the cluster's nodes have: {have}); "
            "lower --threads-per-worker, add nodes, or raise --start-timeout for an autoscaling cluster"
        )

    def shutdown(self) -> None:
        import ray

        for actor in [*self.idle, *self.starting.values(), *(a for _, a in self.in_flight.values())]:
            with contextlib.suppress(Exception):
                ray.kill(actor)


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _unwrap(exc: Exception, where: str, shard: tuple[str, str] | None = None) -> StarDistError:
    """A worker's own StarDistError comes back as itself, with where it happened added; an
    OSError (a full or read-only disk on the worker's side) as the same one line the local
    runtime gives; `shard` is (file name, output folder) when a shard failed."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, StarDistError):
        return type(cause)(f"{where}: {cause}")
    if isinstance(cause, OSError) and shard is not None:
        return shard_os_error(cause, *shard)
    lines = str(cause or exc).strip().splitlines()
    return MergeError(f"{where}: worker failed: {lines[-1] if lines else type(exc).__name__}")
