"""What a merge will cost before it runs, from tensor headers alone: memory per worker on the
compute device and in host RAM, SVD FLOPs, bytes read and written, and time.

Planning a 70B × 12 merge must not read 1.7 TB, so everything here is a model of the engine
over shapes: the working set of one tensor (the engine merges one tensor at a time, so a
worker's peak is its largest tensor's), the FLOPs of the spectral kernels, and a time at
stated rates: the CPU's measured here with a short probe, a GPU's assumed and labelled so.
A tensor whose working set exceeds the memory budget of its device is routed to the CPU
when that fits (with a note), else the plan fails naming the tensor.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .methods.linear import FusedSum

SPECTRAL_METHODS = frozenset({"star", "tsv", "iso_c", "iso_cts"})

# Working copies of a tensor in float32 at the peak of its merge, above the imports, by kind
# of method, from measured peaks of the largest tensor's merge (scripts/bench/compare.py and
# star_svd.py, 2026-12-03): STAR 4.6 (291M × 4, plus the Gram matrix); task arithmetic and
# average from LoRA factors take whole-tensor passes, about 5 (dense, they are streamed to the
# writer in pieces: FusedSum.working_bytes, a few MiB whatever the size); TIES 4.4-5.2 (N = 4,
# flat in N since its row blocks are cache-sized; 4.4-4.6 in results/compare_100m_io.json).
SPECTRAL_COPIES = 5.0
STREAMING_COPIES = 5.0
JOINT_COPIES = 5.0
# The engine's row blocks for joint methods (TIES), elements of all N models' blocks together:
# cache-sized on the CPU (1 MiB of float32: memory flat in N); on a GPU 64 MiB, since a block is
# one upload and a few kernel launches per model (a 4096×14336 tensor of 12 models: 42 blocks,
# not 4096), which a GPU holds easily: its block copies are counted on top (JOINT_BLOCK_COPIES).
JOINT_BLOCK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}
JOINT_BLOCK_COPIES = 5
# On a GPU the host keeps a pinned double buffer of one tensor's input (base + one model).
PINNED_BUFFERS = 2
# float64 (k, k) matrices a dense STAR holds: on the CPU G (and the tridiagonal form, within the
# measured copies); on a GPU G, eigh's eigenvectors and cuSOLVER's workspace, counted from the
# algorithm (not measured: no GPU was at hand).
GRAM_MATRICES = {"cpu": 1, "cuda": 3}


@dataclass(frozen=True)
class Rates:
    """The rates a time estimate assumes; shown beside every estimate made with them."""

    label: str
    gemm_flops: float  # float64 matrix products (the Gram matrix, projections), FLOP/s
    eig_flops: float  # symmetric eigenvalues / SVD values, FLOP/s
    read_bps: float  # input bytes per second, per worker
    write_bps: float  # output bytes per second, per worker
    elementwise: bool = True  # count the streaming kernels' per-element CPU time (ELEMENT_SECONDS)
    setup_s: float = 0.0  # once per merge, whatever its size

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "gemm_flops": self.gemm_flops, "eig_flops": self.eig_flops,
                "read_bytes_per_s": self.read_bps, "write_bytes_per_s": self.write_bps,
                "elementwise_seconds": ELEMENT_SECONDS if self.elementwise else {}, "setup_seconds": self.setup_s}


# A CPU worker's read and write rates and fixed cost per merge: calibrated with
# scripts/bench/compare.py (llama-shaped × 4 from a warm page cache, 1 thread, the 2-core
# development machine, 2026-12-04). The fixed cost is measured: the first merge in a process
# after the imports (lazy imports, thread pools, the report) takes 0.2 s on a near-empty
# model, 0.05 s after it. With it, one rate pair fits task arithmetic and average at 100M
# (1.1 s bf16, 1.6 s fp32) and at 300M (results/compare.json: 2.6-2.8 s bf16, 3.9-4.2 s fp32)
# to 0.85-1.14x. A cold disk or a network filesystem is slower (results/compare_cold.json:
# 0.46-0.54x), and says so by running slower than planned.
CPU_READ_BPS = 1.9e9
CPU_WRITE_BPS = 0.95e9
CPU_SETUP_SECONDS = 0.2
_IO_LABEL = (f"I/O {CPU_READ_BPS / 1e9:g} GB/s read, {CPU_WRITE_BPS / 1e9:g} GB/s write, as from a warm page cache, "
             f"+{CPU_SETUP_SECONDS:g} s per merge (calibrated; a cold disk is slower)")

# CPU seconds per element per fine-tune of the kernels that are not I/O-bound, calibrated
# with scripts/bench/compare.py as above: TIES' trim (radix select), sign election and
# disjoint mean, 15.5 ns beyond the I/O model at 100M (results/compare_100m_io.json), 18-20 ns
# at 300M (results/compare.json); 17.5 ns puts both within 0.87-1.12x. Task arithmetic and
# average sum in cache-sized blocks and fit the I/O model alone. Not counted on a GPU.
ELEMENT_SECONDS = {"ties": 17.5e-9}

# Heap a fused sum's worker holds beyond its buffers: the writer's and hasher's thread arenas
# and allocator slack, 1-5 MiB measured above FusedSum.working_bytes (compare.py, as above).
FUSED_OVERHEAD_BYTES = 4 << 20


# Assumed, not measured here (no GPU on the machine this was written on): an H100/H200-class
# GPU runs float64 GEMMs near 50 TFLOP/s, but a dense eigensolver far below that.
GPU_RATES = Rates("one H100-class GPU (assumed: 50 TFLOP/s float64 GEMM, 1 TFLOP/s eigensolver, "
                  "2 GB/s read, 1 GB/s write per worker)", 50e12, 1e12, 2e9, 1e9, elementwise=False)


# For ordering shards only (most expensive first): fixed, so that every process plans the
# same order (a measured rate varies from run to run); a CPU core's typical float64 rates.
ORDERING_CPU_RATES = Rates("a typical CPU core (assumed, for ordering shards)", 20e9, 2e9, 1e9, 0.5e9)


def ordering_rates(device: str) -> Rates:
    """The fixed rates shards are ordered by on `device` ("cpu", "cuda" or "auto")."""
    return ORDERING_CPU_RATES if device == "cpu" else GPU_RATES


@dataclass(frozen=True)
class TensorWork:
    """One output tensor as the estimate sees it (built by the planner from its job)."""

    name: str
    shape: tuple[int, ...]
    merge: bool  # False: copied from the base
    ranks: tuple[int | None, ...]  # per model: the LoRA rank, None for a dense task vector
    bytes_read: int
    bytes_out: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class DeviceEstimate:
    """The cost of the merge on one kind of device, per worker."""

    device: str  # "cpu" | "cuda"
    peak_device_bytes: int  # the largest working set on the compute device
    peak_host_bytes: int  # host RAM besides the mapped inputs (equal to the above on the CPU)
    seconds: float  # for the whole merge on `workers` workers
    rates: Rates

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "peak_device_bytes": self.peak_device_bytes,
                "peak_host_bytes": self.peak_host_bytes, "seconds": self.seconds, "rates": self.rates.to_dict()}


@dataclass(frozen=True)
class Estimate:
    """What `star-dist plan` states: per worker, for the CPU and a GPU, and the budget check."""

    workers: int
    svd_flops: float
    bytes_read: int
    bytes_written: int
    cpu: DeviceEstimate
    gpu: DeviceEstimate
    budget_bytes: int | None
    budget_source: str
    routed_to_cpu: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "svd_flops": self.svd_flops, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "cpu": self.cpu.to_dict(), "gpu": self.gpu.to_dict(),
                "budget_bytes": self.budget_bytes, "budget_source": self.budget_source,
                "routed_to_cpu": list(self.routed_to_cpu)}


def working_set(work: TensorWork, method: Any, n_models: int, device: str = "cuda") -> int:
    """Peak bytes on the compute device while merging one tensor.

    Args:
        work: the tensor.
        method: the merge method (a `MergeMethod`); one that states its own `working_bytes`
            (TSV-M, Iso) is asked, the others follow the copies scripts/bench/memory.py measured.
        n_models: how many fine-tunes are merged.
        device: "cpu" or "cuda" (a GPU holds one more input, in flight).
    Returns:
        Bytes.
    """
    if not work.merge:
        return work.bytes_out
    # On a GPU the next dense input is already on its way (device.Uploader): one more input;
    # not for the fused sum, which runs on the CPU on every device.
    fused = _fused(work, method)
    if fused and device == "cuda":
        return 0  # summed in host RAM (see _gpu_host_bytes), never on the GPU
    in_flight = work.bytes_read // (len(work.ranks) + 1) if device == "cuda" and None in work.ranks else 0
    return _compute_bytes(work, method, n_models, fused, device) + in_flight


def _fused(work: TensorWork, method: Any) -> bool:
    """Whether the merge engine sums this tensor with the fused CPU kernel (TensorMerger._fusable)."""
    return method.streaming and getattr(method, "identity", False) and all(r is None for r in work.ranks)


def _compute_bytes(work: TensorWork, method: Any, n_models: int, fused: bool, device: str) -> int:
    """The copies the merge itself holds (working_set without the upload in flight)."""
    f32 = 4 * work.numel
    if hasattr(method, "working_bytes"):
        return int(method.working_bytes(work.shape, n_models))
    if method.name in SPECTRAL_METHODS and len(work.shape) == 2:
        if all(r is not None for r in work.ranks):  # factor-wise: only the dense output is m×n
            m, n = work.shape
            return int(3 * f32 + 32 * (m + n) * sum(r or 0 for r in work.ranks))
        gram_matrices = GRAM_MATRICES["cuda" if device == "cuda" else "cpu"]
        return int(SPECTRAL_COPIES * f32 + gram_matrices * 8 * min(work.shape) ** 2)
    if fused:
        return FusedSum.working_bytes(work.numel, work.bytes_out // max(work.numel, 1)) + FUSED_OVERHEAD_BYTES
    if method.streaming:
        return int(STREAMING_COPIES * f32)
    block = min(JOINT_BLOCK_ELEMENTS["cuda"], n_models * work.numel)  # all models' rows of one block
    return int(JOINT_COPIES * f32) + (JOINT_BLOCK_COPIES * 4 * block if device == "cuda" else 0)


def spectral_flops(work: TensorWork) -> tuple[float, float]:
    """(GEMM FLOPs, eigensolver FLOPs) of the spectral kernels on one tensor, all models.

    A dense m×n task vector (k = min, M = max): the float64 Gram matrix of the small side,
    M·k² (one triangle, as SYRK forms it on the CPU; a GPU's blocked GEMMs do 1.25× that), and
    its eigenvalues, 4/3·k³; keeping the top-r subspace adds 4·M·k·r once r is known, which a
    plan cannot know (so this is a floor). A LoRA one: two QRs and an R×R SVD.
    """
    if not work.merge or len(work.shape) != 2:
        return 0.0, 0.0
    m, n = work.shape
    k, big = min(m, n), max(m, n)
    gemm = eig = 0.0
    for rank in work.ranks:
        if rank is None:
            gemm += 1.0 * big * k * k
            eig += 4.0 / 3.0 * k**3
        else:
            gemm += 4.0 * (m + n) * rank**2
            eig += 4.0 * rank**3
    return gemm, eig


@functools.lru_cache(maxsize=4)
def measured_cpu_rates(threads: int = 1, size: int = 512) -> Rates:
    """One CPU worker's rates on this machine, from a probe of a few milliseconds (float64
    GEMM and eigvalsh at `size` with `threads` torch threads, as a worker runs); disk rates
    are assumed, not probed. Cached per (threads, size) for the process.

    Args:
        threads: torch threads per worker during the probe.
        size: the probe matrices' side, (size, size) float64.
    Returns:
        The Rates: measured GEMM and eigenvalue FLOP/s, assumed read and write bytes/s, setup seconds.
    """
    import torch

    a = torch.randn(size, size, dtype=torch.float64)
    sym = a @ a.T
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gemm_s = _best_of(lambda: a @ a, 3)
        eig_s = _best_of(lambda: torch.linalg.eigvalsh(sym), 2)
    finally:
        torch.set_num_threads(before)
    return Rates(f"the CPU of this machine ({threads} thread(s) per worker, measured: GEMM, eigvalsh; {_IO_LABEL})",
                 2.0 * size**3 / gemm_s, 4.0 / 3.0 * size**3 / eig_s, CPU_READ_BPS, CPU_WRITE_BPS,
                 setup_s=CPU_SETUP_SECONDS)


def io_only_cpu_rates(threads: int = 1) -> Rates:
    """The CPU's rates for a merge without spectral FLOPs: only the (assumed) disk rates count,
    so nothing is probed (the probe costs 0.1 s, more than a small task-arithmetic plan)."""
    return Rates(f"the CPU of this machine ({threads} thread(s) per worker; no spectral FLOPs, so not probed; "
                 f"{_IO_LABEL})", 0.0, 0.0, CPU_READ_BPS, CPU_WRITE_BPS, setup_s=CPU_SETUP_SECONDS)  # 0: not probed


def _best_of(call: Any, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def default_budget(device: str) -> tuple[int | None, str]:
    """The memory one worker may use on `device` when the user states none: the device's
    memory as `accelerate.utils.get_max_memory` reports it on this machine (GPU 0 for cuda,
    available RAM for cpu); None for cuda on a machine without a GPU (the workers' GPUs are
    elsewhere: state --max-memory-per-worker to have them checked)."""
    memory = _max_memory()
    if device == "cpu":
        return memory.get("cpu"), "the available RAM of this machine"
    gpu = next((v for k, v in memory.items() if k != "cpu"), None)
    if gpu is None:
        return None, "unknown: no GPU on this machine (set --max-memory-per-worker)"
    return gpu, "GPU 0 of this machine"


@functools.lru_cache(maxsize=1)
def _max_memory() -> dict[Any, int]:
    """Memory per device, as accelerate reports it on a GPU machine; on a CPU-only one the
    same number (available RAM) without importing accelerate (0.3 s on every plan)."""
    import torch

    if torch.cuda.is_available():
        try:
            from accelerate.utils import get_max_memory
        except ImportError:
            pass
        else:
            return dict(get_max_memory())
    memory: dict[Any, int] = {"cpu": _available_ram()}
    for index in range(torch.cuda.device_count()):
        memory[index] = torch.cuda.mem_get_info(index)[0]
    return memory


def _available_ram() -> int:
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.virtual_memory().available)


def place_tensors(needs: dict[str, int], device: str, budget: int | None, cpu_budget: int | None) -> tuple[str, ...]:
    """The tensors that must run on the CPU because their working set exceeds the GPU budget.

    Args:
        needs: each merged tensor's working set in bytes.
        device: "cpu", "cuda" or "auto" (auto counts as cuda when a budget for it is known).
        budget: bytes per worker on `device`, None when unknown (nothing checked there).
        cpu_budget: bytes per worker in host RAM, None when unknown.
    Returns:
        The names routed to the CPU (empty on the CPU).
    Raises:
        ConfigError: a tensor fits neither its device nor, for a GPU, the CPU.
    """
    routed = []
    for name, need in needs.items():
        if budget is None or need <= budget:
            continue
        if device != "cpu" and (cpu_budget is None or need <= cpu_budget):
            routed.append(name)
            continue
        where = "on the CPU" if device == "cpu" else f"on {device}, and the CPU has {_gib(cpu_budget or 0)}"
        raise ConfigError(f"tensor {name} needs about {_gib(need)} to merge, more than the {_gib(budget)} "
                          f"per worker {where}: raise --max-memory-per-worker or use machines with more memory")
    return tuple(routed)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass(frozen=True)
class _Totals:
    gemm: float
    eig: float
    read: int
    written: int
    elementwise: float = 0.0  # CPU seconds of the streaming kernels (ELEMENT_SECONDS)

    def seconds(self, rates: Rates, workers: int) -> float:
        """Time with no overlap of compute and I/O (an upper bound for a balanced plan)."""
        compute = (self.gemm / rates.gemm_flops + self.eig / rates.eig_flops) if self.gemm or self.eig else 0.0
        if rates.elementwise:
            compute += self.elementwise
        return (compute + self.read / rates.read_bps
                + self.written / rates.write_bps) / max(workers, 1)


def _totals(works: list[TensorWork], method: Any) -> _Totals:
    """FLOPs, bytes and elementwise seconds of `works` under `method`."""
    flops = [spectral_flops(w) for w in works] if method.name in SPECTRAL_METHODS else []
    per_element = ELEMENT_SECONDS.get(method.name, 0.0)
    elementwise = per_element * sum(w.numel * len(w.ranks) for w in works if w.merge)
    return _Totals(sum(f[0] for f in flops), sum(f[1] for f in flops),
                   sum(w.bytes_read for w in works), sum(w.bytes_out for w in works), elementwise)


def work_seconds(works: list[TensorWork], method: Any, rates: Rates) -> float:
    """One worker's time for `works` at `rates`: the cost model's number for a shard, which
    the driver uses to hand out the most expensive shards first.

    Args:
        works: the shard's tensors.
        method: the merge method (a `MergeMethod`).
        rates: the device's rates.
    Returns:
        Seconds.
    """
    return _totals(works, method).seconds(rates, 1)


def estimate(works: list[TensorWork], method: Any, workers: int, device: str,
             budget: int | None = None, cpu_budget: int | None = None,
             cpu_rates: Rates | None = None, threads: int = 1) -> Estimate:
    """The whole merge's cost per worker on the CPU and on a GPU, and where each tensor runs.

    Args:
        works: every output tensor.
        method: the merge method (a `MergeMethod`).
        workers: how many workers share the work (time divides by it; memory does not).
        device: "cpu", "cuda" or "auto".
        budget: bytes per worker the user allows on the compute device; None: `default_budget`.
        cpu_budget: host RAM per worker for tensors routed off a GPU; None: `default_budget`.
        cpu_rates: the CPU's rates (default: measured now with `threads` threads).
        threads: torch threads per CPU worker.
    Returns:
        The estimate.
    Raises:
        ConfigError: a tensor fits nowhere.
    """
    n_models = max((len(w.ranks) for w in works), default=1)
    target = "cpu" if device == "cpu" else "cuda"
    on_cpu = {w.name: working_set(w, method, n_models, "cpu") for w in works if w.merge}
    on_gpu = {w.name: working_set(w, method, n_models, "cuda") for w in works if w.merge}
    budget, source = (budget, "--max-memory-per-worker") if budget is not None else default_budget(target)
    if cpu_budget is None:
        cpu_budget = budget if target == "cpu" else default_budget("cpu")[0]
    routed = place_tensors(on_cpu if target == "cpu" else on_gpu, target, budget, cpu_budget)
    totals = _totals(works, method)
    rates = cpu_rates or (measured_cpu_rates(threads) if totals.gemm or totals.eig else io_only_cpu_rates(threads))
    peak_cpu = max(on_cpu.values(), default=0)
    cpu = DeviceEstimate("cpu", peak_cpu, peak_cpu, totals.seconds(rates, workers) + rates.setup_s, rates)
    gpu = DeviceEstimate("cuda", max((v for k, v in on_gpu.items() if k not in routed), default=0),
                         _gpu_host_bytes(works, on_cpu, routed, on_gpu),
                         totals.seconds(GPU_RATES, workers) + GPU_RATES.setup_s, GPU_RATES)
    return Estimate(workers, totals.gemm + totals.eig, totals.read, totals.written, cpu, gpu,
                    budget, source, routed)


def _gpu_host_bytes(works: list[TensorWork], on_cpu: dict[str, int], routed: tuple[str, ...],
                    on_gpu: dict[str, int]) -> int:
    """Host RAM of a GPU worker: pinned buffers for one tensor's base + one model's input
    (bytes_read spread over base and models) of the tensors uploaded at all (the buffers grow
    on first use), or the working set of a tensor merged on the CPU (routed there, or a fused
    sum, which never goes to the GPU)."""
    uploaded = [w for w in works if on_gpu.get(w.name, 0) > 0 and w.name not in routed]
    one_pair = max((2 * w.bytes_read // (len(w.ranks) + 1) for w in uploaded), default=0)
    on_host = [on_cpu[name] for name in on_cpu if name in routed or on_gpu.get(name) == 0]
    return max(PINNED_BUFFERS * one_pair, max(on_host, default=0))
