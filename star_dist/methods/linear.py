"""Task arithmetic and plain weight averaging: the identity transform, differing in weights.

Both are `W = W_base + λ Σ_i w_i τ_i`. Task arithmetic takes the weights as given (a missing
weight is 1, as mergekit's `task_arithmetic`); average normalizes them to sum to 1, so with
λ = 1 it is `Σ_i w_i W_i / Σ_i w_i`, mergekit's `linear` with its default `normalize: true`
(equal weights give the plain mean of the fine-tuned models). Both take mergekit's
`normalize` flag: task arithmetic divides by Σ w_i when it is true (default false; a sum
below 1e-8 in magnitude divides by 1, as mergekit), average sums without dividing when false.
A sum that is ~0 next to the weights' size (|Σw| ≤ 1e-6·Σ|w|, e.g. 0.1 + 0.2 − 0.3) and
would be divided by is refused at plan time: mergekit divides by it and scales the merge by ~1e16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from star_dist.methods.base import StreamingMethod, TaskVector
from star_dist.methods.params import as_flag, sums_to_zero, zero_sum_error


@dataclass(frozen=True)
class TaskArithmeticParams:
    """normalize: divide the weighted sum by Σ w_i (mergekit's flag; off by default)."""

    normalize: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "normalize", as_flag("task_arithmetic", "normalize", self.normalize))


@dataclass(frozen=True)
class AverageParams:
    """normalize: divide by Σ w_i, so the weights sum to 1 (mergekit's `linear`; on by default)."""

    normalize: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "normalize", as_flag("average", "normalize", self.normalize))


class _Identity(StreamingMethod):
    """f(τ) = τ: the engine's weighted sum does all the work (fused: `FusedSum`)."""

    Params: ClassVar[type]
    identity: ClassVar[bool] = True

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    def params_dict(self) -> dict[str, Any]:
        return asdict(self.params)

    def transform(self, tau: TaskVector) -> tuple[TaskVector, dict[str, Any]]:
        """The task vector itself (dense or `LowRank`), no stats."""
        return tau, {}


class TaskArithmetic(_Identity):
    """W = W_base + λ Σ_i w_i τ_i, a missing weight being 1."""

    name: ClassVar[str] = "task_arithmetic"
    Params: ClassVar[type] = TaskArithmeticParams
    reference: ClassVar[str] = (
        "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, https://arxiv.org/abs/2212.04089"
    )

    def resolve_weights(self, given: list[float | None]) -> list[float]:
        """The weights as given (a missing one is 1); with normalize, over their sum.

        |Σw| < 1e-8 divides by 1, as mergekit (its normalize then does nothing); a larger sum
        that is still ~0 next to the weights is refused, where mergekit would blow up.
        """
        raw = super().resolve_weights(given)
        if not self.params.normalize:
            return raw
        total = sum(raw)
        if abs(total) < 1e-8:
            return raw
        if sums_to_zero(raw):
            raise zero_sum_error(self.name, raw, "give weights whose sum is not ~0, or normalize: false")
        return [w / total for w in raw]


class Average(_Identity):
    """The weighted mean of the models: task arithmetic with weights normalized to sum to 1."""

    name: ClassVar[str] = "average"
    Params: ClassVar[type] = AverageParams
    reference: ClassVar[str] = (
        "Wortsman et al., Model soups: averaging weights of multiple fine-tuned models "
        "improves accuracy without increasing inference time, ICML 2022, "
        "https://arxiv.org/abs/2203.05482"
    )

    def resolve_weights(self, given: list[float | None]) -> list[float]:
        """w_i / Σ w_j with a missing weight = 1; ConfigError if the weights sum to ~0.

        ~0 is relative (`sums_to_zero`): 0.1, 0.2, −0.3 sum to 5.6e-17, not 0, and would
        scale the mean by ~1e16. Raised while planning, before anything is written.
        """
        raw = super().resolve_weights(given)
        if not self.params.normalize:
            return raw
        if sums_to_zero(raw):
            raise zero_sum_error(
                self.name, raw, "give weights with a non-zero sum, or normalize: false with a base_model"
            )
        total = sum(raw)
        return [w / total for w in raw]


# Elements per step of the fused sum: three float32 scratch blocks of 512 KiB stay in a
# core's L2 cache, so each input byte goes from the page cache through the cache once.
FUSED_CHUNK = 1 << 17
# Elements per staging buffer of a streamed sum (FusedSum.stream): 4 MiB of bf16, handed to
# the writer whole; two of them in turn, whatever the tensor's size.
STAGE_ELEMENTS = 1 << 21


class StagingBuffers:
    """The two byte buffers a streamed sum's pieces are computed in, used in turn.

    The writer writes piece k while piece k+1 is computed, and has finished piece k before
    it takes piece k+1 (StreamingShardWriter.tensor), so the buffer handed out next is always
    free. One pair serves every tensor of a shard, whatever their dtypes; a buffer grows
    to the largest piece asked of it and is never shrunk.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8)] * 2
        self._next = 0

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat `dtype` tensor of `numel` elements in the buffer after the last one taken."""
        nbytes = numel * dtype.itemsize
        index, self._next = self._next, 1 - self._next
        if self._buffers[index].numel() < nbytes:
            self._buffers[index] = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self._buffers[index] = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffers[index][:nbytes].view(dtype)


