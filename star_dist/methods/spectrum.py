"""Every singular value of a dense τ and STAR's kept rank, from one float64 Gram matrix.

STAR needs all k = min(m, n) singular values (Σσ and the rank rule) but only the top-r
vectors. A float32 values-only SVD (the reference, `spectral.singular_values`) is a
bidiagonalization: slow, and on GPUs far below peak. The Gram route is one matrix product and
a symmetric eigensolver: G = tallᵀ tall in float64 on the smaller side (SYRK on the CPU,
GEMMs on a GPU), σ_i = √λ_i(G). On the CPU (with SciPy) G is reduced to tridiagonal form
once, which gives the values and later the top-r vectors (tridiagonal.py); on a GPU torch's
eigvalsh, or eigh for a flat spectrum.

Accuracy (measured in scripts/bench/star_svd.py against a float64 SVD of the same τ): the σ
that carry the nuclear norm come out with relative error ~eps64·σ_1²/σ_i², far below the
float32 SVD's ~eps32·σ_1/σ_i; the tiny σ of a numerically rank-deficient τ get absolute error
~√(eps64)·σ_1 (they lose half their digits in G), comparable to the float32 SVD's ~eps32·σ_1.
So Σσ and the rescale are better than the reference's, and the rank is the exact rule's.

Where the two routes can differ: the authors' rule is evaluated in float32 on float32 values
(`spectral.kept_rank`), and their σ carry an error of their own. Both only matter when a
cumulative sum σ_1+…+σ_i lies within that rounding of the target (η/100)·Σσ: in practice at
η = 100 on a rank-deficient τ, whose trailing σ are below the float32 resolution of Σσ.
`certified_rank` decides the rank from the Gram values only when no value within the error
window of every sum could change it; otherwise `star_spectrum` computes the reference values
and applies the authors' rule to them ("gram->svd"), so the kept rank is always the one the
reference values give. A float64 τ (a `dtype: float64` merge) takes the float64 values-only
SVD: its Gram matrix would lose half of float64's digits for the small σ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from star_dist.methods import tridiagonal
from star_dist.methods.spectral import GramSide, gram_side, kept_rank, singular_values

ValuesMethod = Literal["gram", "svd"]

_U32 = float(torch.finfo(torch.float32).eps) / 2  # unit roundoff of float32
_EPS64 = float(torch.finfo(torch.float64).eps)
# Σ_i |σ̂_i − σ_i| of LAPACK's float32 values-only SVD, over k·u32·‖τ‖_F: measured ≤ 0.26 on
# 512² to 2048², 1024×4096 and 4096×1024, flat, low-rank + noise, power-law and rank-deficient
# matrices (scripts/bench/star_svd.py, "svd32_sum_abs_err_over_k_u32_fro"); allowed: 2, ~8×.
_REFERENCE_ERROR = 2.0
_POWER_STEPS = 8  # for `looks_flat`'s estimate of ‖τ‖_2²


@dataclass(frozen=True)
class Spectrum:
    """The singular values STAR uses, its kept rank, and what computed them."""

    values: torch.Tensor  # (k,) descending: float64 on the Gram route, the reference's otherwise
    rank: int  # the kept rank r (0 for an all-zero τ)
    route: str  # "gram", "gram->svd" (the reference values decided the rank) or "svd"
    side: GramSide | None  # τ's tall float64 side with G formed (Gram route), for the vectors


def star_spectrum(
    tau: torch.Tensor, eta: float, method: ValuesMethod = "gram", device: torch.device | str | None = None
) -> Spectrum:
    """Every σ of a 2-D τ and the kept rank at η, by the Gram route or the reference SVD.

    Args:
        tau: the (m, n) task vector, finite, float32 (float64 takes the float64 SVD).
        eta: STAR's percentage of the nuclear norm, in (0, 100].
        method: ``"gram"`` (default): float64 Gram matrix + eigvalsh, certified rank, else
            the reference values decide it; ``"svd"``: the float32 values-only SVD only.
        device: where to compute; None keeps τ's device.

    Returns:
        The Spectrum; its rank equals `kept_rank(singular_values(τ), η)` on either route.
    """
    if method not in ("gram", "svd"):
        raise ValueError(f"unknown spectrum method {method!r}; use 'gram' or 'svd'")
    if method == "svd" or tau.dtype == torch.float64:
        values = singular_values(tau if device is None else tau.to(device))  # (k,)
        return Spectrum(values, kept_rank(values, eta), "svd", None)
    side = gram_side(tau, form=True, device=device)  # tall (max, k), G (k, k) float64
    reduced = tridiagonal.reduce(side.gram) if side.gram is not None else None  # CPU + SciPy
    if reduced is not None:  # G reduced once: values now, the r vectors later from the same form
        side = replace(side, tridiagonal=reduced)
        values = reduced.values().flip(0).clamp_(min=0).sqrt_()  # (k,) descending
    elif looks_flat(side):  # the vectors will need eigh: one call gives the values too
        side, values = _eigh(side)
    else:
        values = gram_values(side)  # (k,) float64
    rank = certified_rank(values, eta, rank_window(values, tau.shape, eta))
    if rank is not None:
        return Spectrum(values, rank, "gram", side)
    reference = singular_values(tau.to(side.tall.device))  # (k,) float32, as the authors' rule reads them
    return Spectrum(values, kept_rank(reference, eta), "gram->svd", side)


def gram_values(side: GramSide) -> torch.Tensor:
    """σ_i = √λ_i(G), descending, float64 (k,); λ < 0 from rounding read as σ = 0."""
    assert side.gram is not None, "gram_values needs the formed Gram matrix"
    lam = torch.linalg.eigvalsh(side.gram)  # (k,) ascending
    return lam.flip(0).clamp_(min=0).sqrt_()  # (k,) descending


def _eigh(side: GramSide) -> tuple[GramSide, torch.Tensor]:
    """G's eigenvalues as σ (k,), descending, and its eigenvectors kept on the side as eigh gives
    them (ascending: flipping all k would copy a (k, k) matrix; the caller takes the top r)."""
    assert side.gram is not None
    lam, vectors = torch.linalg.eigh(side.gram)  # (k,), (k, k) ascending
    values = lam.flip(0).clamp_(min=0).sqrt_()  # (k,) descending
    return replace(side, vectors=vectors), values


def looks_flat(side: GramSide) -> bool:
    """Whether τ's stable rank ‖τ‖_F² / ‖τ‖_2² exceeds k/10, from trace(G) and a power estimate.

    A flat spectrum (a random matrix: stable rank k/4 when square) keeps a large r with small
    gaps around it, where no block iteration beats eigh; then one eigh gives values and vectors
    at once instead of eigvalsh followed by eigh. Task vectors are heavy-tailed (stable rank
    far below k/10) and take eigvalsh + the certified iteration. Either way the result is exact;
    this only picks the cheaper order. 8 power steps from a fixed start underestimate ‖τ‖_2²,
    so a borderline spectrum leans to "flat".
    """
    assert side.gram is not None
    k = side.gram.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(k, 1, generator=gen, dtype=torch.float64).to(side.gram.device)  # (k, 1)
    for _ in range(_POWER_STEPS):
        v = side.gram @ v  # (k, 1)
        v = v / torch.linalg.vector_norm(v).clamp(min=1e-300)
    top = (v.T @ side.gram @ v).squeeze()  # () Rayleigh quotient ≤ λ_1
    trace, top = torch.stack([side.gram.diagonal().sum(), top]).tolist()
    return trace > 0 and trace > top * k / 10


def rank_window(values: torch.Tensor, shape: tuple[int, ...], eta: float) -> float:
    """How far the reference rule's float32 cumulative sums and target can sit from the exact ones.

    Three parts, each an upper bound of |error| of a partial sum σ_1+…+σ_i, and the target
    η/100·Σσ carries the first two scaled by η/100:
    * the reference values: Σ|σ̂ − σ| ≤ 2·k·u32·‖τ‖_F (measured ≤ 0.26·k·u32·‖τ‖_F);
    * ours: G carries an error δ ≤ (max(m, n) + k)·eps64·‖τ‖_F² (the GEMM's and eigvalsh's
      backward errors), and |√(λ + δ) − √λ| ≤ min(√δ, δ/σ) per value;
    * float32 rounding in the rule: the cumulative sum (rounded once), the sum (a cascade,
      ≤ (log2 k + 1)·u32·Σσ), the target (two roundings).

    Args:
        values: the Gram route's σ (k,), descending.
        shape: τ's (m, n).
        eta: the percentage η.

    Returns:
        The window w ≥ 0, in units of σ.
    """
    s = values.detach().cpu().to(torch.float64)  # (k,)
    k = s.numel()
    fro2 = float((s * s).sum())  # ‖τ‖_F² = Σσ²
    total = float(s.sum())
    reference = _REFERENCE_ERROR * k * _U32 * math.sqrt(fro2)
    delta = (max(shape) + k) * _EPS64 * fro2
    ours = float(torch.minimum(torch.full_like(s, math.sqrt(delta)), delta / s.clamp(min=1e-300)).sum())
    rounding = (math.log2(max(k, 2)) + 4.0) * _U32 * total
    return (1.0 + eta / 100.0) * (reference + ours) + 2.0 * rounding


def certified_rank(values: torch.Tensor, eta: float, window: float) -> int | None:
    """The rule's rank from float64 values when every sum within `window` gives the same, else None.

    r is the first i with σ_1+…+σ_i ≥ (η/100)·Σσ. Certain when σ_1+…+σ_(r−1) < target − w
    and either σ_1+…+σ_r ≥ target + w or r = k (the rule caps r at k). An all-zero τ gives 0.

    Args:
        values: every σ (k,), descending, float64.
        eta: the percentage η.
        window: the error bound of every partial sum and of the target (`rank_window`).

    Returns:
        The kept rank, or None when rounding could move it.
    """
    s = values.detach().cpu().to(torch.float64)  # (k,)
    k = s.numel()
    total = float(s.sum())
    if k == 0 or not total > 0:
        return 0
    cumulative = torch.cumsum(s, 0)  # (k,) float64
    target = total * eta / 100.0
    first = int(torch.searchsorted(cumulative, torch.tensor([target - window], dtype=torch.float64)))
    if first >= k - 1 or float(cumulative[first]) >= target + window:
        return min(first + 1, k)
    return None
