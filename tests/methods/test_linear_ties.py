"""Task arithmetic, average and TIES against independent, straightforward computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from star_dist.errors import ConfigError
from star_dist.methods import Average, LowRank, TaskArithmetic, Ties, TiesParams, get_method
from star_dist.methods.ties import trim_count, trim_threshold


def models(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=gen)
    return base, [base + 0.1 * torch.randn(*shape, generator=gen) for _ in range(n)]


def streaming_merge(method, base, fts, given, lam=1.0) -> torch.Tensor:
    """The engine's formula: base + λ Σ w_i f(τ_i)."""
    acc = torch.zeros_like(base)
    for w, ft in zip(method.resolve_weights(given), fts, strict=True):
        update, stats = method.transform(ft - base)
        assert stats == {}
        acc += w * update
    return base + lam * acc


# -- task arithmetic and average -------------------------------------------------------------


def test_task_arithmetic() -> None:
    base, fts = models(3, (20, 30), seed=1)
    ta = TaskArithmetic()
    assert ta.resolve_weights([None, 0.5, None]) == [1.0, 0.5, 1.0]
    got = streaming_merge(ta, base, fts, [None, 0.5, -0.25], lam=0.7)
    expected = base + 0.7 * (fts[0] - base + 0.5 * (fts[1] - base) - 0.25 * (fts[2] - base))
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    low = LowRank(torch.ones(4, 2), torch.ones(2, 3))
    assert ta.transform(low)[0] is low  # a LoRA update passes through unformed


def test_average_is_the_mean_of_the_models() -> None:
    base, fts = models(4, (16, 8), seed=2)
    avg = Average()
    assert avg.resolve_weights([None] * 4) == [0.25] * 4
    assert avg.resolve_weights([1.0, None, 2.0]) == [0.25, 0.25, 0.5]
    got = streaming_merge(avg, base, fts, [None] * 4)
    assert torch.allclose(got, torch.stack(fts).mean(0), rtol=0, atol=1e-6)
    got = streaming_merge(avg, base, fts[:2], [1.0, 3.0])
    assert torch.allclose(got, 0.25 * fts[0] + 0.75 * fts[1], rtol=0, atol=1e-6)


def test_average_zero_weight_sum() -> None:
    with pytest.raises(ConfigError, match=r"^average: the model weights sum to 0 \(\[1.0, -1.0\]\)"):
        Average().resolve_weights([1.0, -1.0])


# -- TIES ------------------------------------------------------------------------------------


def ties_reference(
    taus: list[np.ndarray], weights: list[float], density: float | list[float], normalize: bool = True
) -> np.ndarray:
    """TIES as the paper describes it (trim, elect, disjoint merge), with mergekit's weights.

    Trim: keep the k = max(1, floor(density·numel)) largest |τ| (a stable sort: entries of
    equal magnitude are taken in flat order). Elect: γ = sign(Σ w_i τ̂_i), + at 0. Disjoint
    merge: over A = {i : sign(w_i τ̂_i) = γ}, Σ_A w_i τ̂_i / Σ_A w_i (not divided without
    normalize). Written elementwise in numpy float64, independent of the torch code.
    """
    densities = density if isinstance(density, list) else [density] * len(taus)
    trimmed = []
    for tau, d in zip(taus, densities, strict=True):
        flat = tau.reshape(-1)
        k = flat.size if d >= 1 else max(1, int(d * flat.size))
        keep = np.argsort(-np.abs(flat), kind="stable")[:k]
        out = np.zeros_like(flat)
        out[keep] = flat[keep]
        trimmed.append(out)
    merged = np.zeros_like(trimmed[0])
    for p in range(merged.size):
        values = [w * t[p] for w, t in zip(weights, trimmed, strict=True)]
        gamma = 1.0 if sum(values) >= 0 else -1.0
        agree = [i for i, v in enumerate(values) if np.sign(v) == gamma]
        divisor = sum(weights[i] for i in agree) if normalize else 1.0
        merged[p] = sum(values[i] for i in agree) / (divisor if divisor != 0 else 1.0)
    return merged.reshape(taus[0].shape)


