"""MergePlan: from headers alone, check the inputs agree and cut the output into shard jobs.

Everything that can be wrong with the inputs is found here, before any heavy work and
before the output folder is touched. The plan is deterministic: sorted names, byte-sized
shards, so the output does not depend on how many workers run it or in which order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, resolve_model_folder
from .config import DTYPE_NAMES, MergeConfig, RunOptions
from .errors import ConfigError, InputError
from .estimate import SPECTRAL_METHODS, Estimate, Rates, TensorWork, estimate, ordering_rates, work_seconds
from .hub import HubFile, content_id, hub_files, is_hub_id
from .inputs import FullInput, LoraAdapter, LoraSource, absolute_source, open_input
from .lora import ADAPTER_FILE
from .mergekit_params import TensorParams, count_layers, resolve_tensor_params
from .methods import MergeMethod, get_method
from .output import package_version
from .safetensors_format import DTYPES, TensorEntry, TensorReader
from .verify import checked_base

Source = TensorEntry | LoraSource | None  # None: an adapter that does not touch this tensor
SINGLE_SHARD_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where its base and per-model inputs are, and its output dtype."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str  # safetensors dtype code
    base: TensorEntry
    models: tuple[Source, ...]
    merge: bool  # False: a non-float tensor, copied from the base
    adapter: bool = False  # True: the output is this module's merged LoRA factors
    params: TensorParams | None = None  # mergekit per-tensor values (gradients, filters); None: the shard's
    device: str | None = None  # "cpu": too big for the GPU budget (see estimate.py); None: the shard's

    @property
    def out_bytes(self) -> int:
        """Bytes written; for adapter factors an upper bound (STAR keeps at most each rank)."""
        itemsize = DTYPES[self.out_dtype][1]
        if self.adapter:
            m, n = self.shape
            ranks = sum(s.rank for s in self.models if isinstance(s, LoraSource))
            return (m + n) * max(ranks, 1) * itemsize
        return self.base.numel * itemsize


@dataclass(frozen=True)
class RunSpec:
    """What every shard of one run shares: the method and its weights, the numerics, where the
    output goes and the plan's fingerprint. One per plan, handed to workers beside each shard
    job (never copied into it). Small and picklable."""

    method: str
    method_params: tuple[tuple[str, Any], ...]
    model_params: tuple[tuple[tuple[str, Any], ...], ...]  # each model's own (TIES: density)
    weights: tuple[float, ...]  # resolved per model (the method's defaults filled in)
    lambda_: float
    compute_dtype: str
    out_dir: str
    threads: int  # torch threads per worker: LAPACK's bytes depend on it
    device: str  # as requested ("auto", "cpu", "cuda"); a Ray worker puts where it computes
    fingerprint: str
    output_format: str = "model"  # "model" | "adapter"


@dataclass(frozen=True)
class ShardJob:
    """The unit of work: write one output shard. Small and picklable (paths, not tensors);
    what it shares with the run's other shards is in the plan's `RunSpec`."""

    index: int
    file_name: str
    tensors: tuple[TensorJob, ...]
    cost: float  # relative compute cost, to hand out the most expensive shards first
    bytes_read: int
    bytes_out: int  # for an adapter: an upper bound (ranks are known only after STAR)
    hub_files: tuple[HubFile, ...] = ()  # the pinned hub files it reads, fetched by the worker's node


@dataclass
class MergePlan:
    """What `execute` will do, and what it will cost."""

    config: MergeConfig
    out_dir: Path
    base: Checkpoint
    inputs: list[FullInput | LoraAdapter]
    run: RunSpec  # what every shard shares
    shards: list[ShardJob]
    n_svds: int
    peak_memory_per_worker: int
    identity: dict[str, Any] = field(default_factory=dict)  # what the fingerprint covers, part by part
    warnings: list[str] = field(default_factory=list)
    estimate: Estimate | None = None  # memory per device, FLOPs, bytes and time (estimate.py)
    local_files: dict[str, int] = field(default_factory=dict)  # input files read by path: absolute path -> size

    @property
    def fingerprint(self) -> str:
        """The digest of what the output bytes depend on (`plan_identity`), as every shard records it."""
        return self.run.fingerprint

    @property
    def n_tensors(self) -> int:
        return sum(len(s.tensors) for s in self.shards)

    @property
    def input_folders(self) -> list[Path]:
        """The base's folder and every fine-tune's or adapter's folder."""
        folders = [i.folder if isinstance(i, LoraAdapter) else i.checkpoint.folder for i in self.inputs]
        return [self.base.folder, *folders]

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self.shards)

    @property
    def bytes_out(self) -> int:
        return sum(s.bytes_out for s in self.shards)

    def per_worker(self, workers: int) -> dict[str, int]:
        """The busiest worker's bytes when `workers` share the shards as the driver hands them
        out (most expensive first, each to the worker with the least work so far).

        Args:
            workers: how many workers run at once.
        Returns:
            {"workers", "bytes_read", "bytes_written"} of the worker that reads the most.
        """
        loads = [[0.0, 0, 0] for _ in range(max(1, min(workers, len(self.shards))))]  # cost, read, written
        for shard in sorted(self.shards, key=lambda j: (-j.cost, j.index)):
            load = min(loads, key=lambda w: w[0])
            load[0] += shard.cost
            load[1] += shard.bytes_read
            load[2] += shard.bytes_out
        busiest = max(loads, key=lambda w: w[1])
        return {"workers": len(loads), "bytes_read": int(busiest[1]), "bytes_written": int(busiest[2])}

    def summary(self) -> dict[str, Any]:
        """The dry-run report shown by `star-dist plan`."""
        return {
            "method": self.config.merge_method,
            "parameters": dict(self.config.parameters),
            "base_model": self.config.base_model,
            "models": [m.model for m in self.config.models],
            "input_kinds": [type(i).__name__ for i in self.inputs],
            "tensors": self.n_tensors,
            "tensors_merged": sum(t.merge for s in self.shards for t in s.tensors),
            "shards": [
                {"file": s.file_name, "tensors": len(s.tensors), "bytes": s.bytes_out} for s in self.shards
            ],
            "bytes_to_read": self.bytes_read,
            "bytes_to_write": self.bytes_out,
            "per_worker": self.per_worker(self.estimate.workers if self.estimate else 1),
            "svds": self.n_svds,
            "peak_memory_per_worker_bytes": self.peak_memory_per_worker,
            "estimate": self.estimate.to_dict() if self.estimate else None,
            "fingerprint": self.fingerprint,
            "warnings": self.warnings,
            **_memory_note(self.config.merge_method),
        }


