"""The tridiagonal route (one dsytrd, dsterf values, MRRR top vectors) against torch's eigh,
and STAR through it against a float64 full-SVD STAR and the route without SciPy."""

from __future__ import annotations

import pytest
import torch

from star_dist.methods import Star, StarParams, dense, tridiagonal
from star_dist.methods.spectrum import star_spectrum

from .test_spectral import spectrum_matrix

pytestmark = pytest.mark.skipif(not tridiagonal.available(), reason="needs SciPy and threadpoolctl")


def _gram(k: int, alpha: float, seed: int) -> torch.Tensor:
    """A symmetric float64 (k, k) G with eigenvalues i^(-2α) (a power-law task vector's)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    g = (q * torch.arange(1, k + 1, dtype=torch.float64) ** (-2 * alpha)) @ q.T
    return (g + g.T) / 2


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
    monkeypatch.setattr(tridiagonal, "_lapack", lambda: None)  # SciPy missing: torch's eigvalsh / eigh
    without, stats_without = Star(StarParams(40)).transform(tau)
    assert star_spectrum(tau, 40).side.tridiagonal is None
    assert stats_without["kept_rank"] == r
    assert (dense(without).double() - dense(ours).double()).abs().max() <= 1e-6 * exact.abs().max()
