"""TSV-M: Task Singular Vectors Merge (Gargiulo et al., CVPR 2025).

For an m×n matrix (k = min(m, n)) and N models: per task, the top r = ⌊k/N⌋ singular
triplets of w_i·τ_i; concatenate them, U = [U_1 … U_N] (m × Σr_i), Σ = diag(σ_1 … σ_N),
V = [V_1 … V_N] (n × Σr_i); replace U and V by their orthogonal polar factors (U Vᵀ of their
own SVDs), which removes the interference between tasks' subspaces; Δ = U⊥ Σ V⊥ᵀ. Other
tensors: the mean (1/N) Σ w_i τ_i, as the authors' code. W = W_base + λ·Δ with λ (the
paper's α) 1 by default; the authors tune it on validation data.

Follows `compute_and_sum_svd_mem_reduction` in github.com/AntoAndGar/task_singular_vectors
(Apache-2.0), with two documented differences: singular triplets at the rounding floor are
dropped (see `subspace`: the authors keep LAPACK's arbitrary null-space vectors of a
low-rank τ, e.g. a LoRA update), and the polar factors are taken of the kept columns only
(the authors' zero columns, where k is not a multiple of N, do not change the product).
The authors treat every 2-D tensor as a matrix except CLIP's `text_projection`; here every
2-D tensor is a matrix, embeddings and `lm_head` included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from star_dist.methods.base import LowRank, TaskVector
from star_dist.methods.fold import Fold, FoldMethod
from star_dist.methods.subspace import above, polar, rounding_floor, svd64


@dataclass(frozen=True)
class TsvParams:
    """TSV-M has no parameter of its own: its scale α is the engine's `lambda` (default 1)."""


class TsvFold(Fold):
    """Collects every task's top ⌊k/N⌋ singular triplets of one matrix; orthogonalizes at the end."""

    def __init__(self, shape: tuple[int, int], n_models: int) -> None:
        self.shape = shape
        self.per_task = min(shape) // max(n_models, 1)  # r = ⌊k/N⌋
        self.us: list[torch.Tensor] = []  # (m, r_i) float64
        self.sigmas: list[torch.Tensor] = []  # (r_i,) float64
        self.vhs: list[torch.Tensor] = []  # (r_i, n) float64
        self.kept: list[int | None] = [None] * n_models  # r_i; None: the model lacks this tensor
        self.dtype = torch.float32

    def add(self, tau: TaskVector, weight: float, model: int, step: int) -> None:
        self.dtype = tau.left.dtype if isinstance(tau, LowRank) else tau.dtype
        u, s, vh = svd64(tau)  # (m, k'), (k',), (k', n)
        s = s * abs(weight)  # the SVD of w·τ: |w|σ, with the sign of w on U
        floor = rounding_floor(s, self.dtype)
        r = above(s, floor, self.per_task)
        sign = -1.0 if weight < 0 else 1.0
        # Copies, not views: a view of vh[:r] would keep this task's whole k×n Vᵀ alive.
        self.us.append(u[:, :r] * sign)
        self.sigmas.append(s[:r].clone())
        self.vhs.append(vh[:r].clone())
        self.kept[model] = r

    def finish(self) -> tuple[TaskVector, dict[str, Any]]:
        m, n = self.shape
        sigma = torch.cat(self.sigmas)  # (R,) R = Σ r_i ≤ k
        if sigma.numel() == 0:
            zero = LowRank(torch.zeros(m, 0, dtype=self.dtype), torch.zeros(0, n, dtype=self.dtype))
            return zero, _stats(self.kept, 0)
        u_perp = polar(torch.cat(self.us, dim=1))  # (m, R) orthonormal columns
        vh_perp = polar(torch.cat(self.vhs, dim=0))  # (R, n) orthonormal rows
        left = u_perp * sigma  # (m, R) U⊥ Σ
        return LowRank(left.to(self.dtype), vh_perp.to(self.dtype)), _stats(self.kept, sigma.numel())


def _stats(kept: list[int | None], rank: int) -> dict[str, Any]:
    return {"tsv_kept": list(kept), "rank": rank}


class Tsv(FoldMethod):
    """Each task's top ⌊k/N⌋ singular triplets, their U and V orthogonalized, recombined."""

    name: ClassVar[str] = "tsv"
    Params: ClassVar[type] = TsvParams
    reference: ClassVar[str] = (
        "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, "
        "CVPR 2025, https://arxiv.org/abs/2412.00081"
    )
    memory_note: ClassVar[str] = (
        "tsv holds, for one matrix at a time, every task's top ⌊k/N⌋ singular vector pairs "
        "(N·⌊k/N⌋ ≤ k = min(m, n) pairs, (m + n)·k float64 values) and one task vector's float64 SVD"
    )

    def matrix_fold(self, shape: tuple[int, int], n_models: int) -> Fold:
        return TsvFold(shape, n_models)

    def working_bytes(self, shape: tuple[int, ...], n_models: int) -> int:
        """The default (base, τ, one float64 SVD) plus the kept pairs: (m + n)·k float64."""
        extra = 8 * (shape[0] + shape[1]) * min(shape) if len(shape) == 2 else 0
        return super().working_bytes(shape, n_models) + extra