def _memory_note(method: str) -> dict[str, str]:
    """What a fold method (TSV-M, Iso) holds per tensor, in words; nothing for the others."""
    note = getattr(get_method(method), "memory_note", "")
    return {"peak_memory_note": note} if note else {}


def natural_key(name: str) -> list[Any]:
    """Sort `layers.2` before `layers.10`, so shards follow the model's layer order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def build_plan(config: MergeConfig, out_dir: str | Path, options: RunOptions) -> MergePlan:
    """Index every input from its headers, check they agree, cut the output into shards, and
    state what the merge will cost (memory per device, FLOPs, bytes, time).

    Args:
        config: the validated merge config.
        out_dir: the output folder (made absolute, symlinks kept).
        options: how it will run (shard size, device, memory budget, workers).
    Returns:
        The plan; nothing is written.
    Raises:
        StarDistError: an input that is missing, inconsistent, or a tensor that fits no device.
    """
    method = get_method(config.merge_method, config.method_params(), config.model_method_params())
    out_dir = Path(os.path.abspath(out_dir))  # absolute and normalized, not resolved: symlinks stay
    base, inputs = _open_inputs(config, method)
    tensor_jobs = _tensor_jobs(config, base, inputs)
    cost = estimate(tensor_works(tensor_jobs), method, options.workers or 1, options.device,
                    options.max_memory_per_worker, threads=options.threads_per_worker)
    groups = _group_tensors(config, _placed(tensor_jobs, cost.routed_to_cpu), options.max_shard_size)
    hub = _hub_files(config, base, inputs)
    identity = plan_identity(config, options, base, inputs, groups, hub)
    shards = _shard_jobs(method, groups, hub, ordering_rates(options.device), config.output_format)
    return MergePlan(
        config=config,
        out_dir=out_dir,
        base=base,
        inputs=inputs,
        run=run_spec(config, method, out_dir, options, identity["fingerprint"]),
        shards=shards,
        identity=identity,
        n_svds=_svd_count([t for s in shards for t in s.tensors], config.merge_method),
        peak_memory_per_worker=cost.cpu.peak_device_bytes if options.device == "cpu" else cost.gpu.peak_device_bytes,
        estimate=cost,
        warnings=[*base.notes, *(n for inp in inputs if isinstance(inp, FullInput) for n in inp.checkpoint.notes),
                  *(f"{name} does not fit the GPU budget: merged on the CPU" for name in cost.routed_to_cpu)],
        local_files={f: os.stat(f).st_size for f in sorted(_files_of(tensor_jobs)) if f not in hub},
    )


def _open_inputs(config: MergeConfig, method: MergeMethod) -> tuple[Checkpoint, list[FullInput | LoraAdapter]]:
    """The base (checked against its own config.json) and every model, from headers."""
    folder = resolve_model_folder(absolute_source(config.base_model), weights=False)  # hub: headers only
    base = Checkpoint.from_folder(config.base_model, folder)
    base = checked_base(base)
    inputs = [open_input(m.model, base) for m in config.models]
    if config.output_dtype:
        _check_base_config(base)
    if config.output_format == "adapter":
        check_adapter_output(config, method, inputs)
    n_layers = count_layers(base.tensors)
    if config.layer_range is not None and config.layer_range != (0, n_layers):
        raise ConfigError(
            f"slices: layer_range {list(config.layer_range)} is not the whole model ([0, {n_layers}] for "
            f"{config.base_model}); star_dist merges whole models only"
        )
    return base, inputs


def _tensor_jobs(config: MergeConfig, base: Checkpoint, inputs: list[FullInput | LoraAdapter]) -> list[TensorJob]:
    """One job per base tensor, grouped by the base file it lives in; no model may add one."""
    out_dtype_code = DTYPE_NAMES[config.output_dtype] if config.output_dtype else None
    n_layers = count_layers(base.tensors)  # mergekit's gradients run over the layer index
    jobs = []
    for name in sorted(base.tensors, key=_by_input_file(base)):
        entry = base.tensors[name]
        sources = tuple(inp.source_for(name, entry) for inp in inputs)
        merge = entry.is_float
        if not merge:
            _check_identical_copies(name, entry, sources)
        out_dtype = (out_dtype_code or entry.dtype) if merge else entry.dtype
        params = (resolve_tensor_params(config, config.merge_method, name, n_layers)
                  if merge and config.per_tensor else None)
        jobs.append(TensorJob(name, entry.shape, out_dtype, entry, sources, merge, params=params))
    for inp in inputs:
        inp.check_no_extra(set(base.tensors))
    return jobs


def tensor_works(jobs: list[TensorJob]) -> list[TensorWork]:
    """The tensors as the cost model sees them."""
    return [TensorWork(j.name, j.shape, j.merge, tuple(s.rank if isinstance(s, LoraSource) else None
                                                       for s in j.models if s is not None),
                       _bytes_read(j), j.out_bytes) for j in jobs]


def _placed(jobs: list[TensorJob], on_cpu: tuple[str, ...]) -> list[TensorJob]:
    """The jobs, those too big for the GPU budget marked to run on the CPU."""
    routed = set(on_cpu)
    return [dataclasses.replace(j, device="cpu") if j.name in routed else j for j in jobs]


def _group_tensors(config: MergeConfig, jobs: list[TensorJob], max_shard_size: int) -> list[list[TensorJob]]:
    """Output shards: byte-sized groups, or one PEFT file of the modules some adapter adapts."""
    if config.output_format != "adapter":
        return _pack_shards(jobs, max_shard_size)
    out_dtype_code = DTYPE_NAMES[config.output_dtype] if config.output_dtype else None
    adapted = [t for t in jobs if any(isinstance(s, LoraSource) for s in t.models)]
    return [[_as_adapter_job(t, out_dtype_code) for t in adapted]]


def run_spec(config: MergeConfig, method: MergeMethod, out_dir: Path, options: RunOptions,
             fingerprint: str) -> RunSpec:
    """The run-wide part of every shard's work: method, resolved weights, numerics, output.

    Args:
        config: the validated merge config.
        method: the method built from it (it fills in the default weights).
        out_dir: the absolute output folder.
        options: the run options (threads_per_worker, device).
        fingerprint: the plan's fingerprint (`plan_identity`), recorded in every manifest.
    Returns:
        The RunSpec handed to workers beside each shard job.
    """
    return RunSpec(
        method=config.merge_method,
        method_params=tuple(sorted(config.method_params().items())),
        model_params=tuple(tuple(sorted(p.items())) for p in config.model_method_params()),
        weights=tuple(method.resolve_weights(config.model_weights())),
        lambda_=config.lambda_,
        compute_dtype=config.compute_dtype,
        out_dir=str(out_dir),
        threads=options.threads_per_worker,
        device=options.device,
        fingerprint=fingerprint,
        output_format=config.output_format,
    )


def _shard_jobs(method: MergeMethod, groups: list[list[TensorJob]], hub: dict[str, HubFile], rates: Rates,
                output_format: str) -> list[ShardJob]:
    """The picklable unit of work for each group of tensors; its cost is the cost model's
    time for it at `rates` (FLOPs and bytes), so the slowest shards are handed out first."""
    return [
        ShardJob(
            index=i,
            file_name=_shard_name(output_format, i, len(groups)),
            tensors=tuple(tensors),
            cost=work_seconds(tensor_works(tensors), method, rates),
            bytes_read=sum(_bytes_read(t) for t in tensors),
            bytes_out=sum(t.out_bytes for t in tensors),
            hub_files=tuple(hub[f] for f in sorted(_files_of(tensors)) if f in hub),
        )
        for i, tensors in enumerate(groups)
    ]


def _by_input_file(base: Checkpoint) -> Any:
    """Sort key: tensors grouped by the base file they live in (files in natural order), then
    by name, so each output shard reads few input files (one download each per node)."""
    rank = {f: i for i, f in enumerate(sorted({e.file for e in base.tensors.values()}, key=natural_key))}
    return lambda name: (rank[base.tensors[name].file], natural_key(name))


def _files_of(tensors: list[TensorJob] | tuple[TensorJob, ...]) -> set[str]:
    """Every input file the tensors read (base and each model's entries or LoRA factors)."""
    files = set()
    for t in tensors:
        files.add(t.base.file)
        for src in t.models:
            if isinstance(src, LoraSource):
                files |= {src.a.file, src.b.file}
            elif src is not None:
                files.add(src.file)
    return files


def _hub_files(config: MergeConfig, base: Checkpoint, inputs: list[FullInput | LoraAdapter]) -> dict[str, HubFile]:
    """driver path -> HubFile, for the inputs given as hub ids (pinned: their snapshot's commit)."""
    sources = [(config.base_model, base.folder, base.tensors.values())]
    for spec, inp in zip(config.models, inputs, strict=True):
        folder = inp.folder if isinstance(inp, LoraAdapter) else inp.checkpoint.folder
        sources.append((spec.model, folder, inp.entries()))
    out: dict[str, HubFile] = {}
    for source, folder, entries in sources:
        if is_hub_id(source):
            repo_id = source.partition("@")[0]
            out.update((f.driver_path, f) for f in hub_files(repo_id, folder, {e.file for e in entries}))
    return out


def _shard_name(output_format: str, index: int, count: int) -> str:
    if output_format == "adapter":
        return ADAPTER_FILE
    return SINGLE_SHARD_NAME if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def check_adapter_output(config: MergeConfig, method: MergeMethod, inputs: list[FullInput | LoraAdapter]) -> None:
    """An adapter output holds only low-rank updates: every input must be a pure LoRA
    adapter, and the method must keep low-rank updates low-rank (not TIES).

    Args:
        config: the merge config, with output_format "adapter".
        method: the merge method (a non-streaming one, TIES, cannot produce an adapter).
        inputs: the opened fine-tunes and adapters, in model order.
    Raises:
        ConfigError: a method that cannot produce an adapter.
        InputError: a full checkpoint, an adapter with full tensors, or adapters that disagree on fan_in_fan_out.
    """
    if not method.streaming:
        raise ConfigError(
            f"output_format adapter: {config.merge_method} cannot produce an adapter (its element-wise "
            "trim and sign election are not low-rank); use star, task_arithmetic, average, tsv, iso_c or iso_cts"
        )
    layouts = set()
    for inp in inputs:
        if not isinstance(inp, LoraAdapter):
            raise InputError(
                f"{inp.checkpoint.folder}: output_format adapter needs LoRA adapter inputs, "
                "but this is a full checkpoint; use output_format model"
            )
        full = sorted(name for name, src in inp.sources.items() if not isinstance(src, LoraSource))
        if full:
            raise InputError(
                f"{inp.folder / ADAPTER_FILE}: tensor {full[0]!r} is a full tensor (modules_to_save or a "
                "trained bias), which a LoRA adapter output cannot carry; use output_format model"
            )
        layouts.add(bool(inp.config.get("fan_in_fan_out")))
    if len(layouts) > 1:
        raise InputError("output_format adapter: the adapters disagree on fan_in_fan_out")


def _check_base_config(base: Checkpoint) -> None:
    """A changed output dtype is recorded in the base's config.json: it must parse."""
    path = base.folder / "config.json"
    if not path.exists():
        return
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); it is copied to the output with its dtype updated") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(config).__name__}")


