"""SVD building blocks for STAR: every singular value, the kept rank, the top-r factors.

STAR needs all singular values (their sum Σσ is the nuclear norm it preserves, and the kept
rank r is read off their cumulative sum) but only the top-r singular vectors, and only the
subspace they span: τ' = c · τ V_r V_rᵀ with one scale c for every kept value. So:

* values: the reference is LAPACK's values-only SVD in float32 (`singular_values`), exactly
  as the authors computed them, which matters for the rounding of the rank rule
  (`kept_rank`); the default route takes them from the float64 Gram matrix instead and
  falls back to the reference where rounding could move the rank (`spectrum.py`);
* vectors (`top_factors`), float64 and exact to far below float32 resolution:
  - ``"subspace"``: block power iteration on G = τᵀτ (the Gram matrix of the smaller side,
    reused when the values route formed it), its block size and step count planned from the
    known spectrum, its result certified by the Davis–Kahan bound (subspace angle ≤ 1e-9)
    or else replaced by ``"gram"``. Cheap when σ falls off past r, as it does for real
    task vectors.
  - ``"gram"``: the eigendecomposition of the float64 Gram matrix. Its top eigenvectors are
    accurate to ~eps64·σ_1²/(σ_r² − σ_{r+1}²), better than a float32 SVD.
  - ``"svd"``: a float32 thin SVD, the authors' path; kept for comparison.
  - ``"auto"`` (the default): ``"subspace"`` when its planned cost is below ``"gram"``'s.

Every function computes on the device of its input (`GramSide` carries it), so one code
path serves CPU and CUDA workers.

Factors are returned so that their product is the truncation, and no singular value is ever
divided by (safe for tiny or zero σ). For LoRA task vectors `lowrank_svd` gives the exact thin
SVD of left @ right from two QRs and an r×r SVD, never forming the m×n matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from star_dist.errors import DataError
from star_dist.methods import host_blas
from star_dist.methods.tridiagonal import Tridiagonal

TopMethod = Literal["auto", "subspace", "gram", "svd"]

# Block power iteration: the certified subspace angle, a cap on the steps it may plan, a few
# steps of slack over the prediction, and a fixed seed for the start block (deterministic).
_SUBSPACE_TOL = 1e-9
_SUBSPACE_MAX_ITER = 40
_SUBSPACE_EXTRA_STEPS = 4
_SUBSPACE_SEED = 0
# Products with τ upcast it to float64 one row block at a time, about this many elements
# (32 MiB) per block and at least this many rows (each block's GEMM stays efficient): no
# float64 copy of τ is ever held, which was two float32 copies of every dense matrix.
_BLOCK_ELEMENTS = 1 << 22
_BLOCK_MIN_ROWS = 256
_MIRROR_ROWS = 256  # rows per band when G's upper triangle is copied onto its lower one
# Machine epsilons, for the error allowances of the known σ (`_next_eigenvalue_bound`).
_EPS32 = float(torch.finfo(torch.float32).eps)
_EPS64 = float(torch.finfo(torch.float64).eps)


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

    Args:
        s: every singular value of τ, descending, (k,) float32 (float64 for a float64 merge), any device.
        eta: the percent of the nuclear norm to keep, in (0, 100].
    Returns:
        The rank r, 0 ≤ r ≤ k (0 only when Σσ = 0 or k = 0).
    Raises:
        DataError: singular values that are NaN (a task vector that is not finite).
    """
    # On the CPU, whatever device made the values: one small copy, and the float32 cumulative
    # sum rounds the same everywhere (the CPU accumulates it in float64 and rounds once).
    values = s.detach().cpu()
    values = values if values.dtype == torch.float64 else values.to(torch.float32)  # (k,)
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


