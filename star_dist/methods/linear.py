"""Task arithmetic and plain weight averaging: the identity transform, differing in weights.

Both are `W = W_base + λ Σ_i w_i τ_i`. Task arithmetic takes the weights as given (a missing
weight is 1, as mergekit's `task_arithmetic`); average normalizes them to sum to 1, so with
λ = 1 it is `Σ_i w_i W_i / Σ_i w_i`, mergekit's `linear` with its default `normalize: true`
(equal weights give the plain mean of the fine-tuned models).
"""

from __future__ import annotations

from typing import Any, ClassVar

from star_dist.errors import ConfigError
from star_dist.methods.base import StreamingMethod, TaskVector
from star_dist.methods.params import NoParams


class _Identity(StreamingMethod):
    """f(τ) = τ: the engine's weighted sum does all the work."""

    Params: ClassVar[type] = NoParams

    def __init__(self, params: NoParams | None = None) -> None:
        self.params = params if params is not None else NoParams()

    def transform(self, tau: TaskVector) -> tuple[TaskVector, dict[str, Any]]:
        """The task vector itself (dense or `LowRank`), no stats."""
        return tau, {}


class TaskArithmetic(_Identity):
    """W = W_base + λ Σ_i w_i τ_i, a missing weight being 1."""

    name: ClassVar[str] = "task_arithmetic"
    reference: ClassVar[str] = (
        "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, https://arxiv.org/abs/2212.04089"
    )


class Average(_Identity):
    """The weighted mean of the models: task arithmetic with weights normalized to sum to 1."""

    name: ClassVar[str] = "average"
    reference: ClassVar[str] = (
        "Wortsman et al., Model soups: averaging weights of multiple fine-tuned models "
        "improves accuracy without increasing inference time, ICML 2022, "
        "https://arxiv.org/abs/2203.05482"
    )

    def resolve_weights(self, given: list[float | None]) -> list[float]:
        """w_i / Σ w_j with a missing weight = 1; ConfigError if the weights sum to 0."""
        raw = super().resolve_weights(given)
        total = sum(raw)
        if total == 0.0:
            raise ConfigError(
                f"average: the model weights sum to 0 ({raw}), so they cannot be normalized; "
                "give weights with a non-zero sum"
            )
        return [w / total for w in raw]
