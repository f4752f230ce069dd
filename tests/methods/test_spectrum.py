"""Every σ and the kept rank from the float64 Gram matrix, against float64 truth and the reference rule."""

from __future__ import annotations

import pytest
import torch

from star_dist.methods import Star, StarParams, dense, host_blas
from star_dist.methods.spectral import gram_side, kept_rank, singular_values, top_factors
from star_dist.methods.spectrum import certified_rank, gram_values, looks_flat, rank_window, star_spectrum

from .test_spectral import spectrum_matrix

EPS64 = float(torch.finfo(torch.float64).eps)


def kinds(m: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Flat, decaying and numerically rank-deficient float32 matrices of one shape."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    return {
        "flat": torch.randn(m, n, generator=gen),
        "power_law": spectrum_matrix(m, n, [1.0 / (i + 1) for i in range(k)], seed),
        "rank_6": torch.randn(m, 6, generator=gen) @ torch.randn(6, n, generator=gen),  # + float32 noise
    }


@pytest.mark.parametrize(("m", "n"), [(96, 64), (64, 160), (80, 80)])
def test_gram_values_accuracy(m: int, n: int) -> None:
    for name, tau in kinds(m, n, seed=m + n).items():
        truth = torch.linalg.svdvals(tau.double())  # (k,) float64 SVD of the same float32 τ
        ours = gram_values(gram_side(tau))
        reference = singular_values(tau).double()
        top = truth > 1e-3 * truth[0]  # the σ that carry the nuclear norm
        # Where σ is large, error ~eps64·σ_1²/σ_i, far below the float32 SVD's...
        err, err_reference = (ours - truth)[top].abs(), (reference - truth)[top].abs()
        assert (err <= 64 * EPS64 * truth[0] ** 2 / truth[top]).all(), name
        assert (err / truth[top]).max() <= 1e-3 * (err_reference / truth[top]).max(), name
        # ...and, for the tiny σ of a rank-deficient τ, within a few √eps64·σ_1 (float32 SVD: eps32·σ_1).
        assert (ours - truth).abs().max() <= 4 * 2**-26 * truth[0], name


@pytest.mark.parametrize("eta", [1, 20, 40, 75, 99, 100])
@pytest.mark.parametrize(("m", "n"), [(96, 64), (64, 160)])
def test_rank_is_the_reference_rules(eta: float, m: int, n: int) -> None:
    for seed in range(3):
        for name, tau in kinds(m, n, seed).items():
            spectrum = star_spectrum(tau, eta)
            assert spectrum.rank == kept_rank(singular_values(tau), eta), (name, seed)
            assert spectrum.values.dtype == torch.float64 and spectrum.route in ("gram", "gram->svd")


def test_fallback_only_where_rounding_decides() -> None:
    # η = 100 on rank 6 + float32 noise: the sums reach Σσ within rounding, the reference decides.
    tau = kinds(96, 64, seed=0)["rank_6"]
    assert star_spectrum(tau, 100).route == "gram->svd"
    assert star_spectrum(tau, 40).route == "gram"
    assert star_spectrum(kinds(96, 64, seed=0)["flat"], 100).route == "gram"  # full rank: r = k, certain


def test_certified_rank_rule() -> None:
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    assert certified_rank(s, 50, 0.0) == 1  # inclusive: σ_1 = 3 = 50% of 6
    assert certified_rank(s, 50, 1e-9) is None  # ... but within any window of the target
    assert certified_rank(s, 60, 0.1) == 2
    assert certified_rank(s, 100, 0.5) == 3  # r = k whatever the last sum does
    assert certified_rank(s, 1e-9, 0.0) == 1
    assert certified_rank(torch.zeros(4, dtype=torch.float64), 40, 0.0) == 0


def test_window_scales_with_size_and_norm() -> None:
    s = torch.tensor([1.0 / (i + 1) for i in range(64)], dtype=torch.float64)
    w = rank_window(s, (128, 64), 40)
    assert 0 < w < 1e-4 * float(s.sum())
    assert rank_window(s * 1e-3, (128, 64), 40) == pytest.approx(w * 1e-3, rel=1e-6)  # homogeneous in τ
    assert rank_window(s, (128, 64), 100) > w


def test_float64_tau_and_svd_option_take_the_reference_values() -> None:
    tau = kinds(40, 30, seed=1)["power_law"]
    assert star_spectrum(tau.double(), 40).route == "svd"  # Gram would halve float64's digits
    spectrum = star_spectrum(tau, 40, "svd")
    assert spectrum.route == "svd" and spectrum.side is None
    assert torch.equal(spectrum.values, singular_values(tau))
    with pytest.raises(ValueError, match="'gram' or 'svd'"):
        star_spectrum(tau, 40, "qr")  # type: ignore[arg-type]


def test_zero_tau_has_rank_zero() -> None:
    assert star_spectrum(torch.zeros(12, 7), 40).rank == 0


@pytest.mark.parametrize("top_method", ["auto", "gram", "svd"])
def test_star_gram_values_match_svd_values(top_method: str) -> None:
    for name, tau in kinds(72, 48, seed=5).items():
        for eta in (40, 100):
            by_gram = Star(StarParams(eta), top_method=top_method).transform(tau)
            by_svd = Star(StarParams(eta), top_method=top_method, values_method="svd").transform(tau)
            assert by_gram[1]["kept_rank"] == by_svd[1]["kept_rank"], (name, eta)
            assert by_gram[1]["nuclear_norm_before"] == pytest.approx(by_svd[1]["nuclear_norm_before"], rel=1e-5)
            a, b = dense(by_gram[0]), dense(by_svd[0])
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (name, eta)


def test_star_device_parameter_computes_there_and_returns_home() -> None:
    tau = kinds(40, 30, seed=2)["power_law"]
    update, stats = Star(device="cpu").transform(tau)
    expected, expected_stats = Star().transform(tau)
    assert update.left.device == tau.device and stats == expected_stats
    assert torch.equal(dense(update), dense(expected))


def test_flat_spectra_take_one_eigh_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without SciPy (no tridiagonal route): one eigh gives the values and the vectors."""
    monkeypatch.setattr(host_blas, "loaded", lambda: None)
    flat, decaying = kinds(96, 64, seed=3)["flat"], kinds(96, 64, seed=3)["power_law"]
    assert looks_flat(gram_side(flat)) and not looks_flat(gram_side(decaying))
    spectrum = star_spectrum(flat, 40)
    assert spectrum.side is not None and spectrum.side.vectors is not None  # values and vectors from one eigh
    assert torch.allclose(spectrum.values, gram_values(gram_side(flat)), rtol=1e-12, atol=1e-12)
    info: dict = {}
    left, right = top_factors(flat, spectrum.rank, "auto", spectrum.values, info, side=spectrum.side)
    assert info["route"] == "gram"
    u, s, vh = torch.linalg.svd(flat.double(), full_matrices=False)
    r = spectrum.rank
    assert (left @ right - (u[:, :r] * s[:r]) @ vh[:r]).abs().max() <= 1e-10 * s[0]
