"""TIES by selection gives exactly the result of the sort-based rule it replaced.

The rule: keep the k largest |τ|, taking entries tied at the threshold in row-major order, i.e.
the first k of a *stable* descending sort. Checked on adversarial inputs (all equal, few
distinct values, bf16-valued task vectors, zeros, ties across block boundaries, float64),
and `merge_block` against the previous implementation, bit for bit."""

from __future__ import annotations

import pytest
import torch

from star_dist.methods import Ties, TiesParams
from star_dist.methods.params import ZERO_SUM_RTOL
from star_dist.methods.ties import _RADIX_MIN, select_kth_largest, trim_count, trim_rule


def sorted_keep(tau: torch.Tensor, density: float) -> torch.Tensor:
    """The reference: the first k entries of a stable descending sort of |τ| (flat bool mask)."""
    flat = tau.abs().reshape(-1)
    k = trim_count(flat.numel(), density)
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def rule_keep(tau: torch.Tensor, density: float) -> torch.Tensor:
    flat = tau.abs().reshape(-1)
    rule = trim_rule(tau, density)
    index = torch.arange(flat.numel())
    return (flat > rule.threshold) | ((flat == rule.threshold) & (index <= rule.last_tied))


def adversarial(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=gen) * 0.01
    return {
        "fp32": normal,
        "bf16_values": normal.bfloat16().float(),  # few distinct values: ties everywhere
        "all_equal": torch.full((n,), -0.5),
        "four_values": torch.tensor([0.25, -0.25, 0.5, 1.0])[torch.randint(0, 4, (n,), generator=gen)],
        "mostly_zeros": torch.where(torch.rand(n, generator=gen) < 0.9, 0.0, normal),
        "signed_zeros": torch.where(torch.rand(n, generator=gen) < 0.5, -0.0, normal.bfloat16().float()),
        "wide_exponents": normal * torch.exp2(torch.randint(-60, 60, (n,), generator=gen).float()),
        "float64": (normal.double() * 1e3).round() / 1e3,
    }


@pytest.mark.parametrize("n", [_RADIX_MIN + 4099, 1000])  # the radix path and the small one
@pytest.mark.parametrize("density", [1e-5, 0.2, 0.5, 0.999])
def test_selection_keeps_what_the_stable_sort_keeps(n: int, density: float) -> None:
    for name, tau in adversarial(n, seed=n).items():
        nonzero = tau.reshape(-1) != 0  # a kept zero is a dropped one (at t = 0 all are kept, as before)
        assert torch.equal(rule_keep(tau, density) & nonzero, sorted_keep(tau, density) & nonzero), name


def test_select_kth_largest_counts() -> None:
    for name, tau in adversarial(_RADIX_MIN * 2 + 1, seed=1).items():
        mags = tau.abs()
        for k in (1, 7, mags.numel() // 3, mags.numel() - 1):
            t, above, tied = select_kth_largest(mags, k)
            expected = float(torch.sort(mags, descending=True).values[k - 1])
            assert (t, above, tied) == (expected, int((mags > t).sum()), int((mags == t).sum())), (name, k)


def old_merge_block(ties: Ties, taus, weights, prepared, offset=0) -> torch.Tensor:
    """`Ties.merge_block` as it was before selection (torch.where everywhere, trims formed twice)."""
    dtype = taus[0].dtype
    index = None

    def weighted_trim(i: int) -> torch.Tensor:
        nonlocal index
        tau, rule = taus[i].to(dtype), prepared[i]
        magnitude = tau.abs()
        keep = magnitude > rule.threshold
        if rule.last_tied >= offset + tau.numel() - 1:
            keep |= magnitude == rule.threshold
        elif rule.last_tied >= offset:
            if index is None:
                index = torch.arange(offset, offset + tau.numel()).reshape(tau.shape)
            keep |= (magnitude == rule.threshold) & (index <= rule.last_tied)
        return torch.where(keep, tau, torch.zeros_like(tau)) * weights[i]

    mass = torch.zeros_like(taus[0], dtype=dtype)
    for i in range(len(taus)):
        mass += weighted_trim(i)
    elected = torch.where(mass >= 0, 1.0, -1.0).to(dtype)
    merged, divisor = torch.zeros_like(elected), torch.zeros_like(elected)
    mixed = ties.params.normalize and min(weights) < 0 < max(weights)
    size = torch.zeros_like(elected) if mixed else None
    for i in range(len(taus)):
        delta = weighted_trim(i)
        agrees = torch.sign(delta) == elected
        merged += torch.where(agrees, delta, torch.zeros_like(delta))
        divisor += agrees.to(dtype) * weights[i]
        if size is not None:
            size += agrees.to(dtype) * abs(weights[i])
    if not ties.params.normalize:
        return merged
    if size is None:
        divisor[divisor == 0] = 1.0
        return merged / divisor
    rtol = max(ZERO_SUM_RTOL, 4 * len(weights) * torch.finfo(dtype).eps)
    divisor[divisor.abs() <= size.mul_(rtol)] = 1.0
    return merged / divisor


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, -0.3, 1.2], [0.3, 0.6, -0.9]])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rows", [5, 37, 300])
def test_merge_block_is_bit_identical_to_the_sort_era_code(weights, normalize: bool, rows: int) -> None:
    cases = adversarial(300 * 257, seed=rows)
    for kind in ("bf16_values", "signed_zeros", "four_values", "float64"):
        gen = torch.Generator().manual_seed(len(kind))
        taus = [cases[kind].reshape(300, 257)]
        taus += [taus[0][torch.randperm(300, generator=gen)] * s for s in (-1.0, 0.5)]  # same values, shuffled
        ties = Ties(TiesParams(density=0.3, normalize=normalize))
        prepared = [ties.prepare(tau, i) for i, tau in enumerate(taus)]
        for a in range(0, 300, rows):
            block = [tau[a : a + rows] for tau in taus]
            got = ties.merge_block(block, weights, prepared, a * 257)
            expected = old_merge_block(ties, block, weights, prepared, a * 257)
            assert torch.equal(bits(got), bits(expected)), (kind, a)