@dataclass(frozen=True)
class GramSide:
    """τ as one tall matrix (τᵀ when τ is wide) and, once formed, its float64 Gram matrix.

    The Gram side is the smaller one: G = tallᵀ tall is (k, k), k = min(m, n). The values
    route (`spectrum.star_spectrum`) forms G once, and the vectors reuse it, so a block power
    step costs one (k, k) @ (k, b) product instead of two passes over τ. `tall` stays in τ's
    own dtype; every product reads it as float64 row blocks (`row_blocks`), so the float64
    arithmetic is unchanged and the memory is τ's own plus one block.
    """

    tall: torch.Tensor  # (max(m, n), k) τ, or a transposed view of τ when wide; τ's dtype
    wide: bool  # True when tall = τᵀ (m < n)
    gram: torch.Tensor | None = None  # (k, k) float64 tallᵀ tall, or None when not formed
    vectors: torch.Tensor | None = None  # (k, k) G's eigenvectors, ascending as eigh gives them, when it ran
    tridiagonal: Tridiagonal | None = None  # G reduced once on the CPU: values and top vectors from it

    def row_blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, tall[rows] in float64) for consecutive row blocks covering `tall`.

        One float64 buffer is refilled for every block (a view of τ itself when τ is float64),
        so a block is valid only until the next one is taken: use it at once. Each block fills
        the front of the buffer, so even the last, shorter one is dense (row-major, or a
        column-major view), the layouts BLAS reads without a copy.
        """
        n_rows, k = self.tall.shape
        step = min(n_rows, max(_BLOCK_MIN_ROWS, _BLOCK_ELEMENTS // max(k, 1)))
        upcast = self.tall.dtype != torch.float64
        # A wide τ's tall side is the view τᵀ, whose row blocks are column blocks of τ: copy
        # them in τ's own layout and hand out the transposed view (GEMMs read either at full
        # speed), not an element-wise transpose (2048×8192: 0.02 s against 0.13 s).
        as_columns = upcast and self.wide and k > 1
        buffer = torch.empty(step * k, dtype=torch.float64, device=self.tall.device) if upcast else None
        for start in range(0, n_rows, step):
            rows = slice(start, min(start + step, n_rows))
            count = rows.stop - start
            if buffer is None:
                yield rows, self.tall[rows]  # (rows, k) float64 already
            elif as_columns:
                yield rows, buffer[: k * count].view(k, count).copy_(self.tall[rows].T).T  # (rows, k) view
            else:
                yield rows, buffer[: count * k].view(count, k).copy_(self.tall[rows])  # (rows, k)

    def times(self, block: torch.Tensor) -> torch.Tensor:
        """G @ block, (k, b): from the formed G, else tallᵀ (tall @ block) without forming it."""
        if self.gram is not None:
            return self.gram @ block  # (k, k) @ (k, b)
        out = torch.zeros(self.tall.shape[1], block.shape[1], dtype=torch.float64, device=block.device)  # (k, b)
        for _, part in self.row_blocks():
            out.addmm_(part.T, part @ block)  # (k, rows) @ (rows, b)
        return out

    def project(self, basis: torch.Tensor) -> torch.Tensor:
        """tall @ basis, (max, r) float64, for a (k, r) float64 basis: the transposed view of
        a contiguous (r, max) matrix.

        Written column-major: with a wide τ's blocks (column-major views, `row_blocks`) a
        row-major result is 3.4× slower (1024×4096, r = 311: 0.24 against 0.07 s), and a
        tall τ's blocks run as fast either way. A wide τ's right factor is then contiguous.
        """
        out = torch.empty(basis.shape[1], self.tall.shape[0], dtype=torch.float64, device=basis.device).T  # (max, r)
        for rows, block in self.row_blocks():
            torch.matmul(block, basis, out=out[rows])  # (rows, k) @ (k, r)
        return out


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`: asynchronous only host → GPU, where the stream orders the copy
    before its use; a copy to the host must be complete before the CPU reads it.

    Args:
        tensor: any tensor.
        device: where it is needed.
    Returns:
        The tensor itself when already there, else a copy.
    """
    return tensor.to(device, non_blocking=torch.device(device).type == "cuda")


def gram_side(tau: torch.Tensor, form: bool = True, device: torch.device | str | None = None) -> GramSide:
    """τ (or τᵀ, so the Gram side is the smaller) on `device`, its float64 G formed if `form`.

    Args:
        tau: a 2-D task vector (float32, or any float dtype: products read it as float64).
        form: whether to form G = tallᵀ tall (one SYRK or GEMM pass; the dense routes need it).
        device: where to compute; None keeps τ's device (a GPU worker passes its cuda device).

    Returns:
        The GramSide. It holds τ itself (moved to `device` if needed), not a float64 copy.
    """
    tau = tau if device is None else to_device(tau, device)  # (m, n)
    wide = tau.shape[0] < tau.shape[1]
    tall = tau.T if wide else tau  # (max, k), a view: GEMMs read either layout at full speed
    side = GramSide(tall, wide)
    return replace(side, gram=_gram(side)) if form else side


def _gram(side: GramSide) -> torch.Tensor:
    """G = tallᵀ tall (k, k) float64, summed over row blocks, exactly symmetric.

    On the host SciPy's dsyrk forms one triangle, half a GEMM's flops (`host_blas.syrk_into`;
    2048², one thread: 0.29 s against 0.39 s for the blocked GEMMs); elsewhere (a GPU, or no
    SciPy) `_gram_blocked`.
    """
    host = host_blas.loaded() if side.tall.device.type == "cpu" else None
    if host is None:
        return _gram_blocked(side)
    k = side.tall.shape[1]
    gram = torch.empty(k, k, dtype=torch.float64)  # (k, k)
    with host.threads():
        for index, (_, block) in enumerate(side.row_blocks()):
            host_blas.syrk_into(host, gram, block, accumulate=index > 0)
    _mirror_upper(gram)
    return gram