def _as_adapter_job(job: TensorJob, out_dtype_code: str | None) -> TensorJob:
    """The module's merged factors: dtype of the adapters (or out_dtype), same sources."""
    first = next(s for s in job.models if isinstance(s, LoraSource))
    return TensorJob(job.name, job.shape, out_dtype_code or first.a.dtype, job.base, job.models, True, adapter=True,
                     params=job.params)


def _check_identical_copies(name: str, entry: TensorEntry, sources: tuple[Source, ...]) -> None:
    """Non-float tensors (position ids, masks) are copied, so every input must agree."""
    with TensorReader() as reader:
        expected = reader.read(entry)
        for src in sources:
            if src is None or isinstance(src, LoraSource):
                continue
            if src.dtype != entry.dtype:
                raise InputError(
                    f"{src.file}: tensor {name!r} has dtype {src.dtype}, the base has {entry.dtype} "
                    f"({entry.file}); non-float tensors are copied and must match"
                )
            if not torch.equal(reader.read(src), expected):
                raise InputError(
                    f"{src.file}: tensor {name!r} ({entry.dtype}, not a float) differs from the base's "
                    f"({entry.file}); non-float tensors are copied and must be identical in all inputs"
                )


def _pack_shards(jobs: list[TensorJob], max_bytes: int) -> list[list[TensorJob]]:
    """Greedy packing in the planned order (grouped by the base's input file); a tensor larger
    than the limit gets a shard of its own. A shard at least half full also ends where the
    base's input file changes, so each shard reads few input files (and a node fetching hub
    files downloads few), without making shards much smaller than the limit."""
    groups: list[list[TensorJob]] = []
    current: list[TensorJob] = []
    size = 0
    for job in jobs:
        new_file = bool(current) and job.base.file != current[-1].base.file
        if current and (size + job.out_bytes > max_bytes or (new_file and 2 * size >= max_bytes)):
            groups.append(current)
            current, size = [], 0
        current.append(job)
        size += job.out_bytes
    if current:
        groups.append(current)
    return groups


