"""The tridiagonal route (one dsytrd, dsterf values, top vectors by inverse iteration or MRRR)
against torch's eigh, and STAR through it against a float64 full-SVD STAR and the route
without SciPy."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from star_dist.methods import Star, StarParams, dense, host_blas, tridiagonal
from star_dist.methods.spectrum import star_spectrum

from .test_spectral import spectrum_matrix

pytestmark = pytest.mark.skipif(not tridiagonal.available(), reason="needs SciPy and threadpoolctl")


def _gram(k: int, alpha: float, seed: int) -> torch.Tensor:
    """A symmetric float64 (k, k) G with eigenvalues i^(-2α) (a power-law task vector's)."""
    return _with_eigenvalues(torch.arange(1, k + 1, dtype=torch.float64) ** (-2 * alpha), seed)


def _with_eigenvalues(lam: torch.Tensor, seed: int) -> torch.Tensor:
    """A symmetric float64 G with the given eigenvalues and random eigenvectors."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=gen, dtype=torch.float64))
    g = (q * lam) @ q.T
    return (g + g.T) / 2


def _assert_top_subspace(g: torch.Tensor, top: torch.Tensor) -> None:
    """`top` (k, r) is orthonormal and spans the top-r eigenvectors of G (those of eigh)."""
    k, r = top.shape
    _, vectors = torch.linalg.eigh(g)
    expected = vectors[:, k - r :]
    assert (top @ top.T - expected @ expected.T).abs().max() <= 1e-10
    assert (top.T @ top - torch.eye(r, dtype=torch.float64)).abs().max() <= 1e-12


@pytest.mark.parametrize("k", [1, 2, 5, 64, 300])
def test_values_and_top_vectors_are_eighs(k: int) -> None:
    g = _gram(k, 0.55, seed=k)
    reduced = tridiagonal.reduce(g)
    assert reduced is not None
    lam, vectors = torch.linalg.eigh(g)  # ascending
    assert (reduced.values() - lam).abs().max() <= 8 * k * torch.finfo(torch.float64).eps * lam.abs().max()
    for r in sorted({0, 1, k // 3, k}):
        top = reduced.top_vectors(r)  # (k, r) descending
        assert top.shape == (k, r)
        expected = vectors[:, k - r :]
        assert (top @ top.T - expected @ expected.T).abs().max() <= 1e-10  # the same subspace
        if r:  # orthonormal, and descending: the first is the top eigenvalue's vector
            assert (top.T @ top - torch.eye(r, dtype=torch.float64)).abs().max() <= 1e-12
            assert abs(float(top[:, 0] @ g @ top[:, 0]) - float(lam[-1])) <= 1e-12 * float(lam[-1])


def test_the_route_applies_to_float64_host_matrices_only() -> None:
    assert tridiagonal.reduce(_gram(8, 0.5, seed=1).float()) is None
    assert tridiagonal.reduce(_gram(8, 0.5, seed=1).to("meta")) is None


def test_same_thread_count_same_bits() -> None:
    g = _gram(200, 0.6, seed=3)
    a, b = tridiagonal.reduce(g), tridiagonal.reduce(g.clone())
    assert a is not None and b is not None
    assert torch.equal(a.values(), b.values()) and torch.equal(a.top_vectors(30), b.top_vectors(30))


@pytest.mark.parametrize(("m", "n"), [(160, 96), (96, 224), (128, 128)])
def test_star_through_the_tridiagonal_form_is_exact(m: int, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slowly decaying spectrum (σ_i ∝ i^-0.55: kept rank ~15%, small gaps at r): same kept
    rank as the eigh route, error against a float64 full-SVD STAR below the float32 SVD's."""
    k = min(m, n)
    tau = spectrum_matrix(m, n, [(i + 1) ** -0.55 for i in range(k)], seed=m + n)
    spectrum = star_spectrum(tau, 40)
    assert spectrum.side is not None and spectrum.side.tridiagonal is not None and spectrum.side.vectors is None
    ours, stats = Star(StarParams(40)).transform(tau)
    u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
    r = stats["kept_rank"]
    exact = (u[:, :r] * (s[:r] * s.sum() / s[:r].sum())) @ vh[:r]
    by_svd32, _ = Star(StarParams(40), values_method="svd", top_method="svd").transform(tau)
    err, err32 = ((dense(x).double() - exact).abs().max() / exact.abs().max() for x in (ours, by_svd32))
    assert err <= max(err32, 1e-7), (err, err32)
    monkeypatch.setattr(host_blas, "loaded", lambda: None)  # SciPy missing: torch's eigvalsh / eigh
    without, stats_without = Star(StarParams(40)).transform(tau)
    assert star_spectrum(tau, 40).side.tridiagonal is None
    assert stats_without["kept_rank"] == r
    assert (dense(without).double() - dense(ours).double()).abs().max() <= 1e-6 * exact.abs().max()


def test_a_flat_spectrum_takes_inverse_iteration() -> None:
    """Well-separated top eigenvalues (a flat spectrum): dstein from the known values."""
    g = _with_eigenvalues(torch.linspace(1.0, 2.0, 240, dtype=torch.float64), seed=7)
    reduced = tridiagonal.reduce(g)
    assert reduced is not None and reduced._inverse_iteration_pays(60)
    _assert_top_subspace(g, reduced.top_vectors(60))


def test_one_large_cluster_takes_mrrr() -> None:
    """Most top eigenvalues in one cluster (within 1e-3·‖T‖ of the next): dstein would
    reorthogonalize all of them, so MRRR finds the vectors, exactly."""
    lam = torch.cat([torch.linspace(1.0, 1.0 + 1e-5, 400, dtype=torch.float64),
                     torch.linspace(0.1, 0.5, 80, dtype=torch.float64)])
    g = _with_eigenvalues(lam, seed=8)
    reduced = tridiagonal.reduce(g)
    assert reduced is not None and not reduced._inverse_iteration_pays(400)  # Σc² = 400² > 320·400
    assert reduced._inverse_iteration_pays(300)  # one cluster of 300: 300² ≤ 320·300
    _assert_top_subspace(g, reduced.top_vectors(400))


def test_a_split_tridiagonal_takes_mrrr() -> None:
    """A block-diagonal G reduces to a T with zero off-diagonals, which dstein would need split
    points for: MRRR finds the vectors."""
    g = torch.block_diag(_gram(40, 0.5, seed=9), 3.0 * _gram(30, 0.5, seed=10))
    reduced = tridiagonal.reduce(g)
    assert reduced is not None and not reduced._inverse_iteration_pays(20)
    _assert_top_subspace(g, reduced.top_vectors(20))


def test_inverse_iteration_that_does_not_converge_falls_back_to_mrrr(monkeypatch: pytest.MonkeyPatch) -> None:
    """dstein reporting unconverged vectors (info > 0): its output is dropped and MRRR decides."""
    host = host_blas.loaded()
    assert host is not None

    def failing_dstein(d, e, w, *args):  # noqa: ANN001, ANN202 - LAPACK's signature
        z, _ = host.lapack.dstein(d, e, w, *args)
        return z * 0.0, 1  # garbage vectors, "1 vector failed to converge"

    broken = replace(host, lapack=SimpleNamespace(dstein=failing_dstein, dsytrd=host.lapack.dsytrd,
                                                  dsytrd_lwork=host.lapack.dsytrd_lwork))
    monkeypatch.setattr(host_blas, "loaded", lambda: broken)
    g = _with_eigenvalues(torch.linspace(1.0, 2.0, 120, dtype=torch.float64), seed=11)
    reduced = tridiagonal.reduce(g)
    assert reduced is not None and reduced._inverse_iteration_pays(30)
    _assert_top_subspace(g, reduced.top_vectors(30))