def _mirror_upper(gram: torch.Tensor) -> None:
    """Copy G's upper triangle onto its lower one in place, a band of rows at a time (no
    (k, k) temporary)."""
    k = gram.shape[0]
    for start in range(0, k, _MIRROR_ROWS):
        band = slice(start, min(start + _MIRROR_ROWS, k))
        gram[band, :start] = gram[:start, band].T  # the band's rows left of the diagonal block
        square = gram[band, band]  # (b, b) the diagonal block: its own upper onto its lower
        square.copy_(square.triu() + square.triu(1).T)


def _gram_blocked(side: GramSide) -> torch.Tensor:
    """G from the blocks on and above the diagonal by GEMMs, mirrored below (torch has no SYRK).

    With c column blocks the c(c+1)/2 products cost (c+1)/(2c) of the full GEMM (62.5% at
    c = 4; blocks of ≥ 256 columns keep each GEMM efficient), and G comes out exactly symmetric.
    """
    k = side.tall.shape[1]
    c = 4 if k >= 1024 else 2 if k >= 512 else 1
    edges = [round(i * k / c) for i in range(c + 1)]
    gram = torch.zeros(k, k, dtype=torch.float64, device=side.tall.device)  # (k, k)
    parts = [slice(edges[j], edges[j + 1]) for j in range(c)]
    pairs = [(parts[j], parts[col]) for j in range(c) for col in range(j, c)]  # on and above the diagonal
    for _, block in side.row_blocks():
        for rows, cols in pairs:
            gram[rows, cols].addmm_(block[:, rows].T, block[:, cols])  # (k_j, b) @ (b, k_c)
    for rows, cols in pairs:
        if rows != cols:
            gram[cols, rows] = gram[rows, cols].T
    return gram


