"""The SVD building blocks: the kept-rank rule, exact top-r factors, the factorized SVD."""

from __future__ import annotations

import pytest
import torch

from star_dist.errors import MergeError
from star_dist.methods import host_blas, spectral
from star_dist.methods.spectral import (
    _subspace_basis,
    _subspace_plan,
    gram_side,
    kept_rank,
    lowrank_svd,
    singular_values,
    top_factors,
)


def exact_truncation(tau: torch.Tensor, r: int) -> torch.Tensor:
    """U_r diag(σ_r) V_rᵀ from a float64 full SVD: the independent reference."""
    u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def spectrum_matrix(m: int, n: int, s: list[float], seed: int) -> torch.Tensor:
    """A float32 (m, n) matrix with the given singular values and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    k = len(s)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return ((u * torch.tensor(s, dtype=torch.float64)) @ v.T).float()


# -- kept_rank -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("s", "eta", "r"),
    [
        ([3.0, 2.0, 1.0], 50, 1),  # σ_1 = 3 = 50% of 6: the comparison is inclusive
        ([3.0, 2.0, 1.0], 50.001, 2),
        ([3.0, 2.0, 1.0], 83.3, 2),  # 5/6 = 83.33% ≥ 83.3%
        ([3.0, 2.0, 1.0], 100, 3),
        ([3.0, 2.0, 1.0], 1e-9, 1),  # r ≥ 1 always
        ([5.0], 40, 1),
        ([2.0, 2.0, 2.0, 2.0], 50, 2),  # ties in σ: exactly half
    ],
)
def test_kept_rank_rule(s: list[float], eta: float, r: int) -> None:
    assert kept_rank(torch.tensor(s), eta) == r


def test_kept_rank_float32_rounding_at_eta_100() -> None:
    # 1 + 1e-8 rounds to 1 in float32: the cumulative sum reaches Σσ at r = 1, as the
    # reference computes it; the golden cases (30 of 32, 90 of 96) rest on this.
    s = torch.tensor([1.0, 1e-8, 1e-8])
    assert kept_rank(s, 100) == 1
    # float64 values (a `dtype: float64` merge) get the float64 rule: nothing rounds away.
    assert kept_rank(s.double(), 100) == 3


def test_kept_rank_zero_empty_and_nan() -> None:
    assert kept_rank(torch.zeros(7), 40) == 0
    assert kept_rank(torch.zeros(0), 40) == 0
    with pytest.raises(MergeError, match="not finite"):
        kept_rank(torch.tensor([1.0, float("nan")]), 40)


# -- top_factors -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize(("m", "n"), [(60, 40), (40, 60), (50, 50), (1, 30), (30, 1)])
def test_top_factors_match_float64_truncation(method: str, m: int, n: int) -> None:
    k = min(m, n)
    s = [2.0 ** (-i / 3) for i in range(k)]  # distinct, decaying: well-defined subspaces
    tau = spectrum_matrix(m, n, s, seed=m * 100 + n)
    for r in sorted({1, max(1, k // 3), k}):
        left, right = top_factors(tau, r, method)
        assert left.shape == (m, r) and right.shape == (r, n)
        expected = exact_truncation(tau, r)
        tol = (1e-10 if method == "gram" else 2e-6) * expected.abs().max()
        assert (left @ right - expected).abs().max() <= tol


def test_top_factors_gram_rank_deficient_and_tiny() -> None:
    # Rank 5 (plus float32 rounding noise) in 48×32, σ down to 1e-6·σ_1. Keeping all 32
    # directions reproduces τ although the noise directions' vectors are ill-determined;
    # keeping 3 or 5 matches the float64 truncation; no NaN appears.
    tau = spectrum_matrix(48, 32, [1.0, 0.3, 1e-2, 1e-4, 1e-6], seed=3)
    left, right = top_factors(tau, 32, "gram")
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    assert (left @ right - tau.double()).abs().max() <= 1e-12
    left, right = top_factors(tau, 3, "gram")
    assert (left @ right - exact_truncation(tau, 3)).abs().max() <= 1e-14
    # Cut between σ_5 = 1e-6 and the noise (1e-8): the Gram error is ~eps64·σ_1²/gap ≈ 1e-10
    # (measured 1.2e-11), still far below float32 resolution of τ (≈ 1e-9 here).
    left, right = top_factors(tau, 5, "gram")
    assert (left @ right - exact_truncation(tau, 5)).abs().max() <= 1e-10


def test_top_factors_gram_tiny_scale() -> None:
    # A task vector of size 1e-20 (float32 normal range) squared in float64 stays accurate.
    tau = spectrum_matrix(30, 20, [3.0, 2.0, 1.0], seed=5) * 1e-20
    left, right = top_factors(tau, 2, "gram")
    expected = exact_truncation(tau, 2)
    assert (left @ right - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_top_factors_zero_matrix() -> None:
    tau = torch.zeros(20, 30)
    for method in ("gram", "svd"):
        left, right = top_factors(tau, 2, method)
        assert torch.equal(left @ right, torch.zeros(20, 30, dtype=torch.float64))


def test_singular_values_are_accurate_for_small_values() -> None:
    s_true = [1.0, 1e-2, 1e-4, 1e-5]
    tau = spectrum_matrix(40, 30, s_true, seed=11)
    s = singular_values(tau)
    assert s.dtype == torch.float32 and s.shape == (30,)
    # float32 rounding of τ itself bounds the error at ~1e-7·σ_1 for every value.
    assert torch.allclose(s[:4].double(), torch.tensor(s_true, dtype=torch.float64), atol=5e-7)


# -- products over float64 row blocks (GramSide) ---------------------------------------------


@pytest.mark.parametrize("scipy", [True, False], ids=["syrk", "blocked-gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("m", "n"), [(700, 96), (96, 700), (300, 300)])
def test_row_block_products_equal_the_whole_float64_products(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, m: int, n: int, scipy: bool
) -> None:
    """G, G @ X and tall @ X summed over several row blocks (a last, shorter one included) equal
    the products of the whole float64 matrix, with SciPy's SYRK or torch's GEMMs alone; the side
    keeps τ itself, never a float64 copy."""
    if not scipy:
        monkeypatch.setattr(host_blas, "loaded", lambda: None)
    elif host_blas.loaded() is None:
        pytest.skip("needs SciPy and threadpoolctl")
    monkeypatch.setattr(spectral, "_BLOCK_ELEMENTS", 96 * 64)
    monkeypatch.setattr(spectral, "_BLOCK_MIN_ROWS", 64)  # 64-row blocks: 2 to 11 of them
    tau = torch.randn(m, n, generator=torch.Generator().manual_seed(3)).to(dtype)
    formed, lazy = gram_side(tau), gram_side(tau, form=False)
    tall64 = (tau.T if m < n else tau).double()  # (max, k)
    k = tall64.shape[1]
    x = torch.randn(k, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))  # (k, 5)
    assert formed.tall.dtype == dtype and formed.tall.data_ptr() == tau.data_ptr()
    assert len(list(formed.row_blocks())) == -(-tall64.shape[0] // 64)
    assert formed.gram is not None and torch.equal(formed.gram, formed.gram.T)  # exactly symmetric
    assert torch.allclose(formed.gram, tall64.T @ tall64, rtol=1e-12, atol=1e-12 * k)
    assert torch.allclose(lazy.times(x), tall64.T @ (tall64 @ x), rtol=1e-11, atol=1e-11 * k)
    assert torch.allclose(formed.project(x), tall64 @ x, rtol=1e-12, atol=1e-12 * k)


def test_row_blocked_star_factors_match_the_float64_truncation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spectral, "_BLOCK_ELEMENTS", 40 * 64)
    monkeypatch.setattr(spectral, "_BLOCK_MIN_ROWS", 64)
    tau = spectrum_matrix(500, 40, [10.0 / (i + 1) for i in range(40)], seed=5)
    for method in ("gram", "subspace"):
        left, right = top_factors(tau, 6, method, singular_values(tau))
        assert torch.allclose(left @ right, exact_truncation(tau, 6), rtol=0, atol=1e-9)


# -- lowrank_svd -----------------------------------------------------------------------------


@pytest.mark.parametrize(("m", "r", "n"), [(300, 16, 200), (64, 1, 80), (10, 20, 8), (50, 4, 50)])
def test_lowrank_svd_is_the_thin_svd_of_the_product(m: int, r: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m + r + n)
    left = torch.randn(m, r, generator=gen)
    right = torch.randn(r, n, generator=gen)
    u, s, vh = lowrank_svd(left, right)
    k = min(m, n, r)
    assert u.shape == (m, k) and s.shape == (k,) and vh.shape == (k, n)
    product = left.double() @ right.double()
    s_dense = torch.linalg.svdvals(product)[:k]
    assert (s - s_dense).abs().max() <= 1e-10 * s_dense[0]
    assert torch.allclose(u.T @ u, torch.eye(k, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(vh @ vh.T, torch.eye(k, dtype=torch.float64), atol=1e-12)
    assert (u * s @ vh - product).abs().max() <= 1e-12 * product.abs().max()


def test_lowrank_svd_zero_factor() -> None:
    u, s, vh = lowrank_svd(torch.zeros(40, 8), torch.randn(8, 30))
    assert torch.equal(s, torch.zeros(8, dtype=torch.float64))
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()


# -- the planned, certified block iteration ("subspace") and "auto" -------------------------


def power_law(k: int, gap_at: int | None = None) -> list[float]:
    """σ_i = i^-1 (a decaying task-vector-like spectrum), optionally divided by 100 past gap_at."""
    return [(i + 1) ** -1.0 / (100.0 if gap_at is not None and i >= gap_at else 1.0) for i in range(k)]


@pytest.mark.parametrize(("m", "n"), [(300, 200), (200, 300)])
@pytest.mark.parametrize(("gap_at", "r"), [(None, 8), (20, 12), (20, 20)])  # 20: gap at r
def test_subspace_is_certified_and_exact(m: int, n: int, gap_at: int | None, r: int) -> None:
    k = min(m, n)
    tau = spectrum_matrix(m, n, power_law(k, gap_at), seed=m + r)
    s = singular_values(tau)
    side = gram_side(tau, form=False)  # tall (max, k) float64, G not formed
    # Without a gap the planner prefers eigh at this small size; "subspace" then runs the
    # iteration with a block of 2r + 8 and up to 40 steps, as tested here.
    plan = _subspace_plan(s, r, side.tall.shape[0]) or (2 * r + 8, 40)
    assert _subspace_basis(side, s, r, *plan) is not None  # the iteration certified
    left, right = top_factors(tau, r, "subspace", s)
    expected = exact_truncation(tau, r)
    assert (left @ right - expected).abs().max() <= 1e-9 * expected.abs().max()
    again = top_factors(tau, r, "subspace", s)
    assert torch.equal(left, again[0]) and torch.equal(right, again[1])  # fixed seed


def test_subspace_falls_back_when_the_gap_cannot_be_certified() -> None:
    # σ_2 − σ_3 = 1e-7·σ_1 is below the float32 values' error allowance: no certificate.
    values = [1.0, 0.5, 0.5 - 1e-7] + [0.01 * 0.9**i for i in range(60)]
    tau = spectrum_matrix(120, 63, values, seed=2)
    s = singular_values(tau)
    assert _subspace_basis(gram_side(tau, form=False), s, 2, 40, 3) is None
    forced = top_factors(tau, 2, "subspace", s)
    gram = top_factors(tau, 2, "gram")
    assert torch.equal(forced[0], gram[0]) and torch.equal(forced[1], gram[1])


def test_planner_uses_a_gap_in_the_spectrum() -> None:
    # A drop of 100× after σ_20: a block just past it converges in very few steps.
    s = torch.tensor(power_law(200, gap_at=20), dtype=torch.float32)
    b, q = _subspace_plan(s, 12, 300)
    assert b >= 20 and q <= 8


def test_auto_takes_gram_for_a_flat_spectrum() -> None:
    tau = torch.randn(160, 120, generator=torch.Generator().manual_seed(4))
    s = singular_values(tau)
    r = kept_rank(s, 40)
    assert _subspace_plan(s, r, 160) is None
    auto, gram = top_factors(tau, r, "auto", s), top_factors(tau, r, "gram")
    assert torch.equal(auto[0], gram[0]) and torch.equal(auto[1], gram[1])


def test_subspace_needs_the_spectrum() -> None:
    with pytest.raises(ValueError, match="needs every singular value"):
        top_factors(torch.ones(4, 3), 1, "auto")


def test_route_is_reported() -> None:
    tau = spectrum_matrix(300, 200, power_law(200, gap_at=20), seed=8)
    s = singular_values(tau)
    info: dict = {}
    top_factors(tau, 12, "auto", s, info)
    assert info["route"].startswith("subspace(") and not info["route"].endswith("gram")
    top_factors(tau, 12, "gram", s, info)
    assert info["route"] == "gram"
