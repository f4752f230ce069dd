"""SVD pieces shared by TSV-M, Iso-C and Iso-CTS: thin SVDs, the rounding floor, polar factors.

Exact and in float64: every direction these methods keep counts with the same weight in
the orthogonalization (TSV-M, Iso-CTS) or in the isotropic spectrum (Iso-C, Iso-CTS), so
small singular values need accurate vectors, not just the top ones (STAR's case).

Numerically zero directions. A matrix of rank ρ < k = min(m, n) (a LoRA update, a sum of a
few of them, a residual) has k − ρ singular values at float rounding, and LAPACK returns
*some* orthonormal basis of their null space: an arbitrary one. The authors' code keeps those
vectors, so its merge of low-rank task vectors depends on rounding noise (the polar factor
mixes them into the real directions; Iso-C gives them the mean σ). Here a direction counts
only when its σ is above the rounding floor 4·eps·‖τ‖_F (eps of the compute dtype): storing
τ in that dtype perturbs it by at most eps/2 per entry, which moves no singular value by more
than about eps·‖τ‖_F·(1/√m + 1/√n) ≤ eps·‖τ‖_F (GEMM rounding of a rank-r B·A adds √r), so
nothing above the floor is rounding, and the floor, ≤ 4·eps·√k·σ_1 (3·10⁻⁵·σ_1 for k = 4096
in float32), keeps every direction a real task vector has. Whenever no σ is that small (full
fine-tunes) this is the authors' result; otherwise it is the only one that does not depend on
rounding, and the one the factorized LoRA route computes without forming the m×n matrix.
Rounding noise already in the stored checkpoints (a LoRA merged into bf16 weights) is data,
not rounding of τ, and is kept, as the authors keep it.
"""

from __future__ import annotations

import torch

from star_dist.methods.base import LowRank, TaskVector
from star_dist.methods.spectral import lowrank_svd


def svd64(tau: TaskVector) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a 2-D task vector in float64: (U (m, k), σ (k,), Vᵀ (k, n)), σ descending.

    Args:
        tau: dense (m, n), or a `LowRank` (its exact SVD from two QRs and an r×r SVD,
            never forming m×n; then k = min(m, n, r)).
    Returns:
        U, σ, Vᵀ in float64.
    """
    if isinstance(tau, LowRank):
        return lowrank_svd(tau.left, tau.right)
    return torch.linalg.svd(tau.to(torch.float64), full_matrices=False)


def rounding_floor(s: torch.Tensor, dtype: torch.dtype) -> float:
    """σ at or below this is rounding: 4·eps(dtype)·‖τ‖_F, with ‖τ‖_F = √Σσ² from τ's singular values.

    Args:
        s: every singular value of the matrix (for a `LowRank`, all of its nonzero ones).
        dtype: the dtype the task vectors were computed in (float32, or float64).
    Returns:
        The floor (0 for a zero matrix).
    """
    return 4.0 * float(torch.finfo(dtype).eps) * float(torch.linalg.vector_norm(s.to(torch.float64)))


def above(s: torch.Tensor, floor: float, limit: int | None = None) -> int:
    """How many of the leading σ (descending) are above `floor`, at most `limit`: the directions kept.

    Args:
        s: singular values, descending, (k,) float64 (any float dtype works).
        floor: the rounding floor (`rounding_floor`); σ equal to it are dropped.
        limit: the most directions to keep (Iso-CTS's common slots); None: no cap.
    Returns:
        The count, 0 ≤ count ≤ min(k, limit).
    """
    count = int((s > floor).sum())
    return count if limit is None else min(count, limit)


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of x (p, q): U Vᵀ of its thin SVD, the nearest matrix with
    orthonormal columns (p ≥ q) or rows (p < q) in Frobenius norm. Float64, x's shape."""
    u, _, vh = torch.linalg.svd(x.to(torch.float64), full_matrices=False)
    return u @ vh  # (p, q)


class MatrixSum:
    """Σ_i w_i τ_i of one m×n tensor, kept as stacked factors while every τ_i is low-rank.

    A LoRA τ_i = B_i A_i adds w_i B_i as columns of `left` and A_i as rows of `right`, so the
    sum is left @ right (m×R, R×n, R = Σ r_i) and its SVD needs no m×n matrix; the first
    dense τ_i turns the sum dense (m×n, τ's dtype).
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.total: torch.Tensor | None = None  # (m, n) once any τ_i is dense
        self.lefts: list[torch.Tensor] = []  # (m, r_i) w_i B_i
        self.rights: list[torch.Tensor] = []  # (r_i, n) A_i
        self.dtype = torch.float32

    def add(self, tau: TaskVector, weight: float) -> None:
        """Add w·τ."""
        if isinstance(tau, LowRank):
            self.dtype = tau.left.dtype
            self.lefts.append(tau.left * weight)
            self.rights.append(tau.right)
            return
        self.dtype = tau.dtype
        if self.total is None:
            self.total = torch.zeros_like(tau)
        self.total.add_(tau, alpha=weight)

    def value(self) -> TaskVector:
        """The sum: a `LowRank` when every addend was low-rank, else a dense m×n tensor."""
        low = None
        if self.lefts:
            low = LowRank(torch.cat(self.lefts, dim=1), torch.cat(self.rights, dim=0))  # (m, R), (R, n)
        if self.total is None:
            if low is None:  # nothing added: a zero of rank 0
                m, n = self.shape
                return LowRank(torch.zeros(m, 0, dtype=self.dtype), torch.zeros(0, n, dtype=self.dtype))
            return low
        if low is not None:
            self.total.addmm_(low.left.to(self.total.dtype), low.right.to(self.total.dtype))
        return self.total


def frobenius(tau: TaskVector) -> float:
    """‖τ‖_F, for a `LowRank` from two r×r Gram matrices: ‖L R‖_F² = Σ (LᵀL) ∘ (R Rᵀ)."""
    if isinstance(tau, LowRank):
        left, right = tau.left.to(torch.float64), tau.right.to(torch.float64)
        return float(((left.T @ left) * (right @ right.T)).sum().clamp(min=0).sqrt())
    return float(torch.linalg.vector_norm(tau.to(torch.float64)))