def _as_factors(side: GramSide, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From an orthonormal basis (k, r) of the top right singular subspace of `tall` to factors of τ."""
    projected = side.project(basis)  # (max, r) = U_r diag(σ_r) on the long side
    if side.wide:
        return basis, projected.T  # (m, r) U_r, (r, n) diag(σ_r) V_rᵀ
    return projected, basis.T  # (m, r) U_r diag(σ_r), (r, n) V_rᵀ


def _gram_basis(side: GramSide, r: int) -> torch.Tensor:
    """Top-r eigenvectors of the float64 Gram matrix G = tallᵀ tall, descending: (k, r)."""
    if side.tridiagonal is not None:  # G reduced to tridiagonal form: r vectors from it
        return side.tridiagonal.top_vectors(r)  # (k, r)
    vectors = side.vectors  # the values route may already have run eigh (`spectrum.star_spectrum`)
    if vectors is None:
        _, vectors = torch.linalg.eigh(side.gram if side.gram is not None else _gram(side))  # ascending
    return vectors[:, vectors.shape[1] - r :].flip(-1)  # (k, r): only the kept columns are copied


def _subspace_plan(s: torch.Tensor, r: int, n_rows: int, formed: bool = False) -> tuple[int, int] | None:
    """Block size b and predicted iterations q for `_subspace_basis`, or None if eigh is cheaper.

    With the spectrum known, block power iteration on G converges like ρ^q with
    ρ = (σ_{b+1}/σ_r)²; a random start is off by about √k, so q = log(tol/√k)/log ρ. Every
    b from r + 4 to min(k/2, 2r + 128) is tried (a gap in the spectrum just above r makes a
    small block converge at once). Costs, in flops at the GEMM rate (measured here, 1 thread):
    a step is two GEMMs over τ, 4·n_rows·k·b, or with G formed one (k, k) GEMM, 2·k²·b; narrow
    GEMMs are bound by reading the float64 matrix (twice, or G once), which costs about as much
    as 16 more columns; plus a QR, 4·k·b² at about a third of the GEMM rate. Against eigh with
    vectors: 2·n_rows·k² + 12·k³ from τ, 9·k³ on a formed G.
    """
    k = s.numel()
    s64 = s.detach().cpu().to(torch.float64)  # (k,) the plan is scalar work: on the host, whatever the device
    low, high = r + 4, min(k // 2, 2 * r + 128)
    if high < low or not bool(s64[r - 1] > 0):
        return None
    blocks = torch.arange(low, high + 1)  # candidate b
    rho = (s64[blocks] / s64[r - 1]) ** 2  # (nb,) convergence factor per step, < 1 past a gap
    steps = torch.where(
        rho > 0,
        torch.ceil(math.log(_SUBSPACE_TOL / math.sqrt(k)) / torch.log(rho.clamp(max=1 - 1e-12))) + 1,
        torch.ones_like(rho),
    )
    if formed:
        step_cost, eigh_cost = 2.0 * k * k * (blocks + 16) + 12.0 * k * blocks**2, 9.0 * k**3
    else:
        step_cost = 4.0 * n_rows * k * (blocks + 16) + 4.0 * k * blocks**2
        eigh_cost = 2.0 * n_rows * k * k + 12.0 * k**3
    cost = (steps + 1) * step_cost  # (nb,) + the check
    cost[steps > _SUBSPACE_MAX_ITER] = math.inf
    best = int(torch.argmin(cost))
    if not math.isfinite(float(cost[best])) or float(cost[best]) > eigh_cost:
        return None
    return int(blocks[best]), int(steps[best])


def _next_eigenvalue_bound(s: torch.Tensor, r: int) -> float:
    """An upper bound of λ_{r+1}(G) from the known σ, inflated by their error.

    float32 values (values-only SVD) are off by a small multiple of eps32·σ_1: allow
    8·√k·eps32·σ_1, at least 1e-6·σ_1. float64 values from G's own eigenvalues are off by
    eigvalsh's backward error, a small multiple of k·eps64·λ_1: allow 4·k·eps64·λ_1.
    """
    k = s.numel()
    s64 = s.to(torch.float64)
    if s.dtype == torch.float64:
        return float(s64[r]) ** 2 + 4.0 * k * _EPS64 * float(s64[0]) ** 2
    slack = max(1e-6, 8.0 * math.sqrt(k) * _EPS32) * float(s64[0])
    return (float(s64[r]) + slack) ** 2  # r < b < k


def _certified(basis: torch.Tensor, image: torch.Tensor, r: int, lam_next: float) -> torch.Tensor | None:
    """Rayleigh–Ritz on the block, and its Davis–Kahan certificate: the Ritz vectors (k, r) or None.

    Qᵀ G Q = W diag(θ) Wᵀ gives Ritz vectors Q W with residual R = G V_r − V_r diag(θ); the angle
    to the exact subspace is ≤ ‖R‖_F / (θ_r − λ_{r+1}). One host sync (the two scalars).
    """
    b = basis.shape[1]
    theta, rot = torch.linalg.eigh(basis.T @ image)  # (b,), (b, b) ascending
    top = rot[:, b - r :].flip(-1)  # (b, r)
    ritz = basis @ top  # (k, r)
    residual = image @ top - ritz * theta[b - r :].flip(-1)  # (k, r) G V_r − V_r diag(θ)
    checks = torch.stack([theta[b - r] - lam_next, torch.linalg.matrix_norm(residual)]).tolist()
    gap, norm = checks
    return ritz if gap > 0 and norm <= _SUBSPACE_TOL * gap else None


def _subspace_basis(side: GramSide, s: torch.Tensor, r: int, b: int, q: int) -> torch.Tensor | None:
    """Top-r right singular subspace of `side.tall` by float64 block power iteration, certified.

    q power steps, then the certificate (`_certified`); if it fails, a few more steps and the
    certificate again; None then (the caller falls back to eigh). No host sync inside the
    steps, so on a GPU they queue back to back. The start block comes from a fixed seed.
    """
    k = side.tall.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(_SUBSPACE_SEED)
    start = torch.randn(k, b, generator=gen, dtype=torch.float64).to(side.tall.device)  # (k, b)
    basis, _ = torch.linalg.qr(start)  # (k, b)
    image = side.times(basis)  # (k, b) G Q
    lam_next = _next_eigenvalue_bound(s, r)
    for steps in (q, _SUBSPACE_EXTRA_STEPS):
        for _ in range(steps):
            basis, _ = torch.linalg.qr(image)  # (k, b) one power step: span(G Q)
            image = side.times(basis)  # (k, b)
        ritz = _certified(basis, image, r, lam_next)
        if ritz is not None:
            return ritz
    return None


def top_factors(
    tau: torch.Tensor,
    r: int,
    method: TopMethod = "auto",
    s: torch.Tensor | None = None,
    info: dict[str, Any] | None = None,
    side: GramSide | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r truncation of a 2-D τ as float64 factors (left (m, r), right (r, n)).

    left @ right = U_r diag(σ_r) V_rᵀ, the projection of τ on its top-r singular subspace; no
    singular value is divided by. The work runs on τ's device, or on `side`'s when given.

    Args:
        tau: the (m, n) task vector.
        r: the kept rank, 1 ≤ r ≤ min(m, n).
        method: ``"svd"``: float32 thin SVD (the authors' path), left = U_r diag(σ_r),
            right = V_rᵀ. ``"gram"``: top-r eigenvectors of the float64 Gram matrix of the
            smaller side. ``"subspace"``: float64 block power iteration sized from the known
            spectrum `s`, certified to a subspace angle ≤ 1e-9 by the Davis–Kahan bound, else
            ``"gram"``. ``"auto"`` (default): ``"subspace"`` when its predicted cost is below
            eigh's, else ``"gram"``.
        s: every singular value, descending (float32 reference values or float64 Gram
            values); needed by ``"subspace"`` and ``"auto"``.
        info: if given, info["route"] records the route taken (for benchmarks and tests).
        side: τ's GramSide when the caller has one (`spectrum.star_spectrum` formed G): reused.

    Returns:
        (left, right) float64. On the Gram routes a wide τ (m < n) gives left = U_r and
        right = diag(σ_r) V_rᵀ; otherwise left = U_r diag(σ_r) and right = V_rᵀ.
    """
    if method == "svd":
        _note(info, "svd")
        return _svd_factors(tau, r)
    if method not in ("gram", "subspace", "auto"):
        raise ValueError(f"unknown top_factors method {method!r}; use 'auto', 'subspace', 'gram' or 'svd'")
    if method != "gram" and s is None:
        raise ValueError(f"top_factors method {method!r} needs every singular value (s)")
    side = side if side is not None else gram_side(tau, form=False)
    # With G already tridiagonal the r vectors cost O(k·r) + 4·k²·r: below any block iteration.
    iterate = method == "subspace" or (method == "auto" and side.vectors is None and side.tridiagonal is None)
    iterate = iterate and r > 0 and side.vectors is None
    basis, route = _iterate(side, r, method, s) if iterate else (None, "gram")
    if basis is None:
        basis = _gram_basis(side, r)  # (k, r)
    _note(info, route)
    return _as_factors(side, basis)


def _iterate(side: GramSide, r: int, method: TopMethod, s: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """The planned block iteration, or (None, "gram") when eigh is cheaper or it cannot certify."""
    k = side.tall.shape[1]
    plan = _subspace_plan(s, r, side.tall.shape[0], formed=side.gram is not None)
    if plan is None and method == "subspace":
        plan = (min(2 * r + 8, k), _SUBSPACE_MAX_ITER)
    if plan is None or plan[0] >= k:
        return None, "gram"
    basis = _subspace_basis(side, s, r, *plan)
    return basis, f"subspace(b={plan[0]}, steps={plan[1]})" + ("" if basis is not None else " -> gram")


def _svd_factors(tau: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' path: float32 thin SVD, left = U_r diag(σ_r) (m, r), right = V_rᵀ (r, n)."""
    u, sv, vh = torch.linalg.svd(tau.to(torch.float32), full_matrices=False)
    return (u[:, :r] * sv[:r]).to(torch.float64), vh[:r].to(torch.float64)


def _note(info: dict[str, Any] | None, route: str) -> None:
    if info is not None:
        info["route"] = route


def lowrank_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of left @ right without forming it: (U (m, k), σ (k,), Vᵀ (k, n)), float64.

    left (m, r), right (r, n), k = min(m, n, r). left = Q_l R_l and rightᵀ = Q_r R_r (reduced
    QR), so left @ right = Q_l (R_l R_rᵀ) Q_rᵀ and the SVD of the small middle matrix gives
    the rest. Cost O((m + n) r²); a zero factor gives σ = 0.

    Args:
        left: the left factor, (m, r), any float dtype (read as float64).
        right: the right factor, (r, n), any float dtype (read as float64).
    Returns:
        (U (m, k), σ (k,) descending, Vᵀ (k, n)), all float64, on the factors' device.
    """
    q_left, r_left = torch.linalg.qr(left.to(torch.float64))  # (m, a), (a, r), a = min(m, r)
    q_right, r_right = torch.linalg.qr(right.T.to(torch.float64))  # (n, b), (b, r)
    middle = r_left @ r_right.T  # (a, b)
    u_mid, s, vh_mid = torch.linalg.svd(middle, full_matrices=False)  # (a, k), (k,), (k, b)
    u = q_left @ u_mid  # (m, k)
    vh = vh_mid @ q_right.T  # (k, n)
    return u, s, vh
