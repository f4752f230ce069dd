"""SVD building blocks for STAR: every singular value, the kept rank, the top-r factors.

STAR needs all singular values (their sum Σσ is the nuclear norm it preserves) but only the
top-r singular vectors. So the values come from LAPACK's values-only SVD, and the vectors
from one of two exact routes (`top_factors`):

* ``"gram"``: the eigendecomposition of the float64 Gram matrix of the smaller side
  (G = τᵀτ or ττᵀ). Only the top-r eigenvectors are used; their accuracy depends on the
  gap λ_r − λ_{r+1} relative to λ_1 at float64 precision, far better than a float32 SVD.
  The small σ are never taken from G (they lose half their digits there).
* ``"svd"``: a thin float32 `torch.linalg.svd`, the authors' path.

Both return factors whose product is U_r diag(σ_r) V_rᵀ; STAR only rescales it, so it never
divides by a singular value (safe for tiny or zero σ). For LoRA task vectors `lowrank_svd`
gives the exact thin SVD of left @ right from two QRs and an r×r SVD.
"""

from __future__ import annotations

from typing import Literal

import torch

from star_dist.errors import MergeError

TopMethod = Literal["gram", "svd"]

# Row blocks for the float64 products, so no full float64 copy of τ is ever held.
_BLOCK_ELEMENTS = 1 << 22


def singular_values(tau: torch.Tensor) -> torch.Tensor:
    """Every singular value of a 2-D float32 tensor, descending, float32.

    Values-only LAPACK (gesdd with jobz='N'): accurate to float32 rounding of σ_1 for every σ,
    and the source the golden ranks were computed from (see `kept_rank`).
    """
    return torch.linalg.svdvals(tau.to(torch.float32))  # (min(m, n),)


def kept_rank(s: torch.Tensor, eta: float) -> int:
    """STAR's rank: the smallest r ≥ 1 with σ_1 + … + σ_r ≥ (η/100)·Σσ (inclusive); 0 if Σσ = 0.

    `s` holds every singular value, descending. The rule is evaluated exactly as the authors'
    code does it, in float32: `torch.cumsum(s)`, `torch.sum(s) * eta / 100`, first index where
    the cumulative sum reaches the target (`searchsorted`, left side), capped at len(s).

    Rounding: for η < 100 the cumulative sums are far from the target in practice and the
    precision does not matter. At η = 100 it decides the result: for a numerically
    rank-deficient τ the trailing σ are float32 noise smaller than the rounding of Σσ, so the
    float32 cumulative sum can reach Σσ before the last value, and r stops short of
    min(m, n) at a place set by rounding alone (the golden ranks 30 of 32 and 90 of 96). No
    rule on float64 values gives the golden ranks (an absolute tolerance on the tail would
    need to be ≥ 6.1e-8·Σσ for one case and < 3.3e-8·Σσ for another), and the values of a
    full `torch.linalg.svd` give 31, 31, 85 instead of 30, 32, 90; the same float32
    arithmetic on values-only SVD values (`singular_values`) gives every golden rank. Which
    rank such a tail yields can depend on the LAPACK build and CPU; the dropped values are
    below the float32 resolution of Σσ, so the merged weight agrees to float32 rounding
    whatever r the tail yields.
    """
    s32 = s.detach().to(torch.float32)  # (k,)
    if s32.numel() == 0:
        return 0
    total = s32.sum()  # () float32, as the reference sums
    if not bool(total > 0):
        if bool(torch.isnan(total)):
            raise MergeError("STAR: singular values are NaN; the task vector is not finite")
        return 0  # an all-zero τ: nothing to keep, and no 0/0 rescale
    cumulative = torch.cumsum(s32, dim=0)  # (k,) float32
    target = total * eta / 100  # () float32, the reference's expression and order
    r = int(torch.searchsorted(cumulative, target.reshape(1)).item()) + 1
    return min(r, s32.numel())


def _gram_f64(tall: torch.Tensor) -> torch.Tensor:
    """G = tallᵀ tall in float64, summed over row blocks: (k, k) for a (n_rows, k) input."""
    n_rows, k = tall.shape
    rows = max(1, _BLOCK_ELEMENTS // max(k, 1))
    gram = torch.zeros(k, k, dtype=torch.float64, device=tall.device)  # (k, k)
    for a in range(0, n_rows, rows):
        block = tall[a : a + rows].to(torch.float64)  # (rows, k)
        gram.addmm_(block.T, block)
    return gram


def _project_f64(tall: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """tall @ basis in float64 over row blocks: (n_rows, k) @ (k, r) -> (n_rows, r)."""
    n_rows, k = tall.shape
    rows = max(1, _BLOCK_ELEMENTS // max(k, 1))
    out = torch.empty(n_rows, basis.shape[1], dtype=torch.float64, device=tall.device)
    for a in range(0, n_rows, rows):
        out[a : a + rows] = tall[a : a + rows].to(torch.float64) @ basis  # (rows, r)
    return out


def top_factors(tau: torch.Tensor, r: int, method: TopMethod = "gram") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact rank-r truncation of a 2-D τ as factors (left (m, r), right (r, n)), float64.

    left @ right = U_r diag(σ_r) V_rᵀ. With ``"svd"`` and with ``"gram"`` on a tall or square τ,
    left = U_r diag(σ_r) and right = V_rᵀ. With ``"gram"`` on a wide τ (m < n) the work is
    done on τᵀ, so left = U_r and right = diag(σ_r) V_rᵀ. Either way the product is the
    projection of τ on its top-r singular subspace; no singular value is divided by.
    """
    m, n = tau.shape
    if method == "svd":
        u, s, vh = torch.linalg.svd(tau.to(torch.float32), full_matrices=False)
        left = (u[:, :r] * s[:r]).to(torch.float64)  # (m, r) U_r diag(σ_r)
        return left, vh[:r].to(torch.float64)  # (r, n) V_rᵀ
    if method != "gram":
        raise ValueError(f"unknown top_factors method {method!r}; use 'gram' or 'svd'")
    wide = m < n
    tall = tau.T if wide else tau  # (max, min): the Gram matrix is on the smaller side
    gram = _gram_f64(tall)  # (k, k), k = min(m, n)
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues, (k, k)
    basis = vectors[:, -r:].flip(-1) if r > 0 else vectors[:, :0]  # (k, r) top-r, descending
    projected = _project_f64(tall, basis)  # (max, r) = U diag(σ) on the long side
    if wide:
        return basis, projected.T  # (m, r) U_r, (r, n) diag(σ_r) V_rᵀ
    return projected, basis.T  # (m, r) U_r diag(σ_r), (r, n) V_rᵀ


def lowrank_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of left @ right without forming it: (U (m, k), σ (k,), Vᵀ (k, n)), float64.

    left (m, r), right (r, n), k = min(m, n, r). left = Q_l R_l and rightᵀ = Q_r R_r (reduced
    QR), so left @ right = Q_l (R_l R_rᵀ) Q_rᵀ and the SVD of the small middle matrix gives
    the rest. Cost O((m + n) r²); a zero factor gives σ = 0.
    """
    q_left, r_left = torch.linalg.qr(left.to(torch.float64))  # (m, a), (a, r), a = min(m, r)
    q_right, r_right = torch.linalg.qr(right.T.to(torch.float64))  # (n, b), (b, r)
    middle = r_left @ r_right.T  # (a, b)
    u_mid, s, vh_mid = torch.linalg.svd(middle, full_matrices=False)  # (a, k), (k,), (k, b)
    u = q_left @ u_mid  # (m, k)
    vh = vh_mid @ q_right.T  # (k, n)
    return u, s, vh
