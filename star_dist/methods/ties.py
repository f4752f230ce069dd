"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

Semantics follow mergekit's `ties` (magnitude sparsification + 'sum' consensus), so results
can be checked against it:

* trim: keep the k = max(1, int(density · numel)) largest |τ_i| of each whole task vector
  (density ≥ 1 keeps everything); `density` may differ per model, as in mergekit;
* elect: the sign of Σ_i w_i·trim(τ_i) at each position, + where that sum is ≥ 0;
* disjoint merge: Σ_i w_i·trim(τ_i) over the models whose w_i·trim(τ_i) has the elected
  sign (a zero never does), divided by the sum of those models' w_i (a zero divisor is 1,
  and so is one that is 0 up to rounding with mixed-sign weights, see `merge_block`);
  with `normalize: false` the sum is not divided, as in mergekit.

Trimming must run on row blocks, so it is a rule that a block can apply alone: `prepare`
finds t_i, the k-th largest |τ_i| of the whole tensor, and the flat index up to which
entries whose |τ_i| equals t_i exactly are kept, so that exactly k entries survive. Entries
tied at t_i are taken in flat (row-major) order. mergekit keeps an arbitrary subset of them
(whatever its unstable sort yields), so the two agree except on which tied entries are kept;
such ties are common in bf16 or fp16 checkpoints, whose task vectors take few distinct
values, and never matter at t_i = 0 (a zero neither votes nor adds). As in mergekit 0.1.5's
`sparsify.magnitude`, a tiny tensor keeps at least one entry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from star_dist.errors import ConfigError
from star_dist.methods.base import JointMethod
from star_dist.methods.params import ZERO_SUM_RTOL, as_flag, as_number

# Elements counted at a time while locating the last tied entry to keep (bounded memory).
_TIE_SCAN_CHUNK = 1 << 22
# Below this size `kthvalue` alone is as fast as the radix select.
_RADIX_MIN = 1 << 16
# The integer view of each float dtype and the shift that leaves its top 16 bits.
_RADIX_VIEW = {torch.float32: (torch.int32, 16), torch.float64: (torch.int64, 48)}


@dataclass(frozen=True)
class TiesParams:
    """density: the fraction of each task vector's entries kept by magnitude, in (0, 1].

    normalize: divide by the agreeing models' weights (mergekit's flag, on by default).
    int8_mask: accepted for mergekit configs; a memory option there, no effect here (our
    masks are booleans already).
    """

    density: float = 0.2
    normalize: bool = True
    int8_mask: bool = False

    def __post_init__(self) -> None:
        density = as_number("ties", "density", self.density)
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"ties: density must be in (0, 1] (the fraction of entries kept), got {density!r}")
        object.__setattr__(self, "density", density)
        object.__setattr__(self, "normalize", as_flag("ties", "normalize", self.normalize))
        object.__setattr__(self, "int8_mask", as_flag("ties", "int8_mask", self.int8_mask))


@dataclass(frozen=True)
class TrimRule:
    """Model i's trim: keep |τ| > threshold, and |τ| == threshold at flat index ≤ last_tied."""

    threshold: float
    last_tied: int  # −1: no tied entry is kept; ≥ numel − 1: every one is


def trim_count(numel: int, density: float) -> int:
    """k, the number of entries kept: max(1, int(density · numel)), mergekit's floor rounding.

    Args:
        numel: the tensor's number of entries.
        density: the fraction kept, in (0, 1]; 1 keeps everything.
    Returns:
        k, 1 ≤ k ≤ numel (numel when density ≥ 1; 0 for an empty tensor).
    """
    if density >= 1.0 or numel == 0:
        return numel
    return max(1, int(density * numel))


def trim_threshold(tau: torch.Tensor, density: float) -> float:
    """t, the k-th largest |τ| of the whole tensor (0 when everything is kept): TIES's trim cut.

    Args:
        tau: one model's task vector, any shape, float32 or float64.
        density: the fraction of entries kept, in (0, 1].
    Returns:
        t as a float; entries with |τ| ≥ t survive the trim (ties: see `trim_rule`).
    """
    return _kth_largest(tau.detach().abs().reshape(-1), trim_count(tau.numel(), density))


