"""Merge one tensor: read the base and each input lazily, form task vectors, apply a method.

`W = W_base + λ · Σ_i w_i f(τ_i)` for streaming methods (one task vector in memory at a
time); row blocks of all task vectors at once for joint methods (TIES), after a first pass
that lets each model's whole task vector set its own statistics (trim threshold); for fold
methods (TSV-M, Iso-C, Iso-CTS) `W = W_base + λ · finish(fold of every τ_i)`, still one task
vector in memory at a time, in as many passes as the method needs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .device import Uploader
from .device import resolve_device as resolve_device  # the shard runner's import; device.py owns it
from .errors import DataError, InputError, MergeError
from .estimate import JOINT_BLOCK_ELEMENTS
from .finite import all_finite, finite
from .lora import LoraSource
from .mergekit_params import method_for
from .methods.base import JointMethod, LowRank, MergeMethod, StreamingMethod, TaskVector, dense
from .methods.fold import FoldMethod
from .methods.linear import FusedSum, StagingBuffers, subtract_upcast
from .planner import Source, TensorJob
from .safetensors_format import DTYPES, FileShrank, StreamingShardWriter, TensorEntry, TensorReader

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
Put = Callable[[torch.Tensor], None]  # takes the next flat piece of the tensor being written


class TensorMerger:
    """Merges the tensors of one shard with one method, reading through one TensorReader."""

    def __init__(
        self,
        method: MergeMethod,
        weights: tuple[float, ...],
        lambda_: float,
        reader: TensorReader,
        device: torch.device,
        compute_dtype: str = "float32",
        uploader: Uploader | None = None,
    ) -> None:
        self.method = method
        self.weights = weights
        self.lambda_ = lambda_
        self.reader = reader
        self.device = device
        self.config_dtype = COMPUTE_DTYPES[compute_dtype]
        self.dtype = self.config_dtype
        # On a GPU: pinned buffers and a side stream, so model i+1's input is copied while
        # model i's task vector is merged (device.py). On the CPU it hands tensors through.
        self.uploader = uploader if uploader is not None else Uploader(device)
        # A streamed fused sum's two piece buffers, kept from tensor to tensor (FusedSum.stream).
        self.staging = StagingBuffers()

    # -- mergekit per-tensor values (TensorJob.params, resolved by the plan) ---------------------
    def merge(self, job: TensorJob) -> tuple[torch.Tensor, dict[str, Any]]:
        """`_merge` with this tensor's own method parameters, weights and λ when it has any."""
        with self._tensor_params(job):
            out, report = self._merge(job)
        assert out is not None  # only a merge given `put` streams its output away
        return out, report

    def merge_into(self, job: TensorJob, writer: StreamingShardWriter) -> dict[str, Any]:
        """Merge `job` and append it to `writer`; returns its report entry.

        A fused sum is handed to the writer in pieces as it is computed (FusedSum.stream),
        so its output tensor never exists whole; any other merge is written whole.
        """
        with self._tensor_params(job), writer.tensor(job.name) as put:
            out, report = self._merge(job, put)
            if out is not None:
                put(out.reshape(-1))
        return report

    def merge_factors(self, job: TensorJob) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """`_merge_factors` with this tensor's own values when it has any."""
        with self._tensor_params(job):
            return self._merge_factors(job)

    @contextmanager
    def _tensor_params(self, job: TensorJob) -> Iterator[None]:
        """This tensor's own values, and its own device when the plan routed it to the CPU
        (its working set exceeds the GPU budget, see estimate.py); a read past a shrunk
        input's end is reported with the tensor's name."""
        saved = self.method, self.weights, self.lambda_, self.device
        if job.params is not None:
            self.method = method_for(self.method.name, job.params)
            self.weights, self.lambda_ = job.params.weights, job.params.lambda_
        if job.device is not None:
            self.device = torch.device(job.device)
        try:
            yield
        except FileShrank as exc:  # the reader knows the file, the job the tensor's name
            raise InputError(exc.describe(job.name)) from None
        finally:
            self.method, self.weights, self.lambda_, self.device = saved

    def _merge(self, job: TensorJob, put: Put | None = None) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """The merged tensor in its output dtype (on the CPU) and its report entry; with `put`,
        a fused sum goes to `put` in pieces instead (and the tensor returned is None)."""
        start = time.perf_counter()
        if not job.merge:  # non-float: checked identical in plan, copied from the base
            return self.reader.read(job.base), {"method": "copy"}
        # Never compute below the inputs' precision: float64 tensors stay float64.
        self.dtype = torch.float64 if job.base.dtype == "F64" else self.config_dtype
        out: torch.Tensor | None
        if self._fusable(job):
            out, stats = self._merge_fused(job, put), {}
        else:
            out, stats = self._merge_unfused(job)
        report: dict[str, Any] = {"method": self.method.name, "seconds": round(time.perf_counter() - start, 6)}
        report.update(stats)
        return out, report

    def _merge_unfused(self, job: TensorJob) -> tuple[torch.Tensor, dict[str, Any]]:
        """Whole-tensor passes: any method, any device, LoRA sources."""
        base = self._load(job.base, job.name)  # (shape), compute dtype
        if isinstance(self.method, FoldMethod):
            update, stats = self._fold(job, base)
            merged = base if update is None else _accumulate(base, update, self.lambda_)
        elif isinstance(self.method, StreamingMethod):
            merged, per_model = self._merge_streaming(job, base)
            stats = _collate(per_model)
        elif isinstance(self.method, JointMethod):
            merged, stats = self._merge_joint(job, base), {}
        else:  # pragma: no cover - the registry only holds these three kinds
            raise TypeError(type(self.method))
        out = merged.to(DTYPES[job.out_dtype][0])
        if not finite(out):  # a NaN or Inf in `merged` stays one in `out`: one check on the happy path
            if not all_finite(merged):
                raise DataError(_merged_not_finite(job.name))
            raise DataError(_overflow(job))
        return out.cpu(), stats

    # -- fused: base + λ Σ w_i τ_i in one pass over the mapped inputs --------------------------
    def _fusable(self, job: TensorJob) -> bool:
        """Task arithmetic and average of dense inputs: the fused CPU sum, on every device. They
        are I/O-bound (a few flops per byte read), so a GPU would add a host→device→host round
        trip and whole-tensor copies in its memory for no speed; the maps are read once here."""
        return (
            isinstance(self.method, StreamingMethod)
            and self.method.identity
            and all(isinstance(src, TensorEntry) for src in job.models)
        )

    def _merge_fused(self, job: TensorJob, put: Put | None) -> torch.Tensor | None:
        """`FusedSum` straight from the read-only maps: no float32 copy of any whole input, and
        with `put` no whole output either (None is returned)."""
        entries = [job.base, *job.models]
        flat = [self.reader.read(entry).reshape(-1) for entry in entries]  # (numel,) stored dtype
        out_dtype = DTYPES[job.out_dtype][0]
        fused = FusedSum(self.dtype)
        out = None
        if put is None:
            out = fused.run(torch.empty(job.base.numel, dtype=out_dtype), flat[0], flat[1:],
                            list(self.weights), self.lambda_)
        else:
            fused.stream(flat[0], flat[1:], list(self.weights), self.lambda_, out_dtype, put, staging=self.staging)
        if not (fused.merged_ok and fused.out_ok):
            for entry, values in zip(entries, flat, strict=True):  # which input, in the unfused order
                if not all_finite(values):
                    raise DataError(_input_not_finite(entry, job.name))
            raise DataError(_merged_not_finite(job.name) if not fused.merged_ok else _overflow(job))
        return None if out is None else out.view(job.shape)

    def _merge_factors(self, job: TensorJob) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The merged update λ Σ_i w_i f(τ_i) of one LoRA-adapted module as PEFT factors
        (lora_B (out, R), lora_A (R, in)) with R = Σ kept ranks: exact, never formed densely."""
        start = time.perf_counter()
        self.dtype = self.config_dtype
        if isinstance(self.method, FoldMethod):
            return self._fold_factors(job, start)
        lefts, rights, per_model = [], [], []
        for weight, src in zip(self.weights, job.models, strict=True):
            if src is None:
                per_model.append(None)
                continue
            assert isinstance(src, LoraSource), "planned adapter jobs hold only LoRA sources"
            update, stats = self.method.transform(self._lora_factors(src, job.name))
            if not isinstance(update, LowRank):
                raise MergeError(f"tensor {job.name!r}: {self.method.name} did not keep the update low-rank")
            lefts.append(update.left.mul(weight * self.lambda_))  # (m, r_i)
            rights.append(update.right)  # (r_i, n)
            per_model.append(stats)
        m, n = job.shape
        left = torch.cat(lefts, dim=1) if lefts else torch.zeros(m, 0, device=self.device)  # (m, R)
        right = torch.cat(rights, dim=0) if rights else torch.zeros(0, n, device=self.device)  # (R, n)
        return self._adapter_factors(job, left, right, start, _collate(per_model))

    def _fold_factors(self, job: TensorJob, start: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """A fold method's λ·Δ of one LoRA-adapted module, from the adapters' factors only."""
        update, stats = self._fold(job, None)
        if update is None or not isinstance(update, LowRank):
            raise MergeError(f"tensor {job.name!r}: {self.method.name} did not keep the update low-rank")
        return self._adapter_factors(job, update.left.mul(self.lambda_), update.right, start, stats)

    def _adapter_factors(
        self, job: TensorJob, left: torch.Tensor, right: torch.Tensor, start: float, stats: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """PEFT's (lora_B, lora_A) for the update left @ right, in the job's dtype, and the report entry."""
        m, n = job.shape
        if left.shape[1] == 0:  # nothing kept: a rank-1 zero update keeps PEFT's layout valid
            left, right = torch.zeros(m, 1, device=self.device), torch.zeros(1, n, device=self.device)
        fan_in_fan_out = any(isinstance(s, LoraSource) and s.fan_in_fan_out for s in job.models)
        # PEFT: τ = B @ A, or (B @ A)ᵀ when the base stores (in, out) (fan_in_fan_out).
        lora_b, lora_a = (right.T, left.T) if fan_in_fan_out else (left, right)
        torch_dtype = DTYPES[job.out_dtype][0]
        report: dict[str, Any] = {"method": self.method.name, "seconds": round(time.perf_counter() - start, 6)}
        report.update(stats)
        report["adapter_rank"] = lora_a.shape[0]
        return lora_b.to(torch_dtype).contiguous().cpu(), lora_a.to(torch_dtype).contiguous().cpu(), report

    # -- streaming: base + λ Σ w_i f(τ_i) ---------------------------------------------------
    def _merge_streaming(
        self, job: TensorJob, base: torch.Tensor
    ) -> tuple[torch.Tensor, list[dict[str, Any] | None]]:
        assert isinstance(self.method, StreamingMethod)
        acc = torch.zeros_like(base)  # (shape): Σ w_i f(τ_i)
        per_model: list[dict[str, Any] | None] = []
        for weight, tau in zip(self.weights, self._task_vectors(job, base), strict=True):
            if tau is None:
                per_model.append(None)
                continue
            update, stats = self.method.transform(tau)
            _accumulate(acc, update, weight)
            per_model.append(stats)
            del tau, update
        return base.add_(acc, alpha=self.lambda_), per_model

    # -- fold: every τ_i folded into the method's state, one at a time, pass by pass --------------
    def _fold(self, job: TensorJob, base: torch.Tensor | None) -> tuple[TaskVector | None, dict[str, Any]]:
        """Δ = finish() of the method's fold over every model's τ (None when no model has the
        tensor); `base` is None for an adapter job, whose sources are all LoRA factors."""
        assert isinstance(self.method, FoldMethod)
        fold = self.method.fold(job.shape, len(job.models))
        if all(src is None for src in job.models):
            return None, {}
        for step in range(fold.passes):
            for i, (weight, tau) in enumerate(zip(self.weights, self._task_vectors(job, base), strict=True)):
                if tau is not None:
                    fold.add(tau, weight, i, step)
                del tau
        return fold.finish()

    # -- joint: row blocks of every τ_i at once ------------------------------------------------
    def _merge_joint(self, job: TensorJob, base: torch.Tensor) -> torch.Tensor:
        assert isinstance(self.method, JointMethod)
        prepared = []
        for i, tau in enumerate(self._task_vectors(job, base)):  # pass 1: per-model statistics of whole τ
            prepared.append(self.method.prepare(dense(tau) if tau is not None else torch.zeros_like(base), i))
            del tau
        # Entries per row from the shape, not base[0]: a tensor with no rows ((0, n), (0,)) has
        # no blocks to merge and must not be indexed; a zero-width one ((m, 0)) has empty rows.
        row_numel = math.prod(base.shape[1:])
        if base.dim() == 0:
            blocks = [None]
        else:
            rows = base.shape[0]
            per_block = JOINT_BLOCK_ELEMENTS["cuda" if self.device.type == "cuda" else "cpu"]
            step = max(1, per_block // max(row_numel * len(job.models), 1))
            blocks = [(a, min(a + step, rows)) for a in range(0, rows, step)]
        for block in blocks:  # pass 2: the same rows of every model
            base_block = base if block is None else base[block[0] : block[1]]
            taus = [self._task_vector_block(src, base_block, job.name, block) for src in job.models]
            offset = 0 if block is None else block[0] * row_numel
            update = self.method.merge_block(taus, list(self.weights), prepared, offset)
            base_block.add_(update, alpha=self.lambda_)
        return base

    # -- reading -------------------------------------------------------------------------------
    def prefetch(self, job: TensorJob) -> None:
        """Start reading every input of `job` in the background (kernel readahead)."""
        for src in (job.base, *job.models):
            if isinstance(src, LoraSource):
                self.reader.advise(src.a)
                self.reader.advise(src.b)
            elif src is not None:
                self.reader.advise(src)

    def _load(
        self, entry: TensorEntry, name: str, rows: tuple[int, int] | None = None, check: bool = True
    ) -> torch.Tensor:
        """A private copy in the compute dtype on the device (the read itself is a read-only view);
        `check=False` for row blocks of a tensor already checked whole."""
        raw = self.reader.read(entry, rows)
        value = raw.to(self.device, self.dtype, copy=True)
        if check and not finite(value):
            raise DataError(_input_not_finite(entry, name))
        return value

    def _task_vectors(self, job: TensorJob, base: torch.Tensor | None) -> Iterator[TaskVector | None]:
        """Each model's τ_i, in order (None where a model lacks the tensor). On a GPU the dense
        inputs go through the uploader in their stored dtype: the next one's copy is started
        before this one is handed out, so it overlaps this one's merge (an SVD, a sum)."""
        if not self.uploader.on_gpu or job.device is not None or base is None:  # CPU, or routed to it
            for src in job.models:
                yield self._task_vector(src, base, job.name)  # type: ignore[arg-type]
            return
        dense = [src for src in job.models if isinstance(src, TensorEntry)]
        uploaded = self.uploader.stream_of((lambda src=src: self.reader.read(src)) for src in dense)
        for src in job.models:
            if isinstance(src, TensorEntry):
                value = next(uploaded).to(self.dtype)  # a private device tensor: converted there
                if not finite(value):
                    raise DataError(_input_not_finite(src, job.name))
                yield value.sub_(base)
            else:
                yield self._task_vector(src, base, job.name)

    def _task_vector(self, src: Source, base: torch.Tensor, name: str) -> TaskVector | None:
        if src is None:
            return None
        if isinstance(src, LoraSource):
            return self._lora_factors(src, name)
        return self._load(src, name).sub_(base)  # τ = W_i − W_base

    def _task_vector_block(
        self, src: Source, base_block: torch.Tensor, name: str, rows: tuple[int, int] | None
    ) -> torch.Tensor:
        if src is None:
            return torch.zeros_like(base_block)
        if isinstance(src, LoraSource):
            low = self._lora_factors(src, name)
            left = low.left if rows is None else low.left[rows[0] : rows[1]]
            return left @ low.right  # (rows, n): only this block is formed
        # Checked whole in pass 1; read, upcast and subtract in one pass where that is exact.
        if self.device.type != "cpu":
            return self._load(src, name, rows, check=False).sub_(base_block)
        return subtract_upcast(self.reader.read(src, rows), base_block, torch.empty_like(base_block))

    def _lora_factors(self, src: LoraSource, name: str) -> LowRank:
        a = self._load(src.a, name + " (lora_A)")  # (r, in)
        b = self._load(src.b, name + " (lora_B)")  # (out, r)
        if src.fan_in_fan_out:  # the base stores (in, out): τ = s·(B A)ᵀ = s·Aᵀ Bᵀ
            return LowRank(a.T.mul(src.scale), b.T.contiguous())
        return LowRank(b.mul_(src.scale), a)


def _input_not_finite(entry: TensorEntry, name: str) -> str:
    return f"{entry.file}: tensor {name!r} contains NaN or Inf; the input is corrupt"


def _merged_not_finite(name: str) -> str:
    return f"tensor {name!r}: the merged result has NaN or Inf (check λ and weights)"


def _overflow(job: TensorJob) -> str:
    return f"tensor {job.name!r}: the merged values overflow {job.out_dtype}; use a wider out_dtype"


def _accumulate(acc: torch.Tensor, update: TaskVector, weight: float) -> torch.Tensor:
    """acc += weight · update, without forming a LowRank update densely in a separate tensor."""
    if isinstance(update, LowRank):
        return acc.addmm_(update.left.to(acc), update.right.to(acc), alpha=weight)  # (m, r) @ (r, n)
    return acc.add_(update.to(acc), alpha=weight)


def _collate(per_model: list[dict[str, Any] | None]) -> dict[str, list[Any]]:
    """[{kept_rank: 3, ...}, None, ...] -> {kept_rank: [3, None, ...], ...} for the report."""
    keys: list[str] = []
    for stats in per_model:
        for key in stats or {}:
            if key not in keys:
                keys.append(key)
    return {key: [None if s is None else s.get(key) for s in per_model] for key in keys}
