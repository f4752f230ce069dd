"""Every eigenvalue and the top-r eigenvectors of a float64 Gram matrix from one tridiagonal
reduction, on the CPU (LAPACK through SciPy).

STAR needs all k eigenvalues of G = τᵀτ (Σσ and the rank rule) but only r eigenvectors.
torch has `eigvalsh` (values) and `eigh` (all k vectors): on a task vector with a heavy but
slowly decaying tail (σ_i ∝ i^-0.55, kept rank 15%: what real fine-tunes give, see
scripts/bench/star_svd.py) the block iteration cannot certify the small gaps at r and the
route paid eigvalsh + eigh, reducing G to tridiagonal form twice and forming k vectors. Here
G is reduced once (dsytrd, blocked), the values come from the tridiagonal matrix in O(k²)
(dsterf), the r vectors from MRRR (dstemr, O(k·r)) and are mapped back by applying the
reflectors (ormqr, 4·k²·r). At k = 1024, r = 153, one thread: 0.10 s against 0.27 s.

Accuracy is eigh's: dsterf is the value solver torch's eigvalsh ends in, and MRRR's vectors
have residuals and orthogonality O(k·eps64), measured equal to eigh's projector to 3e-13.
SciPy's OpenBLAS runs with the worker's torch thread count, so a merge's bytes depend on the
thread count only, as with torch's own kernels. Without SciPy, `reduce` returns None and the
caller keeps torch's eigvalsh / eigh.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@functools.lru_cache(maxsize=1)
def _lapack() -> tuple[Any, Any, Any] | None:
    """(scipy.linalg.lapack, scipy.linalg, a threadpool controller) once loaded, or None."""
    try:
        import scipy.linalg
        import scipy.linalg.lapack
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return scipy.linalg.lapack, scipy.linalg, ThreadpoolController()  # after SciPy's BLAS is loaded


def available() -> bool:
    """Whether SciPy (and threadpoolctl) are installed: the tridiagonal route can run."""
    return _lapack() is not None


@dataclass(frozen=True)
class Tridiagonal:
    """G = Q T Qᵀ with T tridiagonal, Q as Householder reflectors (LAPACK's dsytrd, lower)."""

    reflectors: torch.Tensor  # (k, k) float64: v_j below the subdiagonal of column j
    tau: torch.Tensor  # (k - 1,) float64 reflector scales
    diagonal: np.ndarray  # (k,) T's diagonal
    offdiagonal: np.ndarray  # (k - 1,) T's subdiagonal

    def values(self) -> torch.Tensor:
        """Every eigenvalue of G, ascending, float64 (k,)."""
        if self.diagonal.size == 1:
            return torch.from_numpy(self.diagonal.copy())
        lapack, linalg, control = _loaded()
        with control.limit(limits=torch.get_num_threads(), user_api="blas"):
            lam = linalg.eigvalsh_tridiagonal(self.diagonal, self.offdiagonal, lapack_driver="sterf")
        return torch.from_numpy(np.ascontiguousarray(lam))

    def top_vectors(self, r: int) -> torch.Tensor:
        """The eigenvectors of G's r largest eigenvalues, descending: (k, r) float64."""
        k = self.diagonal.size
        if r == 0 or k == 1:
            return torch.ones(k, r, dtype=torch.float64)
        lapack, linalg, control = _loaded()
        with control.limit(limits=torch.get_num_threads(), user_api="blas"):
            _, z = linalg.eigh_tridiagonal(self.diagonal, self.offdiagonal, select="i",
                                           select_range=(k - r, k - 1), lapack_driver="stemr")
        vectors = torch.from_numpy(z[:, ::-1].copy())  # (k, r) of T, descending (a copy: r = 1 keeps strides)
        # Q = diag(1, Q') with Q' in QR form on rows/columns 1..k-1 of the reflector storage.
        vectors[1:] = torch.ormqr(self.reflectors[1:, : k - 1], self.tau, vectors[1:])
        return vectors


def _loaded() -> tuple[Any, Any, Any]:
    loaded = _lapack()
    assert loaded is not None, "tridiagonal route without SciPy: check available() first"
    return loaded


def reduce(gram: torch.Tensor) -> Tridiagonal | None:
    """G's tridiagonal form, or None where this route does not apply (SciPy missing, or G
    not a float64 matrix in host memory: a GPU keeps torch's eigh).

    Args:
        gram: the symmetric (k, k) Gram matrix; its lower triangle is read.
    Returns:
        The Tridiagonal, or None.
    """
    loaded = _lapack()
    if loaded is None or gram.device.type != "cpu" or gram.dtype != torch.float64 or gram.shape[0] < 1:
        return None
    lapack, _, control = loaded
    k = gram.shape[0]
    if k == 1:
        return Tridiagonal(gram.clone(), torch.zeros(0, dtype=torch.float64), gram.numpy()[0].copy(),
                           np.zeros(0))
    with control.limit(limits=torch.get_num_threads(), user_api="blas"):
        lwork = int(lapack.dsytrd_lwork(k, lower=1)[0])  # the blocked algorithm: half BLAS3
        # Fortran order: G is symmetric, so its transpose's buffer is G in column-major layout.
        c, d, e, tau, info = lapack.dsytrd(gram.numpy().T, lower=1, lwork=max(lwork, 1))
    if info != 0:
        return None  # not expected for a finite symmetric matrix; torch's eigh then decides
    # c is column-major, the layout ormqr (LAPACK) reads: viewed as is, not copied.
    return Tridiagonal(torch.from_numpy(c), torch.from_numpy(tau), d, e)
