"""Iso-CTS: isotropic merging in common and task-specific subspaces (Marczak et al., ICML 2025).

For an m×n matrix (k = min(m, n)) and N models:

1. common subspace: the top c singular triplets of the sum Σ_i w_i τ_i, with
   c = k − N·d and d = round((k − ⌊f·k⌋)/N) directions per task (f = common_space_fraction,
   0.8 by default; the authors' rounding, so the task-specific part divides evenly);
2. task-specific subspaces: for each task, the top d singular triplets of its residual
   w_i τ_i − U_c U_cᵀ w_i τ_i (what the common subspace misses);
3. concatenate the task-specific and the common U (and V), replace each by its orthogonal
   polar factor, and give every direction the mean σ̄ of the concatenated singular values:
   Δ = σ̄ U⊥ V⊥ᵀ.

Other tensors: the mean (1/N) Σ_i w_i τ_i. W = W_base + λ·Δ, λ (the paper's α) 1 by default.
Two passes over the models: the sum first, then each residual (inputs are read twice).
f = 1 is Iso-C. Follows `iso_cts` in github.com/danielm1405/iso-merging (Apache-2.0),
except that directions at the rounding floor are dropped and σ̄ is the mean of the kept σ
(see `subspace`; the same for full-rank task vectors), and that d is capped at ⌊k/N⌋ (the
authors' rounding can ask for more than k directions when f < 1/2). For LoRA inputs whose
summed rank Σ r_i fits in the c common directions, the residuals are zero and Iso-CTS is Iso-C.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from star_dist.errors import ConfigError
from star_dist.methods.base import LowRank, TaskVector
from star_dist.methods.fold import Fold, FoldMethod
from star_dist.methods.iso_c import isotropic
from star_dist.methods.params import as_number
from star_dist.methods.subspace import MatrixSum, above, frobenius, polar, rounding_floor, svd64


@dataclass(frozen=True)
class IsoCtsParams:
    """common_space_fraction: the share f of the k directions taken from the summed task
    vector, in [0, 1] (the rest are split evenly between the tasks). α is the engine's `lambda`."""

    common_space_fraction: float = 0.8

    def __post_init__(self) -> None:
        f = as_number("iso_cts", "common_space_fraction", self.common_space_fraction)
        if not 0.0 <= f <= 1.0:
            raise ConfigError(
                f"iso_cts: common_space_fraction must be in [0, 1] (a share of the directions), got {f!r}"
            )
        object.__setattr__(self, "common_space_fraction", f)