def quantized_models(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """bf16 checkpoints upcast: their task vectors take few distinct values, so many |τ| tie."""
    base, fts = models(n, shape, seed)
    base = base.bfloat16().float()
    return base, [ft.bfloat16().float() for ft in fts]


def ties_blocks(ties: Ties, taus: list[torch.Tensor], weights: list[float], rows: int) -> torch.Tensor:
    """TIES as the engine runs it: rules from whole task vectors, then row blocks with offsets."""
    prepared = [ties.prepare(t, i) for i, t in enumerate(taus)]
    row_numel = taus[0][0].numel()
    blocks = [
        ties.merge_block([t[a : a + rows] for t in taus], weights, prepared, a * row_numel)
        for a in range(0, taus[0].shape[0], rows)
    ]
    return torch.cat(blocks)


@pytest.mark.parametrize(
    ("density", "weights", "shape"),
    [
        (0.2, [1.0, 1.0, 1.0], (24, 16)),
        (0.5, [0.7, 1.0, 0.4, 1.2], (30, 11)),
        (0.1, [1.0, -0.5, 0.8], (40, 9)),
        (1.0, [1.0, 1.0], (12, 12)),
        (0.3, [1.0, 1.0, 1.0], (101,)),
        (0.2, [1.0, 1.0, 1.0], (3,)),  # k = max(1, 0) = 1
    ],
)
def test_ties_matches_the_paper(density, weights, shape) -> None:
    base, fts = models(len(weights), shape, seed=len(weights) * 7 + len(shape))
    taus = [ft - base for ft in fts]
    ties = Ties(TiesParams(density=density))
    assert ties.resolve_weights([None] * len(weights)) == [1.0] * len(weights)
    prepared = [ties.prepare(t) for t in taus]
    got = ties.merge_block(taus, weights, prepared)
    expected = ties_reference([t.double().numpy() for t in taus], weights, density)
    assert np.allclose(got.double().numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 5, 7, 64])
def test_ties_row_blocks_equal_whole_tensor(rows: int) -> None:
    base, fts = models(3, (64, 20), seed=9)
    taus = [ft - base for ft in fts]
    ties = Ties(TiesParams(density=0.25))
    weights = [0.6, 1.0, 0.9]
    prepared = [ties.prepare(t) for t in taus]  # always from the whole task vector
    whole = ties.merge_block(taus, weights, prepared)
    assert torch.equal(ties_blocks(ties, taus, weights, rows), whole)


def test_trim_count_and_threshold() -> None:
    assert trim_count(10, 0.25) == 2  # floor, as mergekit
    assert trim_count(10, 0.29) == 2
    assert trim_count(3, 0.2) == 1  # at least one entry
    assert trim_count(10, 1.0) == 10
    tau = torch.tensor([[0.5, -3.0], [2.0, 1.0]])
    assert trim_threshold(tau, 0.5) == 2.0  # the 2nd largest |τ| of 4
    assert trim_threshold(tau, 0.75) == 1.0  # the 3rd
    assert trim_threshold(tau, 1.0) == 0.0


def test_ties_keeps_exactly_k_taking_tied_entries_in_flat_order() -> None:
    # k = 2 of [3, −2, 2, 1]: the threshold is 2; of the tied ±2 only the first is kept.
    tau = torch.tensor([3.0, -2.0, 2.0, 1.0])
    ties = Ties(TiesParams(density=0.5))
    rule = ties.prepare(tau)
    assert (rule.threshold, rule.last_tied) == (2.0, 1)
    got = ties.merge_block([tau], [1.0], [rule])
    assert torch.equal(got, torch.tensor([3.0, -2.0, 0.0, 0.0]))
    # The same rule applied to the second half alone, at its offset, keeps nothing tied.
    assert torch.equal(ties.merge_block([tau[2:]], [1.0], [rule], offset=2), torch.tensor([0.0, 0.0]))


