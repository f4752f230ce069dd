"""The contract for methods that fold every model's task vector of a tensor into one state.

TSV-M, Iso-C and Iso-CTS need all N task vectors of a tensor before they can say anything
(a sum, or every task's top singular vectors), but never all N dense matrices at once: the
engine hands them over one at a time (`Fold.add`), in one or more passes over the models
(Iso-CTS reads them twice: once for the common subspace, once for the residuals), and
`Fold.finish` returns the merged update Δ; the engine writes W = W_base + λ·Δ (λ is the
papers' α). Memory is the state, not N copies of the tensor: a sum, or N·⌊k/N⌋ ≤ k
singular vector pairs for TSV-M.

All three papers average tensors that are not matrices (biases, norms): `MeanFold`,
Δ = (1/N) Σ_i w_i τ_i, the authors' running mean.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Any, ClassVar

import torch

from star_dist.methods.base import MergeMethod, TaskVector, dense


class Fold(ABC):
    """One tensor's merge in progress: `add` every model's τ (per pass), then `finish`."""

    passes: int = 1  # how many times the engine hands over every model's task vector

    @abstractmethod
    def add(self, tau: TaskVector, weight: float, model: int, step: int) -> None:
        """Fold in one model's task vector τ (float32 or float64, dense or `LowRank`) with its weight.

        Args:
            tau: the model's task vector; the fold may keep it or modify it in place.
            weight: the model's w_i (τ counts as w_i·τ).
            model: the model's index i (a model without this tensor is never added).
            step: the pass, 0 ≤ step < passes.
        """

    @abstractmethod
    def finish(self) -> tuple[TaskVector, dict[str, Any]]:
        """The merged update Δ (before λ) in τ's dtype, and stats for the merge report."""


class MeanFold(Fold):
    """Δ = (1/N) Σ_i w_i τ_i over all N models (a model without this tensor counts as τ = 0)."""

    def __init__(self, n_models: int) -> None:
        self.n_models = n_models
        self.total: torch.Tensor | None = None  # (shape) Σ w_i τ_i

    def add(self, tau: TaskVector, weight: float, model: int, step: int) -> None:
        value = dense(tau)
        if self.total is None:
            self.total = torch.zeros_like(value)
        self.total.add_(value, alpha=weight)

    def finish(self) -> tuple[TaskVector, dict[str, Any]]:
        assert self.total is not None, "the engine adds at least one task vector or none at all"
        return self.total.div_(self.n_models), {}


class FoldMethod(MergeMethod):
    """A method whose update is `finish()` of a `Fold` over every model's τ of one tensor."""

    streaming: ClassVar[bool] = True  # one task vector in memory at a time (plus the fold's state)
    Params: ClassVar[type]
    # What one worker holds for a matrix, in words, for `star-dist plan`.
    memory_note: ClassVar[str] = ""

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    def params_dict(self) -> dict[str, Any]:
        return asdict(self.params)

    def fold(self, shape: tuple[int, ...], n_models: int) -> Fold:
        """The fold for one tensor: the method's own for a non-empty matrix, else the mean.

        Args:
            shape: the tensor's shape.
            n_models: N, every model of the merge (one without this tensor adds nothing).
        Returns:
            A fresh fold.
        """
        if len(shape) != 2 or 0 in shape:
            return MeanFold(n_models)
        return self.matrix_fold((shape[0], shape[1]), n_models)

    @abstractmethod
    def matrix_fold(self, shape: tuple[int, int], n_models: int) -> Fold:
        """The fold for an m×n matrix with m, n ≥ 1."""

    def working_bytes(self, shape: tuple[int, ...], n_models: int) -> int:
        """Peak bytes one worker holds while merging a tensor of this shape (for `plan`).

        Default: the base, one task vector, the accumulator and its output (float32), and the
        float64 thin SVD of one m×n matrix: its input copy, U, Vᵀ, and LAPACK's workspace (about
        another m×n plus 2·k²), as scripts/bench/memory_family.py measured for Iso-C.
        """
        numel = 1
        for d in shape:
            numel *= d
        if len(shape) != 2:
            return 4 * 4 * numel
        m, n = shape
        k = min(m, n)
        return 4 * 4 * numel + 8 * (2 * m * n + (m + n) * k + 2 * k * k)