def subspace_split(k: int, n_models: int, fraction: float) -> tuple[int, int]:
    """(c, d): common directions and directions per task, c + N·d = k, as the authors round.

    Args:
        k: min(m, n).
        n_models: N.
        fraction: f, the common share.
    Returns:
        c = k − N·d with d = round((k − ⌊f·k⌋)/N) (Python's round), d capped at ⌊k/N⌋.
    """
    per_task = min(round((k - int(k * fraction)) / n_models), k // n_models)
    return k - per_task * n_models, per_task


class IsoCtsFold(Fold):
    """Pass 0 sums the task vectors; pass 1 takes each residual's top directions."""

    passes = 2

    def __init__(self, shape: tuple[int, int], n_models: int, fraction: float) -> None:
        self.shape = shape
        self.common_slots, self.task_slots = subspace_split(min(shape), n_models, fraction)
        self.sum = MatrixSum(shape)
        self.largest = 0.0  # max_i ‖w_i τ_i‖_F: with ‖Σ w_i τ_i‖_F, the scale of the rounding floor
        self.common: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # U_c, σ_c, V_cᵀ
        self.floor = 0.0
        self.tasks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * n_models

    def add(self, tau: TaskVector, weight: float, model: int, step: int) -> None:
        if step == 0:
            self.sum.add(tau, weight)
            self.largest = max(self.largest, abs(weight) * frobenius(tau))
            return
        if self.common is None:
            self._common_subspace()
        if self.task_slots == 0:  # f = 1, or N > k: no task-specific directions to find
            return
        u, s, vh = svd64(self._residual(tau))  # the part of τ the common subspace misses
        d = above(s * abs(weight), self.floor, self.task_slots)
        sign = -1.0 if weight < 0 else 1.0
        self.tasks[model] = (u[:, :d] * sign, s[:d] * abs(weight), vh[:d].clone())  # no view of the k×n Vᵀ

    def _common_subspace(self) -> None:
        u, s, vh = svd64(self.sum.value())  # (m, k'), (k',), (k', n)
        # One floor for the sum and every residual: rounding next to the largest of them (a residual
        # of a task the common subspace already holds is rounding of that task, not of the sum).
        self.floor = max(rounding_floor(s, self.sum.dtype), rounding_floor(torch.tensor([self.largest]),
                                                                           self.sum.dtype))
        c = above(s, self.floor, self.common_slots)
        self.common = (u[:, :c].clone(), s[:c].clone(), vh[:c].clone())  # copies: the full SVD can go

    def _residual(self, tau: TaskVector) -> TaskVector:
        """(I − U_c U_cᵀ) τ in float64, still low-rank for a `LowRank` τ."""
        assert self.common is not None
        u_c = self.common[0]  # (m, c)
        if isinstance(tau, LowRank):
            left = tau.left.to(torch.float64)  # (m, r)
            return LowRank(left - u_c @ (u_c.T @ left), tau.right.to(torch.float64))
        full = tau.to(torch.float64)  # (m, n)
        return full - u_c @ (u_c.T @ full)

    def finish(self) -> tuple[TaskVector, dict[str, Any]]:
        if self.common is None:  # no second pass happened: only possible with no model at all
            self._common_subspace()
        assert self.common is not None
        parts = [t for t in self.tasks if t is not None] + [self.common]  # the authors' order
        u_cat = torch.cat([p[0] for p in parts], dim=1)  # (m, D) D ≤ k kept directions
        sigma = float(sum(float(p[1].sum()) for p in parts)) / max(u_cat.shape[1], 1)  # σ̄ over them
        vh_cat = torch.cat([p[2] for p in parts], dim=0)  # (D, n)
        stats = {"common_rank": self.common[0].shape[1], "task_ranks": [None if t is None else t[0].shape[1]
                                                                        for t in self.tasks]}
        if u_cat.shape[1] == 0:
            return isotropic(u_cat, vh_cat, 0.0, self.sum.dtype), {**stats, "sigma_mean": 0.0}
        return isotropic(polar(u_cat), polar(vh_cat), sigma, self.sum.dtype), {**stats, "sigma_mean": sigma}


class IsoCts(FoldMethod):
    """Common subspace of the sum plus each task's own residual directions, isotropic spectrum."""

    name: ClassVar[str] = "iso_cts"
    Params: ClassVar[type] = IsoCtsParams
    reference: ClassVar[str] = (
        "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and "
        "Task-Specific Subspaces, ICML 2025, https://arxiv.org/abs/2502.04959"
    )
    memory_note: ClassVar[str] = (
        "iso_cts holds the running sum of one matrix and its float64 SVD, then one residual's SVD and "
        "the kept directions (≤ k = min(m, n) pairs); it reads every input matrix twice"
    )

    def matrix_fold(self, shape: tuple[int, int], n_models: int) -> Fold:
        return IsoCtsFold(shape, n_models, self.params.common_space_fraction)

    def working_bytes(self, shape: tuple[int, ...], n_models: int) -> int:
        """The default (base, sum, τ, one float64 SVD) plus the kept pairs, (m + n)·k float64, and
        the float64 residual being decomposed (scripts/bench/memory_family.py measures it)."""
        extra = 8 * ((shape[0] + shape[1]) * min(shape) + shape[0] * shape[1]) if len(shape) == 2 else 0
        return super().working_bytes(shape, n_models) + extra