def _kth_largest(magnitudes: torch.Tensor, k: int) -> float:
    """The k-th largest of a flat non-negative tensor, 0 for k ≥ its size."""
    return 0.0 if k >= magnitudes.numel() else select_kth_largest(magnitudes, k)[0]


def select_kth_largest(magnitudes: torch.Tensor, k: int) -> tuple[float, int, int]:
    """(t, entries > t, entries == t) for t the k-th largest of a flat tensor of values ≥ 0, 1 ≤ k < numel.

    A radix select, not a sort: the bit patterns of non-negative floats order as the values do,
    so one histogram of their top 16 bits finds the bin holding the k-th largest, and only
    that bin's entries (every entry equal to t among them) go to `kthvalue`. Three linear
    passes instead of `kthvalue`'s copy and partition of the whole tensor; the same t exactly.

    Args:
        magnitudes: |τ| flattened, (numel,) float32 or float64 (other dtypes fall back to `kthvalue`).
        k: the rank from the top, 1 ≤ k < numel.
    Returns:
        (t, how many entries are > t, how many are == t).
    """
    numel = magnitudes.numel()
    if numel <= _RADIX_MIN or magnitudes.dtype not in _RADIX_VIEW:
        t = torch.kthvalue(magnitudes, numel - k + 1).values
        return float(t), int((magnitudes > t).sum()), int((magnitudes == t).sum())
    int_dtype, shift = _RADIX_VIEW[magnitudes.dtype]
    top = magnitudes.view(int_dtype) >> shift  # (numel,) the top 16 bits: 15 of exponent and mantissa
    counts = torch.bincount(top, minlength=1 << 15)  # (bins,)
    from_top = counts.flip(0).cumsum(0)  # entries in this bin or higher ones, highest bin first
    j = int(torch.searchsorted(from_top, k))  # the first bin (from the top) that reaches k
    higher = int(from_top[j - 1]) if j > 0 else 0
    candidates = magnitudes[top == counts.numel() - 1 - j]  # (bin size,) every entry that may be t
    t = torch.kthvalue(candidates, candidates.numel() - (k - higher) + 1).values
    return float(t), higher + int((candidates > t).sum()), int((candidates == t).sum())


def trim_rule(tau: torch.Tensor, density: float) -> TrimRule:
    """The rule that keeps exactly k entries of τ: all above t, then tied ones in flat order.

    Args:
        tau: one model's task vector, any shape, float32 or float64 (finite).
        density: the fraction of entries kept, in (0, 1].
    Returns:
        The TrimRule (threshold t and the flat index of the last tied entry kept).
    """
    numel = tau.numel()
    k = trim_count(numel, density)
    if k >= numel:
        return TrimRule(0.0, numel)
    magnitudes = tau.detach().abs().reshape(-1)  # (numel,) the one copy of |τ|
    t, above, tied = select_kth_largest(magnitudes, k)
    need = k - above  # ≥ 1: the k-th largest itself equals t
    if t == 0.0 or need >= tied:  # every tied entry is kept (ties at 0 change nothing either way)
        return TrimRule(t, numel)
    for start in range(0, numel, _TIE_SCAN_CHUNK):  # chunks: no index tensor the size of τ
        tied_here = torch.nonzero(magnitudes[start : start + _TIE_SCAN_CHUNK] == t).reshape(-1)  # (ties,)
        if need <= tied_here.numel():
            return TrimRule(t, start + int(tied_here[need - 1]))
        need -= tied_here.numel()
    return TrimRule(t, numel)  # unreachable for a finite τ


