"""SciPy's BLAS and LAPACK for the float64 host kernels torch does not offer, run at the
worker's torch thread count: SYRK for the Gram matrix (`syrk_into`: half a GEMM's flops) and
the tridiagonal eigensolvers (tridiagonal.py).

Optional: without SciPy (and threadpoolctl) `loaded()` is None and the callers keep torch's
kernels, which give the same results to rounding. SciPy's OpenBLAS is limited to torch's
thread count while it runs, so a merge's bytes depend on the thread count only, as with
torch's own kernels.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class HostBlas:
    """SciPy's modules once imported, and the controller of their BLAS threads."""

    blas: Any  # scipy.linalg.blas
    lapack: Any  # scipy.linalg.lapack
    linalg: Any  # scipy.linalg
    control: Any  # threadpoolctl.ThreadpoolController, made after SciPy's BLAS was loaded

    @contextlib.contextmanager
    def threads(self) -> Iterator[None]:
        """SciPy's BLAS limited to the worker's torch thread count for the block's duration."""
        with self.control.limit(limits=torch.get_num_threads(), user_api="blas"):
            yield


@functools.lru_cache(maxsize=1)
def loaded() -> HostBlas | None:
    """SciPy's BLAS and LAPACK, imported once, or None without SciPy or threadpoolctl."""
    try:
        import scipy.linalg
        import scipy.linalg.blas
        import scipy.linalg.lapack
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return HostBlas(scipy.linalg.blas, scipy.linalg.lapack, scipy.linalg, ThreadpoolController())


def syrk_into(host: HostBlas, gram: torch.Tensor, block: torch.Tensor, accumulate: bool) -> None:
    """gram's upper triangle (+)= that of blockᵀ block, in place, by BLAS dsyrk (half a GEMM).

    Call inside `host.threads()`.

    Args:
        host: the loaded SciPy BLAS.
        gram: (k, k) float64 contiguous host tensor; only its upper triangle is written.
        block: (rows, k) float64 host tensor, row-major or a column-major view (both are read
            in place; any other layout is copied first).
        accumulate: add to gram's upper triangle (beta = 1) instead of overwriting it.
    """
    # gram.numpy().T is G in column-major layout, where BLAS's lower triangle is our upper.
    target = gram.numpy().T  # (k, k) Fortran-contiguous view of gram's memory
    if block.is_contiguous():  # (rows, k) row-major = A (k, rows) column-major: G = A Aᵀ
        a, trans = block.numpy().T, 0
    else:  # a column-major (rows, k) is A itself: G = Aᵀ A
        a, trans = np.asfortranarray(block.numpy()), 1
    out = host.blas.dsyrk(1.0, a, beta=1.0 if accumulate else 0.0, c=target, trans=trans, lower=1, overwrite_c=1)
    assert out is target, "f2py writes a Fortran-contiguous float64 `c` in place"
