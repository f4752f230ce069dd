"""The contract between the merge engine and the merge methods.

Methods are pure tensor math: no file I/O, no Ray, no config parsing. The engine
(`star_dist.merge_tensor`) reads tensors, upcasts them to float32, computes task vectors
`τ_i = W_i − W_base`, feeds them to a method, adds the result to the base and casts back.

Two shapes of method exist, because memory must not grow with the number of models:

* `StreamingMethod`: `W = W_base + λ · Σ_i w_i · f(τ_i)`. The engine holds one task
  vector at a time and accumulates (STAR, task arithmetic, average).
* `JointMethod`: needs every model's value at the same position (TIES sign election).
  A first streaming pass calls `prepare(τ_i, i)` once per model on the whole task vector
  (TIES: its trim rule); a second pass hands `merge_block` the same row block of every
  task vector, with the block's flat offset, so the engine can bound memory by working on
  row blocks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class LowRank:
    """A matrix held as `left @ right` and never formed: left is (m, r), right is (r, n).

    Used for LoRA task vectors (`s·B @ A`) and for STAR's truncated result
    (`U_r diag(σ') @ V_rᵀ`), so a rank-16 update of a 4096×4096 weight costs 2·16·4096 numbers.
    """

    left: torch.Tensor  # (m, r)
    right: torch.Tensor  # (r, n)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def dense(self) -> torch.Tensor:
        """The full (m, n) matrix; only for tests and for methods that need it (TIES)."""
        return self.left @ self.right


TaskVector = torch.Tensor | LowRank


def dense(tau: TaskVector) -> torch.Tensor:
    """A task vector as a plain tensor, forming it only when it is a `LowRank`."""
    return tau.dense() if isinstance(tau, LowRank) else tau


class MergeMethod(ABC):
    """Common surface of every method: its name, its validated params, its weight defaults."""

    name: ClassVar[str]
    streaming: ClassVar[bool]
    # The paper or reference the method follows, shown in the model card.
    reference: ClassVar[str] = ""
    # Parameters a model may set for itself under `models[i].parameters` (TIES: density).
    per_model_params: ClassVar[tuple[str, ...]] = ()

    def resolve_weights(self, given: list[float | None]) -> list[float]:
        """The weights `w_i` the engine uses, from the config's (None where a model gives none).

        Default: a missing weight is 1 (task arithmetic, TIES, as mergekit). STAR uses 1/N;
        average normalizes so the weights sum to 1.
        """
        return [1.0 if w is None else float(w) for w in given]

    def params_dict(self) -> dict[str, Any]:
        """The method's own parameters, for the model card and the report."""
        return {}


class StreamingMethod(MergeMethod):
    """`W = W_base + λ Σ_i w_i f(τ_i)`, one task vector at a time."""

    streaming: ClassVar[bool] = True
    # f(τ) = τ: the engine may then fuse the whole weighted sum into one pass over the inputs.
    identity: ClassVar[bool] = False

    @abstractmethod
    def transform(self, tau: TaskVector) -> tuple[TaskVector, dict[str, Any]]:
        """Return `f(τ)` (float32, same shape, dense or `LowRank`) and stats for the report.

        `tau` is float32. For STAR on a 2-D tensor the stats hold `kept_rank`,
        `nuclear_norm_before` and `nuclear_norm_after` (plain Python numbers).
        """


class JointMethod(MergeMethod):
    """Methods that must see all models at one position at once (TIES)."""

    streaming: ClassVar[bool] = False

    @abstractmethod
    def prepare(self, tau: torch.Tensor, model: int = 0) -> Any:
        """A statistic of model `model`'s whole task vector (TIES: its trim rule)."""

    @abstractmethod
    def merge_block(
        self, taus: list[torch.Tensor], weights: list[float], prepared: list[Any], offset: int = 0
    ) -> torch.Tensor:
        """The merged update for one row block of every model's task vector, before λ.

        `taus[i]` is rows [a, b) of model i's task vector (compute dtype); `prepared[i]` is
        what `prepare` returned for model i; `offset` is the flat index of the block's first
        entry. Returns a tensor of the block's shape and dtype.
        """
