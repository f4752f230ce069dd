"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

Semantics follow mergekit's `ties` (magnitude sparsification + 'sum' consensus, normalize on),
so results can be checked against it:

* trim: keep the k = max(1, int(density · numel)) largest |τ_i| of each whole task vector
  (density ≥ 1 keeps everything);
* elect: the sign of Σ_i w_i·trim(τ_i) at each position, + where that sum is ≥ 0;
* disjoint merge: Σ_i w_i·trim(τ_i) over the models whose w_i·trim(τ_i) has the elected
  sign (a zero never does), divided by the sum of those models' w_i (a zero divisor is 1).

Trimming is a threshold, so it can run on row blocks: `prepare` finds t_i, the k-th largest
|τ_i| of the whole tensor, and `merge_block` keeps |τ_i| ≥ t_i. This equals top-k except when
several entries share the magnitude t_i exactly: then every one of them is kept (more than k
entries), where mergekit keeps an arbitrary subset chosen by its sort. We keep them all
because the choice must not depend on the row blocking or the sort algorithm; for real float
weights such ties are rare, and ties at t_i = 0 change nothing (a zero never votes or adds).
As in mergekit 0.1.5's `sparsify.magnitude`, a tiny tensor keeps at least one entry (older
mergekit versions refused a tensor where int(density · numel) is 0 with an assertion).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from star_dist.errors import ConfigError
from star_dist.methods.base import JointMethod
from star_dist.methods.params import as_number


@dataclass(frozen=True)
class TiesParams:
    """density: the fraction of each task vector's entries kept by magnitude, in (0, 1]."""

    density: float = 0.2

    def __post_init__(self) -> None:
        density = as_number("ties", "density", self.density)
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"ties: density must be in (0, 1] (the fraction of entries kept), got {density!r}")
        object.__setattr__(self, "density", density)


def trim_count(numel: int, density: float) -> int:
    """k, the number of entries kept: max(1, int(density · numel)), mergekit's floor rounding."""
    if density >= 1.0 or numel == 0:
        return numel
    return max(1, int(density * numel))


def trim_threshold(tau: torch.Tensor, density: float) -> float:
    """t, the k-th largest |τ| of the whole tensor: keeping |τ| ≥ t is top-k up to exact ties.

    0 keeps everything (density 1, or an empty tensor).
    """
    numel = tau.numel()
    k = trim_count(numel, density)
    if k >= numel:
        return 0.0
    magnitudes = tau.detach().abs().reshape(-1)  # (numel,)
    # The k-th largest is the (numel − k + 1)-th smallest; kthvalue is a linear-time select.
    return float(torch.kthvalue(magnitudes, numel - k + 1).values)


class Ties(JointMethod):
    """Trim each task vector, elect a sign per entry, average the models that agree with it."""

    name: ClassVar[str] = "ties"
    Params: ClassVar[type] = TiesParams
    reference: ClassVar[str] = (
        "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, "
        "NeurIPS 2023, https://arxiv.org/abs/2306.01708"
    )

    def __init__(self, params: TiesParams | None = None) -> None:
        self.params = params if params is not None else TiesParams()

    def params_dict(self) -> dict[str, Any]:
        return asdict(self.params)

    def prepare(self, tau: torch.Tensor) -> float:
        """The trim threshold t of this model's whole task vector (a plain float)."""
        return trim_threshold(tau, self.params.density)

    def merge_block(self, taus: list[torch.Tensor], weights: list[float], prepared: list[Any]) -> torch.Tensor:
        """The disjoint mean of the sign-agreeing, trimmed, weighted task vectors of one block.

        Two passes over the models, so only a few block-sized tensors are alive at once.
        """
        if not (len(taus) == len(weights) == len(prepared)) or not taus:
            raise ValueError(
                f"ties: need one weight and one threshold per task vector, got {len(taus)} "
                f"blocks, {len(weights)} weights, {len(prepared)} thresholds"
            )

        def weighted_trim(i: int) -> torch.Tensor:
            tau = taus[i].to(torch.float32)  # (rows, ...)
            kept = torch.where(tau.abs() >= prepared[i], tau, torch.zeros_like(tau))
            return kept * weights[i]  # (rows, ...) w_i · trim(τ_i)

        mass = torch.zeros_like(taus[0], dtype=torch.float32)  # (rows, ...) Σ_i w_i trim(τ_i)
        for i in range(len(taus)):
            mass += weighted_trim(i)
        elected = torch.where(mass >= 0, 1.0, -1.0)  # (rows, ...) +1 / −1
        del mass

        merged = torch.zeros_like(elected)  # (rows, ...) Σ over agreeing models
        divisor = torch.zeros_like(elected)  # (rows, ...) Σ of their weights
        for i in range(len(taus)):
            delta = weighted_trim(i)
            agrees = torch.sign(delta) == elected  # (rows, ...) bool; a zero never agrees
            merged += torch.where(agrees, delta, torch.zeros_like(delta))
            divisor += agrees.to(torch.float32) * weights[i]
        divisor[divisor == 0] = 1.0
        return merged / divisor
