"""STAR against the golden cases, merged with the engine's formula W = base + Σ_i w_i f(τ_i)."""

from __future__ import annotations

import pytest
import torch

from star_dist.methods import LowRank, Star, StarParams, dense

CASES = ["case0", "case1", "case2"]
ETAS = [1, 40, 75, 100]


def engine_merge(star: Star, base: torch.Tensor, fts: list[torch.Tensor]) -> tuple:
    """What the engine does with λ = 1: upcast, τ_i = W_i − base, acc += w_i f(τ_i)."""
    weights = star.resolve_weights([None] * len(fts))
    acc = torch.zeros_like(base)
    ranks = []
    for w, ft in zip(weights, fts, strict=True):
        update, stats = star.transform(ft.float() - base)
        assert isinstance(update, LowRank)
        acc.addmm_(update.left, update.right, alpha=w)
        ranks.append(stats["kept_rank"])
    return base + acc, ranks


@pytest.mark.parametrize("top_method", ["auto", "subspace", "gram", "svd"])
@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("case", CASES)
def test_golden_case(golden, case: str, eta: int, top_method: str) -> None:
    base = golden[f"{case}.base"]
    fts = [golden[f"{case}.ft{i}"] for i in range(3)]
    expected = golden[f"{case}.expected_eta{eta}"]
    merged, ranks = engine_merge(Star(StarParams(eta=eta), top_method=top_method), base, fts)

    assert ranks == golden[f"{case}.ranks_eta{eta}"].tolist()
    # Float32 rounding of the weights (measured ≤ 2.8e-7·max|W|), and of the update itself
    # (≤ 2.3e-6·max|update|: the golden came from a float32 SVD, ours is closer to exact).
    scale = expected.abs().max()
    assert (merged - expected).abs().max() <= 1e-6 * scale
    update_scale = (expected - base).abs().max()
    assert (merged - expected).abs().max() <= 1e-5 * update_scale


def test_golden_zero_task_vector(golden) -> None:
    base = golden["zero.base"]
    star = Star(StarParams(eta=40))
    fts = [golden["zero.ft0"], golden["zero.ft1"]]
    assert torch.equal(fts[0], base)  # the case is what it says: τ_0 = 0

    update, stats = star.transform(fts[0] - base)
    assert stats == {"kept_rank": 0, "nuclear_norm_before": 0.0, "nuclear_norm_after": 0.0}
    assert torch.equal(dense(update), torch.zeros_like(base))

    merged, ranks = engine_merge(star, base, fts)
    assert ranks[0] == 0 and ranks[1] >= 1
    assert torch.isfinite(merged).all()
    expected = golden["zero.expected_eta40"]
    assert (merged - expected).abs().max() <= 1e-6 * expected.abs().max()