def _bytes_read(job: TensorJob) -> int:
    total = job.base.nbytes
    for src in job.models:
        if isinstance(src, TensorEntry):
            total += src.nbytes
        elif isinstance(src, LoraSource):
            total += src.a.nbytes + src.b.nbytes
    return total


def _svd_count(jobs: list[TensorJob], method: str) -> int:
    """Spectral decompositions the merge runs: one per task vector of each merged matrix."""
    if method not in SPECTRAL_METHODS:
        return 0
    return sum(1 for t in jobs if t.merge and len(t.shape) == 2 for src in t.models if src is not None)


# The layout of this identity and the numerics behind the bytes: bump it whenever the same
# inputs would give other bytes (4: STAR's values from the float64 Gram matrix; 5: its top
# vectors from one tridiagonal reduction, τ read in float64 blocks in its own layout; 6: the
# Gram matrix by SYRK, the top vectors by inverse iteration where it pays), so a resume never
# mixes shards computed by two versions of a kernel.
FORMAT = 6


def plan_identity(
    config: MergeConfig,
    options: RunOptions,
    base: Checkpoint,
    inputs: list[Any],
    groups: list[list[TensorJob]],
    hub: dict[str, HubFile] | None = None,
) -> dict[str, Any]:
    """What the output bytes depend on, part by part, and its digest (`fingerprint`): config,
    numerics settings, input files, shard layout, and star_dist's version. Kept part by part
    so a refused resume can say what changed. A file counts as unchanged while its size,
    mtime and ctime are: hashing terabytes of inputs on every resume would cost more than
    the merge, and ctime, unlike mtime, cannot be set back by hand after an in-place edit.

    Files are named by what they are, not by how they were spelled: a local file by its
    absolute path, a hub file by repo, commit and file name (with its size and blob hash), so
    the same merge started from another directory, or on a node with another cache, resumes.
    The device is not here: each shard's manifest records the one it ran on, and a resume
    redoes shards computed on another device (`--device auto` is a request, not an identity).

    Args:
        config: the validated merge config.
        options: the run options (only threads_per_worker changes the bytes).
        base: the base checkpoint.
        inputs: the opened fine-tunes and adapters, in model order.
        groups: the tensor jobs, grouped into output shards.
        hub: driver path -> HubFile for inputs read from the hub; None: every file is local.
    Returns:
        {"star_dist", "config", "settings", "files", "shards", "lora", "format", "fingerprint"}; the
        fingerprint is the SHA-256 hex digest of the other parts.
    """
    hub = hub or {}
    files: dict[str, Any] = {}
    for entry in [*base.tensors.values(), *(e for inp in inputs for e in inp.entries())]:
        key = hub[entry.file].uri if entry.file in hub else entry.file
        if key not in files:
            files[key] = content_id(hub[entry.file]) if entry.file in hub else _stat_id(entry.file)
    parts = {
        "star_dist": package_version(),
        "config": _digest(_config_identity(config)),
        "settings": {"threads": options.threads_per_worker},
        "files": files,
        "shards": _digest([[t.name for t in g] for g in groups]),
        "lora": _digest([inp.scales() for inp in inputs if isinstance(inp, LoraAdapter)]),
        "format": FORMAT,
    }
    return {**parts, "fingerprint": _digest(parts)}


def _config_identity(config: MergeConfig) -> dict[str, Any]:
    """The config as data, each local path absolute: spelled from any directory, one identity."""
    data = config.to_dict()
    data["base_model"] = absolute_source(config.base_model)
    data["models"] = [{**m, "model": absolute_source(m["model"])} for m in data["models"]]
    return data


def _stat_id(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def plan_to_json(plan: MergePlan) -> str:
    return json.dumps(plan.summary(), indent=2, default=str)