class Ties(JointMethod):
    """Trim each task vector, elect a sign per entry, average the models that agree with it."""

    name: ClassVar[str] = "ties"
    Params: ClassVar[type] = TiesParams
    per_model_params: ClassVar[tuple[str, ...]] = ("density",)
    reference: ClassVar[str] = (
        "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, "
        "NeurIPS 2023, https://arxiv.org/abs/2306.01708"
    )

    def __init__(self, params: TiesParams | None = None, model_params: tuple[TiesParams, ...] = ()) -> None:
        self.params = params if params is not None else TiesParams()
        self.model_params = model_params  # per model, where models set their own density

    def params_dict(self) -> dict[str, Any]:
        return asdict(self.params)

    def density_of(self, model: int) -> float:
        return self.model_params[model].density if self.model_params else self.params.density

    def prepare(self, tau: torch.Tensor, model: int = 0) -> TrimRule:
        """Model `model`'s trim rule, from its whole task vector."""
        return trim_rule(tau, self.density_of(model))

    def merge_block(
        self, taus: list[torch.Tensor], weights: list[float], prepared: list[Any], offset: int = 0
    ) -> torch.Tensor:
        """The disjoint mean of the sign-agreeing, trimmed, weighted task vectors of one block.

        `offset` is the flat index of the block's first entry in the whole tensor. Each model's
        w_i·trim(τ_i) is formed once and kept for both passes (N + 4 block-sized tensors alive),
        so blocks should be small: the engine's stay in cache.
        """
        if not (len(taus) == len(weights) == len(prepared)) or not taus:
            raise ValueError(
                f"ties: need one weight and one trim rule per task vector, got {len(taus)} "
                f"blocks, {len(weights)} weights, {len(prepared)} rules"
            )
        dtype = taus[0].dtype if taus[0].is_floating_point() else torch.float32
        deltas = [_weighted_trim(tau.to(dtype), rule, weight, offset) for tau, rule, weight in
                  zip(taus, prepared, weights, strict=True)]  # (rows, ...) w_i · trim(τ_i), each once
        mass = torch.zeros_like(deltas[0])  # (rows, ...) Σ_i w_i trim(τ_i)
        for delta in deltas:
            mass += delta
        elected = (mass >= 0).to(dtype).mul_(2.0).sub_(1.0)  # (rows, ...) +1 / −1
        del mass

        merged = torch.zeros_like(elected)  # (rows, ...) Σ over agreeing models
        divisor = torch.zeros_like(elected)  # (rows, ...) Σ of their weights
        # Only mixed-sign weights can sum to ~0 over the agreeing models without being 0 (see below).
        mixed = self.params.normalize and min(weights) < 0 < max(weights)
        size = torch.zeros_like(elected) if mixed else None  # (rows, ...) Σ of their |weights|
        for delta, weight in zip(deltas, weights, strict=True):
            agrees = torch.sign(delta) == elected  # (rows, ...) bool; a zero never agrees
            merged += delta * agrees  # a ±0 where it disagrees: x + (±0) is x, and merged starts at +0
            divisor += agrees.to(dtype) * weight
            if size is not None:
                size += agrees.to(dtype) * abs(weight)
        if not self.params.normalize:
            return merged
        if size is None:
            divisor[divisor == 0] = 1.0
            return merged / divisor
        # The paper's disjoint mean divides by the count of agreeing models, never ~0; mergekit
        # divides by the sum of their weights and makes an exactly-zero one 1 (the entry keeps
        # the plain sum). With mixed signs that sum can be 0 up to rounding only (0.3 + 0.6 − 0.9
        # is 6e-8 in float32 and would scale the entry by ~1e7): it is the zero it is, made 1,
        # relative to the agreeing weights' size and this dtype's rounding. A small real
        # divisor (1 − 0.9) is divided by, as mergekit does.
        rtol = max(ZERO_SUM_RTOL, 4 * len(weights) * torch.finfo(dtype).eps)
        divisor[divisor.abs() <= size.mul_(rtol)] = 1.0  # also where no model agrees (0 ≤ 0)
        return merged / divisor


def _weighted_trim(tau: torch.Tensor, rule: TrimRule, weight: float, offset: int) -> torch.Tensor:
    """w · trim(τ) for one block whose first entry has flat index `offset` in the whole tensor."""
    magnitude = tau.abs()  # (rows, ...)
    if rule.last_tied >= offset + tau.numel() - 1:  # every tied entry of this block is kept
        keep = magnitude >= rule.threshold
    else:
        keep = magnitude > rule.threshold
        if rule.last_tied >= offset:
            index = torch.arange(offset, offset + tau.numel(), device=tau.device).reshape(tau.shape)
            keep |= (magnitude == rule.threshold) & (index <= rule.last_tied)
    # τ·keep, not where(keep, τ, 0): 6× faster, and the zeros it leaves (−0 for a negative τ)
    # never reach the result: a zero neither votes (mass only feeds `mass ≥ 0`) nor agrees.
    return (tau * keep).mul_(weight)  # (rows, ...)