@dataclass
class FusedSum:
    """`out = cast(base + λ Σ_i w_i (W_i − base))`, computed block by block in cache.

    The same operations as the unfused engine (upcast, subtract, `add_(alpha=w)`, `add_(alpha=λ)`,
    cast) on each element, so the bytes are the same; what is saved is the memory traffic of
    five whole-tensor passes and the page faults of fresh float32 copies. Inputs are flat
    read-only views of the mapped files; they are never written. Finiteness is checked on the
    output only (a NaN or Inf anywhere in an input reaches it), with a cheap sum per block;
    `merged_ok` / `out_ok` say where a block failed, for the caller's message.
    """

    dtype: torch.dtype  # the compute dtype (float32, or float64 for F64 bases)
    chunk: int = FUSED_CHUNK
    merged_ok: bool = True
    out_ok: bool = True

    def run(self, out: torch.Tensor, base: torch.Tensor, models: list[torch.Tensor],
            weights: list[float], lambda_: float) -> torch.Tensor:
        """Fill `out` (flat, output dtype) from flat `base` and `models`; returns `out`.

        Args:
            out: the flat output tensor, in the output dtype.
            base: the base's flat values, any float dtype.
            models: each fine-tune's flat values, same length as `base`.
            weights: w_i per model.
            lambda_: the global scale λ.
        Returns:
            `out`; `merged_ok` and `out_ok` are False if some value was NaN or Inf.
        """
        self._fill(out, base, models, weights, lambda_, self._scratch(base.numel()))
        return out

    def stream(self, base: torch.Tensor, models: list[torch.Tensor], weights: list[float], lambda_: float,
               out_dtype: torch.dtype, emit: Callable[[torch.Tensor], None], stage: int = STAGE_ELEMENTS,
               staging: StagingBuffers | None = None) -> None:
        """The merged values in order, as pieces of at most `stage` elements handed to `emit`:
        the whole output tensor never exists, and the pieces reuse two staging buffers, so
        a piece may be changed once the one after it was emitted (what the writer needs).

        Args:
            base, models, weights, lambda_: as for `run`.
            out_dtype: the pieces' dtype.
            emit: called with each flat piece, in order; not called past a block that failed.
            stage: elements per piece (rounded down to whole chunks).
            staging: the two buffers, shared by the tensors of a shard so the last piece of
                one tensor (still being written) and the next tensor's never make three.
        """
        numel = base.numel()
        stage = max(self.chunk, stage - stage % self.chunk)
        staging = staging if staging is not None else StagingBuffers()
        scratch = self._scratch(numel)
        for start in range(0, numel, stage):
            stop = min(start + stage, numel)
            piece = staging.take(stop - start, out_dtype)
            self._fill(piece, base[start:stop], [m[start:stop] for m in models], weights, lambda_, scratch)
            if not self.merged_ok:
                return
            if self.out_ok:  # after an overflow, the later blocks are still checked for NaN
                emit(piece)

    @staticmethod
    def working_bytes(numel: int, out_itemsize: int, compute_itemsize: int = 4) -> int:
        """Bytes a streamed sum holds besides the mapped inputs: two staging buffers (one may
        still hold the previous tensor's last piece) and three scratch blocks (bounded,
        whatever the tensor's size)."""
        return 2 * min(numel, STAGE_ELEMENTS) * out_itemsize + 3 * min(numel, FUSED_CHUNK) * compute_itemsize

    def _scratch(self, numel: int) -> list[torch.Tensor]:
        size = min(self.chunk, numel)
        return [torch.empty(size, dtype=self.dtype) for _ in range(3)]  # base, Σ, τ blocks

    def _fill(self, out: torch.Tensor, base: torch.Tensor, models: list[torch.Tensor],
              weights: list[float], lambda_: float, scratch: list[torch.Tensor]) -> None:
        for start in range(0, base.numel(), self.chunk):
            stop = min(start + self.chunk, base.numel())
            self._block(out[start:stop], base[start:stop], [m[start:stop] for m in models],
                        weights, lambda_, [s[: stop - start] for s in scratch])
            if not self.merged_ok:
                break

    def _block(self, out: torch.Tensor, base: torch.Tensor, models: list[torch.Tensor],
               weights: list[float], lambda_: float, scratch: list[torch.Tensor]) -> None:
        base_block, acc, tau = scratch
        if base.dtype == self.dtype:
            base_block = base  # already the compute dtype: read in place, no copy
        else:
            base_block.copy_(base)  # (block,) upcast: exact
        acc.zero_()
        for model, weight in zip(models, weights, strict=True):
            subtract_upcast(model, base_block, tau)  # τ = W_i − W_base
            acc.add_(tau, alpha=weight)
        # The merged block in the compute dtype: straight into `out` when that is its dtype,
        # else into the free τ block and then cast, rounding as `.to` does.
        merged = out if out.dtype == self.dtype else tau
        torch.add(base_block, acc, alpha=lambda_, out=merged)
        if merged is not out:
            out.copy_(merged)
        if not bool(torch.isfinite(out.sum(dtype=self.dtype))):  # a finite sum: all finite
            self.merged_ok = bool(torch.isfinite(merged).all())
            self.out_ok = self.out_ok and bool(torch.isfinite(out).all())


def subtract_upcast(model: torch.Tensor, base: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """into = model.to(base.dtype) − base, as those two steps give it, without a temporary.

    Same dtypes: one pass. Otherwise the upcast (exact for bf16/fp16; for a float64 input
    into float32 the rounding `.to` does) and then a same-dtype subtraction: two vectorized
    passes are faster than torch's one mixed-dtype pass (20 against 27 µs per 128K bf16
    elements here), and give the same bits.

    Args:
        model: a block of a fine-tuned tensor, in its stored dtype (bf16, fp16, float32 or float64).
        base: the base's same block, same shape, in the compute dtype (float32 or float64).
        into: the output buffer, same shape and dtype as `base`; overwritten.
    Returns:
        `into`, now holding the task-vector block τ.
    """
    if model.dtype == base.dtype:
        torch.sub(model, base, out=into)
    else:
        into.copy_(model)
        into.sub_(base)
    return into
