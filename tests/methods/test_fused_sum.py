"""`FusedSum` (the block-by-block streaming sum) gives the unfused engine's bytes exactly."""

from __future__ import annotations

import pytest
import torch

from star_dist.methods.linear import FusedSum


def unfused(base: torch.Tensor, models: list[torch.Tensor], weights: list[float], lam: float,
            dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """What the engine computes without fusion: whole-tensor upcasts, subtractions and sums."""
    b = base.to(dtype, copy=True)
    acc = torch.zeros_like(b)
    for model, weight in zip(models, weights, strict=True):
        acc.add_(model.to(dtype, copy=True).sub_(b), alpha=weight)
    return b.add_(acc, alpha=lam).to(out_dtype)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 31, 1000, 4099])
@pytest.mark.parametrize("chunk", [7, 64, 1 << 17])
def test_fused_sum_is_bit_identical_to_whole_tensor_passes(stored: torch.dtype, n: int, chunk: int) -> None:
    gen = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=gen).to(stored)
    models = [(base.double() + 0.01 * torch.randn(n, generator=gen, dtype=torch.float64)).to(stored) for _ in range(3)]
    models[1][::5] = -0.0  # signed zeros must come out as the unfused sum gives them
    weights, lam = [0.3, -1.7, 1 / 3], 0.9
    dtype = torch.float64 if stored == torch.float64 else torch.float32
    for out_dtype in (stored, torch.float32):
        out = torch.empty(n, dtype=out_dtype)
        fused = FusedSum(dtype, chunk=chunk)
        fused.run(out, base, models, weights, lam)
        assert fused.merged_ok and fused.out_ok
        expected = unfused(base, models, weights, lam, dtype, out_dtype)
        assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))


def test_fused_sum_flags_non_finite_blocks() -> None:
    base = torch.zeros(100)
    bad = torch.zeros(100)
    bad[77] = float("nan")
    fused = FusedSum(torch.float32, chunk=16)
    fused.run(torch.empty(100), base, [bad], [1.0], 1.0)
    assert not fused.merged_ok
    big = torch.full((100,), 60000.0)
    fused = FusedSum(torch.float32, chunk=16)
    fused.run(torch.empty(100, dtype=torch.float16), base, [big], [2.0], 1.0)  # 120000 > F16's 65504
    assert fused.merged_ok and not fused.out_ok
