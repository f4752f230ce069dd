"""STAR: Spectral Truncation And Rescale (Lee et al., NAACL 2025).

For a 2-D task vector τ = U diag(σ) Vᵀ keep the smallest r with σ_1+…+σ_r ≥ (η/100)·Σσ and
rescale the kept values by c = Σσ / (σ_1+…+σ_r), so the nuclear norm is unchanged:
τ' = c · U_r diag(σ_r) V_rᵀ. Other tensors pass through. The engine then forms
W = W_base + λ Σ_i w_i τ'_i with w_i = 1/N by default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from star_dist.errors import ConfigError, DataError
from star_dist.finite import finite
from star_dist.methods.base import LowRank, StreamingMethod, TaskVector
from star_dist.methods.params import as_number
from star_dist.methods.spectral import TopMethod, kept_rank, lowrank_svd, to_device, top_factors
from star_dist.methods.spectrum import ValuesMethod, star_spectrum


@dataclass(frozen=True)
class StarParams:
    """η: the percentage of the nuclear norm the kept singular values must reach, in (0, 100]."""

    eta: float = 40.0

    def __post_init__(self) -> None:
        eta = as_number("star", "eta", self.eta)
        if not 0.0 < eta <= 100.0:
            raise ConfigError(f"star: eta must be in (0, 100] (a percentage of the nuclear norm), got {eta!r}")
        object.__setattr__(self, "eta", eta)


class Star(StreamingMethod):
    """Truncate each task vector to the top of its spectrum and rescale it to its nuclear norm."""

    name: ClassVar[str] = "star"
    Params: ClassVar[type] = StarParams
    reference: ClassVar[str] = (
        "Lee et al., STAR: Spectral Truncation and Rescale for Model Merging, NAACL 2025, "
        "https://aclanthology.org/2025.naacl-short.42/ (arXiv:2502.10339)"
    )

    def __init__(
        self,
        params: StarParams | None = None,
        top_method: TopMethod = "auto",
        values_method: ValuesMethod = "gram",
        device: torch.device | str | None = None,
    ) -> None:
        """STAR with its parameters and how a dense τ's spectrum is computed.

        Args:
            params: η (default 40).
            top_method: how the top-r vectors are found (`spectral.top_factors`); "auto" takes a
                certified float64 block iteration when the spectrum makes it cheap, else eigh.
            values_method: how every σ is found (`spectrum.star_spectrum`): "gram" (float64
                Gram matrix + eigvalsh, the reference values where rounding could move the
                rank) or "svd" (the float32 values-only SVD, the authors' values).
            device: where dense kernels compute; None computes where τ lives.
        """
        self.params = params if params is not None else StarParams()
        self.top_method: TopMethod = top_method
        self.values_method: ValuesMethod = values_method
        self.device = device

    def params_dict(self) -> dict[str, Any]:
        return asdict(self.params)

    def resolve_weights(self, given: list[float | None]) -> list[float]:
        """A plain mean by default: 1/N where a model gives no weight (as in the paper)."""
        n = len(given)
        return [1.0 / n if w is None else float(w) for w in given]

    def transform(self, tau: TaskVector) -> tuple[TaskVector, dict[str, Any]]:
        """τ' = U_r diag(σ') V_rᵀ, σ' = c·σ_r, as a `LowRank` of τ's dtype for a 2-D τ; else τ.

        For a dense τ the factors come from `spectral.top_factors`: left = U_r diag(σ') and
        right = V_rᵀ, except on the Gram routes for a wide τ (m < n), where left = c·U_r and
        right = diag(σ_r) V_rᵀ; only the product is the contract. Stats: kept_rank,
        nuclear_norm_before (Σσ) and nuclear_norm_after (Σσ'), plain floats.
        """
        if isinstance(tau, LowRank):
            return self._transform_lowrank(tau)
        if tau.dim() != 2:
            return tau, {}
        if tau.numel() == 0:  # (0, n) or (m, 0): no spectrum; skip LAPACK/cuSOLVER on an empty matrix
            return _zero(tau.shape, tau.device, tau.dtype), _stats(0, 0.0, 0.0)
        return self._transform_dense(tau)

    def _transform_dense(self, tau: torch.Tensor) -> tuple[TaskVector, dict[str, Any]]:
        """STAR of a non-empty (m, n) τ: its spectrum and rank, then the top-r factors, rescaled."""
        if not finite(tau):  # no mask the size of τ: that was the peak of a STAR merge
            raise DataError("STAR: the task vector holds NaN or Inf; check the input weights")
        home = tau.device  # the result goes back where τ came from
        tau = tau if self.device is None else to_device(tau, self.device)
        spectrum = star_spectrum(tau, self.params.eta, self.values_method)  # every σ and the rank r
        r, s = spectrum.rank, spectrum.values  # s (min(m, n),)
        if r == 0:
            return _zero(tau.shape, home, tau.dtype), _stats(0, 0.0, 0.0)
        left, right = top_factors(tau, r, self.top_method, s, side=spectrum.side)  # (m, r), (r, n) f64
        scale, before, after = _rescale(s, r)
        # left @ right is the rank-r truncation; c on either factor scales the product.
        dtype = tau.dtype  # float32, or float64 for a float64 merge
        update = LowRank(_row_major(left.mul_(scale), home, dtype), _row_major(right, home, dtype))
        return update, _stats(r, before, after)

    def _transform_lowrank(self, tau: LowRank) -> tuple[TaskVector, dict[str, Any]]:
        """The same STAR for left @ right from its exact thin SVD, never forming the m×n matrix."""
        if 0 in (*tau.shape, tau.rank):  # an empty matrix or a rank-0 adapter: nothing to keep
            return _zero(tau.shape, tau.left.device, tau.left.dtype), _stats(0, 0.0, 0.0)
        if not (finite(tau.left) and finite(tau.right)):
            raise DataError("STAR: the LoRA factors hold NaN or Inf; check the adapter weights")
        u, s, vh = lowrank_svd(tau.left, tau.right)  # (m, k), (k,), (k, n) float64
        r = kept_rank(s, self.params.eta)
        if r == 0:
            return _zero(tau.shape, tau.left.device, tau.left.dtype), _stats(0, 0.0, 0.0)
        scale, before, after = _rescale(s, r)
        left = u[:, :r] * (s[:r] * scale)  # (m, r) U_r diag(σ')
        dtype = tau.left.dtype
        return LowRank(left.to(dtype), vh[:r].to(dtype)), _stats(r, before, after)


def _row_major(factor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`factor` on `device` in `dtype`, contiguous: converted straight into row-major layout
    (a factor may be a transposed view), with no second copy; `to` alone keeps the strides."""
    return factor.to(device, dtype, memory_format=torch.contiguous_format).contiguous()


def _rescale(s: torch.Tensor, r: int) -> tuple[float, float, float]:
    """c = Σσ / Σ_{i≤r} σ_i in float64, and the nuclear norms before and after."""
    s64 = s.to(torch.float64)  # (k,)
    total = float(s64.sum())
    kept = float(s64[:r].sum())
    scale = total / kept
    return scale, total, scale * kept


def _zero(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> LowRank:
    """A rank-0 update: left @ right is an all-zero (m, n) matrix, never NaN."""
    m, n = shape
    left = torch.zeros(m, 0, dtype=dtype, device=device)  # (m, 0)
    right = torch.zeros(0, n, dtype=dtype, device=device)  # (0, n)
    return LowRank(left, right)


def _stats(r: int, before: float, after: float) -> dict[str, Any]:
    return {"kept_rank": r, "nuclear_norm_before": before, "nuclear_norm_after": after}
