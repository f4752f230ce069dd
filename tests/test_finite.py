"""The mask-free NaN/Inf checks every merge path uses."""

from __future__ import annotations

import pytest
import torch

from star_dist.finite import all_finite, finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_single_nan_or_inf_is_found_anywhere(dtype: torch.dtype, bad: float) -> None:
    for where in (0, 1234, 2**20 + 7, 3 * 2**20 - 1):  # either side of a chunk's edge
        values = torch.ones(3 * 2**20, dtype=dtype)
        values[where] = bad
        assert not finite(values) and not all_finite(values)


def test_finite_values_whose_sum_overflows_are_finite() -> None:
    values = torch.full((1000,), 3e38, dtype=torch.float32)  # the float32 sum is inf, every value finite
    assert finite(values) and all_finite(values)


def test_empty_and_multi_dimensional_tensors() -> None:
    assert finite(torch.empty(0, 5)) and all_finite(torch.empty(0))
    grid = torch.zeros(64, 32, 4)
    grid[63, 31, 3] = float("nan")
    assert not finite(grid) and not finite(grid.transpose(0, 2))  # a non-contiguous view too
