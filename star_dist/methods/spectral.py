"""SVD building blocks for STAR: every singular value, the kept rank, the top-r factors.

STAR needs all singular values (their sum Σσ is the nuclear norm it preserves, and the kept
rank r is read off their cumulative sum) but only the top-r singular vectors, and only the
subspace they span: τ' = c · τ V_r V_rᵀ with one scale c for every kept value. So:

* values: LAPACK's values-only SVD in float32 (`singular_values`), exactly as the reference
  computed them, which matters for the rounding of the rank rule (`kept_rank`);
* vectors (`top_factors`), float64 and exact to far below float32 resolution:
  - ``"subspace"``: block power iteration on G = τᵀτ (never formed), its block size and step
    count planned from the known spectrum, its result certified by the Davis–Kahan bound
    (subspace angle ≤ 1e-9) or else replaced by ``"gram"``. Cheap when σ falls off past r,
    as it does for real task vectors.
  - ``"gram"``: the eigendecomposition of the float64 Gram matrix of the smaller side. Its
    top eigenvectors are accurate to ~eps64·σ_1²/(σ_r² − σ_{r+1}²), better than a float32
    SVD; the small σ are never taken from G (they lose half their digits there).
  - ``"svd"``: a float32 thin SVD, the authors' path; kept for comparison.
  - ``"auto"`` (the default): ``"subspace"`` when its planned cost is below ``"gram"``'s.

Factors are returned so that their product is the truncation, and no singular value is ever
divided by (safe for tiny or zero σ). For LoRA task vectors `lowrank_svd` gives the exact thin
SVD of left @ right from two QRs and an r×r SVD, never forming the m×n matrix.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from star_dist.errors import DataError

TopMethod = Literal["auto", "subspace", "gram", "svd"]

# Block power iteration: the certified subspace angle, a cap on the steps it may plan, a few
# steps of slack over the prediction, and a fixed seed for the start block (deterministic).
_SUBSPACE_TOL = 1e-9
_SUBSPACE_MAX_ITER = 40
_SUBSPACE_EXTRA_STEPS = 4
_SUBSPACE_SEED = 0
# A bound on the absolute error of a float32 values-only σ, over σ_1: backward-stable values
# are off by a small multiple of eps32·σ_1; this allows 8·√k·eps32 and at least 1e-6.
_EPS32 = float(torch.finfo(torch.float32).eps)


def singular_values(tau: torch.Tensor) -> torch.Tensor:
    """Every singular value of a 2-D tensor, descending, in float32 (float64 for float64 τ).

    Values-only LAPACK (gesdd with jobz='N'): accurate to the rounding of σ_1 for every σ,
    float32 like the reference's values, so the rank rule rounds as it does (see `kept_rank`);
    a float64 merge (`dtype: float64`) gets float64 values and rule.
    """
    dtype = torch.float64 if tau.dtype == torch.float64 else torch.float32
    return torch.linalg.svdvals(tau.to(dtype))  # (min(m, n),)


def kept_rank(s: torch.Tensor, eta: float) -> int:
    """STAR's rank: the smallest r ≥ 1 with σ_1 + … + σ_r ≥ (η/100)·Σσ (inclusive); 0 if Σσ = 0.

    `s` holds every singular value, descending. The rule is evaluated exactly as the authors'
    code does it, in float32: `torch.cumsum(s)`, `torch.sum(s) * eta / 100`, first index where
    the cumulative sum reaches the target (`searchsorted`, left side), capped at len(s).

    Rounding: for η < 100 the cumulative sums are far from the target in practice and the
    precision does not matter. At η = 100 it decides the result: for a numerically
    rank-deficient τ the trailing σ are float32 noise smaller than the rounding of Σσ, so the
    float32 cumulative sum can reach Σσ before the last value, and r stops short of
    min(m, n) at a place set by rounding alone. That place moves with the LAPACK build and
    the CPU: on the golden case of rank 8 plus float32 noise (96×96) the reference reports
    90, values-only SVD gives 90 on one CPU and 78 on another (MKL, AVX-512), a full float32
    SVD 91 and float64 values 96. No rule makes this portable, and none needs to: the values
    such ranks disagree on are below the float32 resolution of Σσ, so the merged weight
    agrees to float32 rounding whatever r the tail yields (tests/methods/test_star_golden.py
    checks exactly that).
    """
    values = s.detach() if s.dtype == torch.float64 else s.detach().to(torch.float32)  # (k,)
    if values.numel() == 0:
        return 0
    total = values.sum()  # () float32 as the reference sums (float64 values: float64)
    if not bool(total > 0):
        if bool(torch.isnan(total)):
            raise DataError("STAR: singular values are NaN; the task vector is not finite")
        return 0  # an all-zero τ: nothing to keep, and no 0/0 rescale
    cumulative = torch.cumsum(values, dim=0)  # (k,) float32
    target = total * eta / 100  # () float32, the reference's expression and order
    r = int(torch.searchsorted(cumulative, target.reshape(1)).item()) + 1
    return min(r, values.numel())


def _tall_f64(tau: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """τ or τᵀ, whichever has at least as many rows as columns, as one contiguous float64 copy.

    The Gram side is the smaller one; one copy (2× τ's float32 bytes) serves every product,
    and a wide τ is transposed once instead of gathered by strided column blocks per step.
    """
    wide = tau.shape[0] < tau.shape[1]
    view = tau.T if wide else tau  # (max, k), k = min(m, n)
    return view.to(dtype=torch.float64, memory_format=torch.contiguous_format), wide


def _as_factors(tall: torch.Tensor, basis: torch.Tensor, wide: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """From an orthonormal basis (k, r) of the top right singular subspace of `tall` to factors of τ."""
    projected = tall @ basis  # (max, r) = U_r diag(σ_r) on the long side
    if wide:
        return basis, projected.T  # (m, r) U_r, (r, n) diag(σ_r) V_rᵀ
    return projected, basis.T  # (m, r) U_r diag(σ_r), (r, n) V_rᵀ


def _gram_basis(tall: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r eigenvectors of the float64 Gram matrix G = tallᵀ tall, descending: (k, r)."""
    _, vectors = torch.linalg.eigh(tall.T @ tall)  # G (k, k); ascending eigenvalues
    return vectors[:, vectors.shape[1] - r :].flip(-1)  # (k, r)


def _gram_times(tall: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """G @ block = tallᵀ (tall @ block) without forming G: (k, b)."""
    return tall.T @ (tall @ block)  # (k, max) @ (max, b)


def _subspace_plan(s: torch.Tensor, r: int, n_rows: int) -> tuple[int, int] | None:
    """Block size b and predicted iterations q for `_subspace_basis`, or None if eigh is cheaper.

    With the spectrum known, block power iteration on G converges like ρ^q with
    ρ = (σ_{b+1}/σ_r)²; a random start is off by about √k, so q = log(tol/√k)/log ρ. Every
    b from r + 4 to min(k/2, 2r + 128) is tried (a gap in the spectrum just above r makes a
    small block converge at once). A step is two GEMMs and a QR, 4·n_rows·k·b + 4·k·b² flops,
    but narrow GEMMs are bound by reading the float64 matrix twice (16·n_rows·k bytes), which
    costs about as much as 16 more columns; against 2·n_rows·k² + 12·k³ for Gram + eigh
    (float64 eigh with vectors, measured here at about the GEMMs' flop rate).
    """
    k = s.numel()
    s64 = s.to(torch.float64)
    low, high = r + 4, min(k // 2, 2 * r + 128)
    if high < low or not bool(s64[r - 1] > 0):
        return None
    blocks = torch.arange(low, high + 1)  # candidate b
    rho = (s64[blocks] / s64[r - 1]) ** 2  # (nb,) convergence factor per step, < 1 past a gap
    with torch.no_grad():
        steps = torch.where(
            rho > 0,
            torch.ceil(math.log(_SUBSPACE_TOL / math.sqrt(k)) / torch.log(rho.clamp(max=1 - 1e-12))) + 1,
            torch.ones_like(rho),
        )
    cost = (steps + 1) * (4.0 * n_rows * k * (blocks + 16) + 4.0 * k * blocks**2)  # (nb,) + the check
    cost[steps > _SUBSPACE_MAX_ITER] = math.inf
    best = int(torch.argmin(cost))
    if not math.isfinite(float(cost[best])) or float(cost[best]) > 2.0 * n_rows * k * k + 12.0 * k**3:
        return None
    return int(blocks[best]), int(steps[best])


def _subspace_basis(tall: torch.Tensor, s: torch.Tensor, r: int, b: int, q: int) -> torch.Tensor | None:
    """Top-r right singular subspace of `tall` by float64 block power iteration, certified.

    After q steps, Rayleigh–Ritz on the block gives r Ritz vectors with values θ_i and residual
    R = G V_r − V_r diag(θ); by the Davis–Kahan sin θ theorem the angle to the exact subspace
    is ≤ ‖R‖_F / (θ_r − λ_{r+1}), with λ_{r+1} from the values-only SVD (inflated by its error).
    Returns None (the caller falls back to eigh) when that bound is not ≤ tol after a few
    extra steps. The start block is drawn from a fixed seed, so the result is deterministic.
    """
    k = tall.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(_SUBSPACE_SEED)
    start = torch.randn(k, b, generator=gen, dtype=torch.float64).to(tall.device)  # (k, b)
    basis, _ = torch.linalg.qr(start)  # (k, b)
    image = _gram_times(tall, basis)  # (k, b) G Q
    s64 = s.to(torch.float64)
    slack = max(1e-6, 8.0 * math.sqrt(k) * _EPS32) * float(s64[0])
    lam_next = (float(s64[r]) + slack) ** 2  # ≥ λ_{r+1} despite float32 values; r < b < k
    for step in range(1, q + _SUBSPACE_EXTRA_STEPS + 1):
        basis, _ = torch.linalg.qr(image)  # (k, b) one power step: span(G Q)
        image = _gram_times(tall, basis)  # (k, b)
        if step < q:
            continue
        # Rayleigh–Ritz in the block: Qᵀ G Q = W diag(θ) Wᵀ, Ritz vectors Q W.
        theta, rot = torch.linalg.eigh(basis.T @ image)  # (b,), (b, b) ascending
        top = rot[:, b - r :].flip(-1)  # (b, r)
        ritz = basis @ top  # (k, r)
        residual = image @ top - ritz * theta[b - r :].flip(-1)  # (k, r) G V_r − V_r diag(θ)
        gap = float(theta[b - r]) - lam_next
        if gap > 0 and float(torch.linalg.matrix_norm(residual)) <= _SUBSPACE_TOL * gap:
            return ritz
    return None


def top_factors(
    tau: torch.Tensor,
    r: int,
    method: TopMethod = "auto",
    s: torch.Tensor | None = None,
    info: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r truncation of a 2-D τ as float64 factors (left (m, r), right (r, n)).

    left @ right = U_r diag(σ_r) V_rᵀ, the projection of τ on its top-r singular subspace; no
    singular value is divided by. Methods:

    * ``"svd"``: float32 thin SVD (the authors' path); left = U_r diag(σ_r), right = V_rᵀ.
    * ``"gram"``: top-r eigenvectors of the float64 Gram matrix of the smaller side.
    * ``"subspace"``: float64 block power iteration sized from the known spectrum `s` (every
      singular value, from `singular_values`), certified to a subspace angle ≤ 1e-9 by the
      Davis–Kahan bound, else it falls back to ``"gram"``.
    * ``"auto"`` (default): ``"subspace"`` when its predicted cost is below Gram + eigh, else
      ``"gram"``.

    For the Gram-based methods the work is on τᵀ when τ is wide (m < n); then left = U_r and
    right = diag(σ_r) V_rᵀ; otherwise left = U_r diag(σ_r) and right = V_rᵀ. If `info` is
    given, the route taken is written to info["route"] (for benchmarks and tests).
    """
    if method == "svd":
        if info is not None:
            info["route"] = "svd"
        u, sv, vh = torch.linalg.svd(tau.to(torch.float32), full_matrices=False)
        left = (u[:, :r] * sv[:r]).to(torch.float64)  # (m, r) U_r diag(σ_r)
        return left, vh[:r].to(torch.float64)  # (r, n) V_rᵀ
    if method not in ("gram", "subspace", "auto"):
        raise ValueError(f"unknown top_factors method {method!r}; use 'auto', 'subspace', 'gram' or 'svd'")
    tall, wide = _tall_f64(tau)  # (max, k) float64: every Gram product is on the smaller side
    basis, route = None, "gram"
    if method != "gram" and r > 0:
        if s is None:
            raise ValueError(f"top_factors method {method!r} needs every singular value (s)")
        plan = _subspace_plan(s, r, tall.shape[0])
        if plan is None and method == "subspace":
            plan = (min(2 * r + 8, tall.shape[1]), _SUBSPACE_MAX_ITER)
        if plan is not None and plan[0] < tall.shape[1]:
            basis = _subspace_basis(tall, s, r, *plan)
            route = f"subspace(b={plan[0]}, steps={plan[1]})" + ("" if basis is not None else " -> gram")
    if basis is None:
        basis = _gram_basis(tall, r)  # (k, r)
    if info is not None:
        info["route"] = route
    return _as_factors(tall, basis, wide)


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
