"""Iso-C: isotropic merging in the common subspace (Marczak et al., ICML 2025).

For an m×n matrix: the SVD of the summed task vector Σ_i w_i τ_i = U Σ Vᵀ, every singular
value replaced by their mean σ̄ = ‖Σ_i w_i τ_i‖_* / ρ (ρ: its rank, k = min(m, n) for full
fine-tunes), so the update spreads evenly over all the directions the tasks use: Δ = σ̄ U Vᵀ. Other tensors: the mean
(1/N) Σ_i w_i τ_i, as the authors' code. W = W_base + λ·Δ, λ (the paper's α) 1 by default;
the authors tune it on validation data. Weights w_i default to 1 (the authors' plain sum).

Streaming in N: only the sum is kept (m×n, or stacked LoRA factors while every input is
low-rank, so a merge of adapters never forms the m×n matrix). Follows `iso_c` in
github.com/danielm1405/iso-merging (Apache-2.0), except that directions whose σ is at the
rounding floor are dropped and σ̄ is the mean of the others (see `subspace`): a sum of LoRA
updates has rank ρ ≤ Σ r_i, and the authors' code would give σ̄ (a mean diluted by the k − ρ
zeros) to k − ρ arbitrary null-space vectors as well. For a full-rank sum nothing changes.
Every 2-D tensor is a matrix (the authors skip CLIP's `text_projection`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from star_dist.methods.base import LowRank, TaskVector
from star_dist.methods.fold import Fold, FoldMethod
from star_dist.methods.subspace import MatrixSum, above, rounding_floor, svd64


@dataclass(frozen=True)
class IsoCParams:
    """Iso-C has no parameter of its own: its scale α is the engine's `lambda` (default 1)."""


def isotropic(u: torch.Tensor, vh: torch.Tensor, sigma: float, dtype: torch.dtype) -> LowRank:
    """σ·U Vᵀ as LowRank factors, so the flattened update is never formed as an (m, n) matrix.

    Args:
        u: orthonormal left directions, (m, ρ) float64 (the SVD's U, or Iso-CTS's polar factor).
        vh: orthonormal right directions, (ρ, n) float64.
        sigma: the one singular value every direction gets (σ̄; 0 gives a zero update).
        dtype: the dtype of the factors (the compute dtype, float32 or float64).
    Returns:
        LowRank(U·σ (m, ρ), Vᵀ (ρ, n)) in `dtype`.
    """
    return LowRank((u * sigma).to(dtype), vh.to(dtype))


class IsoCFold(Fold):
    """The running sum of one matrix's weighted task vectors; its flattened spectrum at the end."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.sum = MatrixSum(shape)

    def add(self, tau: TaskVector, weight: float, model: int, step: int) -> None:
        self.sum.add(tau, weight)

    def finish(self) -> tuple[TaskVector, dict[str, Any]]:
        u, s, vh = svd64(self.sum.value())  # (m, k'), (k',), (k', n)
        rho = above(s, rounding_floor(s, self.sum.dtype))
        sigma = float(s[:rho].sum()) / max(rho, 1)  # σ̄ = ‖Σ w τ‖_* / ρ
        return isotropic(u[:, :rho], vh[:rho], sigma, self.sum.dtype), {"rank": rho, "sigma_mean": sigma}


class IsoC(FoldMethod):
    """Sum the task vectors, then give every singular direction of the sum the same σ."""

    name: ClassVar[str] = "iso_c"
    Params: ClassVar[type] = IsoCParams
    reference: ClassVar[str] = (
        "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and "
        "Task-Specific Subspaces, ICML 2025, https://arxiv.org/abs/2502.04959"
    )
    memory_note: ClassVar[str] = (
        "iso_c holds the running sum of one matrix (m×n, or the stacked LoRA factors) and its float64 SVD"
    )

    def matrix_fold(self, shape: tuple[int, int], n_models: int) -> Fold:
        return IsoCFold(shape)