@pytest.mark.parametrize("rows", [1, 3, 8, 50])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_ties_on_bf16_task_vectors_keeps_density_exactly(rows: int, density: float) -> None:
    base, fts = quantized_models(3, (50, 40), seed=11)
    taus = [ft - base for ft in fts]
    ties = Ties(TiesParams(density=density))
    magnitudes = [t.abs().reshape(-1) for t in taus]
    assert max(m.numel() - m.unique().numel() for m in magnitudes) > 1000  # the case is what it says
    weights = [1.0, 0.8, 1.1]
    got = ties_blocks(ties, taus, weights, rows)
    expected = ties_reference([t.double().numpy() for t in taus], weights, density)
    assert np.allclose(got.double().numpy(), expected, rtol=0, atol=1e-6)
    for i, tau in enumerate(taus):  # each model keeps k entries (those that are non-zero)
        rule = ties.prepare(tau, i)
        flat = tau.abs().reshape(-1)
        kept = (flat > rule.threshold) | ((flat == rule.threshold) & (torch.arange(flat.numel()) <= rule.last_tied))
        assert int(kept.sum()) == trim_count(tau.numel(), density)


def test_ties_per_model_density_and_no_normalize() -> None:
    base, fts = models(3, (30, 12), seed=5)
    taus = [ft - base for ft in fts]
    densities = [0.2, 0.6, 1.0]
    ties = get_method("ties", {"density": 0.5, "normalize": False}, [{"density": d} for d in densities])
    assert [ties.density_of(i) for i in range(3)] == densities
    weights = [1.0, 0.5, 0.7]
    got = ties_blocks(ties, taus, weights, rows=7)
    expected = ties_reference([t.double().numpy() for t in taus], weights, densities, normalize=False)
    assert np.allclose(got.double().numpy(), expected, rtol=0, atol=1e-6)


def test_ties_per_model_parameters_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"models\[1\]\.parameters: 'eta' cannot be set per model for ties"):
        get_method("ties", {}, [{}, {"eta": 40}])
    with pytest.raises(ConfigError, match="cannot be set per model for star"):
        get_method("star", {}, [{"density": 0.3}])
    with pytest.raises(ConfigError, match="normalize must be true or false"):
        get_method("ties", {"normalize": "yes"})


def test_task_arithmetic_normalize_and_average_without() -> None:
    ta = get_method("task_arithmetic", {"normalize": True})
    assert ta.resolve_weights([1.0, 3.0]) == [0.25, 0.75]
    assert ta.resolve_weights([1.0, -1.0]) == [1.0, -1.0]  # |Σw| < 1e-8 divides by 1, as mergekit
    assert get_method("average", {"normalize": False}).resolve_weights([1.0, 3.0]) == [1.0, 3.0]


def test_ties_zero_divisor_and_zero_vectors() -> None:
    ties = Ties(TiesParams(density=0.5))
    zero = torch.zeros(4, 3)
    got = ties.merge_block([zero, zero], [1.0, 1.0], [ties.prepare(zero)] * 2)
    assert torch.equal(got, zero)  # nothing agrees anywhere: 0 / 1, never NaN
    # Weights summing to zero over the agreeing models: the divisor falls back to 1.
    tau = torch.tensor([[1.0, 2.0]])
    got = ties.merge_block([tau, tau], [1.0, -1.0], [ties.prepare(tau)] * 2)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan")])
def test_ties_density_validation(density: float) -> None:
    with pytest.raises(ConfigError, match=r"^ties: density must be"):
        TiesParams(density=density)


def test_ties_density_message() -> None:
    with pytest.raises(ConfigError, match=r"density must be in \(0, 1\] .*, got 1\.5$"):
        TiesParams(density=1.5)
    assert TiesParams().density == 0.2
    assert Ties(TiesParams(0.4)).params_dict() == {"density": 0.4, "normalize": True, "int8_mask": False}
