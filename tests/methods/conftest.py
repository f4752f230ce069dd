"""Fixtures for the method tests: the golden STAR cases carried in tests/data/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# The golden file travels with the repository (tests/data/README.md says where it came from),
# so a fresh clone passes its own tests; STAR_DIST_GOLDEN points at another copy to compare.
CARRIED = Path(__file__).resolve().parents[1] / "data" / "star_cases.safetensors"
GOLDEN = Path(os.environ.get("STAR_DIST_GOLDEN", CARRIED))


@pytest.fixture(scope="session")
def golden() -> dict[str, torch.Tensor]:
    """caseN.base / .ftK / .expected_etaE / .ranks_etaE and zero.* (see tests/data/README.md)."""
    if not GOLDEN.is_file():
        pytest.fail(f"golden STAR cases not found at {GOLDEN}: the repository should carry them")
    return load_file(str(GOLDEN))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one BLAS thread is faster and immune to oversubscription on a busy box.

    Restored after each test, so nothing leaks into the rest of the suite.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
