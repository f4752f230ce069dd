"""Task arithmetic and plain weight averaging: the identity transform, differing in weights.

Both are `W = W_base + λ Σ_i w_i τ_i`. Task arithmetic takes the weights as given (a missing
weight is 1, as mergekit's `task_arithmetic`); average normalizes them to sum to 1, so with
λ = 1 it is `Σ_i w_i W_i / Σ_i w_i`, mergekit's `linear` with its default `normalize: true`
(equal weights give the plain mean of the fine-tuned models). Both take mergekit's
`normalize` flag: task arithmetic divides by Σ w_i when it is true (default false; a sum
below 1e-8 in magnitude divides by 1, as mergekit), average sums without dividing when false.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from star_dist.errors import ConfigError
from star_dist.methods.base import StreamingMethod, TaskVector
from star_dist.methods.params import as_flag


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
    """f(τ) = τ: the engine's weighted sum does all the work."""

    Params: ClassVar[type]

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
        """The weights as given (a missing one is 1); with normalize, over their sum."""
        raw = super().resolve_weights(given)
        if not self.params.normalize:
            return raw
        total = sum(raw)
        return [w / (total if abs(total) >= 1e-8 else 1.0) for w in raw]


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
        """w_i / Σ w_j with a missing weight = 1; ConfigError if the weights sum to 0."""
        raw = super().resolve_weights(given)
        if not self.params.normalize:
            return raw
        total = sum(raw)
        if total == 0.0:
            raise ConfigError(
                f"average: the model weights sum to 0 ({raw}), so they cannot be normalized; "
                "give weights with a non-zero sum"
            )
        return [w / total for w in raw]
