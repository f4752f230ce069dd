"""Every eigenvalue and the top-r eigenvectors of a float64 Gram matrix from one tridiagonal
reduction, on the CPU (LAPACK through SciPy).

STAR needs all k eigenvalues of G = τᵀτ (Σσ and the rank rule) but only r eigenvectors.
torch has `eigvalsh` (values) and `eigh` (all k vectors): on a task vector with a heavy but
slowly decaying tail (σ_i ∝ i^-0.55, kept rank 15%: what real fine-tunes give, see
scripts/bench/star_svd.py) the block iteration cannot certify the small gaps at r and the
route paid eigvalsh + eigh, reducing G to tridiagonal form twice and forming k vectors. Here
G is reduced once (dsytrd, blocked), the values come from the tridiagonal matrix in O(k²)
(dsterf), the r vectors from the tridiagonal matrix in O(k·r) and are mapped back by applying
the reflectors (ormqr, 4·k²·r). At k = 1024, r = 153, one thread: 0.10 s against 0.27 s.

The r vectors of T: inverse iteration from the values already known (dstein) where its
reorthogonalization is cheap, else MRRR (dstemr, which first finds the r values again by
bisection). Measured here, one thread: dstein 0.08 s against MRRR 0.37 s at k = 2048, r = 431
(a flat spectrum), 0.05 against 0.18 s at r = 170 (a real-like one); MRRR wins only when most
of the r values form one cluster (see `_inverse_iteration_pays`).

Accuracy is eigh's: dsterf is the value solver torch's eigvalsh ends in; MRRR's vectors have
residuals and orthogonality O(k·eps64), measured equal to eigh's projector to 3e-13; dstein's
have residuals O(eps64·‖T‖), orthogonality O(eps64·‖T‖/1e-3‖T‖) between clusters and
Gram–Schmidt orthogonality inside one, and their projector was measured equal to MRRR's to
1.5e-12 on the kernel benchmark's matrices (scripts/bench/README.md §4). dstein reports
vectors that failed to converge; MRRR then decides. SciPy's OpenBLAS runs with the worker's
torch thread count, so a merge's bytes depend on the thread count only, as with torch's own
kernels. Without SciPy, `reduce` returns None and the caller keeps torch's eigvalsh / eigh.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from star_dist.methods import host_blas


def available() -> bool:
    """Whether SciPy (and threadpoolctl) are installed: the tridiagonal route can run."""
    return host_blas.loaded() is not None


# dstein's ORTOL: eigenvalues within this fraction of ‖T‖₁ of the next form one cluster, whose
# vectors it reorthogonalizes by Gram–Schmidt, about k·c² more work for a cluster of c.
_CLUSTER_GAP = 1e-3
# Measured here, one thread, per entry of the (k, r) result: dstein ~85 ns plus 0.3-0.9 ns per
# unit of Σc²/r (more at larger k), MRRR's subset 200-520 ns. So dstein while Σc² ≤ 320·r: a flat
# spectrum (Σc²/r ≈ 3-37) or a real-like one at η = 40 (59-286, k = 1024-4096), not at η = 60-90
# (460-1060), where most of the r values chain into one cluster.
_CLUSTER_BUDGET = 320


@dataclass(frozen=True)
class Tridiagonal:
    """G = Q T Qᵀ with T tridiagonal, Q as Householder reflectors (LAPACK's dsytrd, lower),
    and T's eigenvalues (dsterf), found once and used for the values and the vectors."""

    reflectors: torch.Tensor  # (k, k) float64: v_j below the subdiagonal of column j
    tau: torch.Tensor  # (k - 1,) float64 reflector scales
    diagonal: np.ndarray  # (k,) T's diagonal
    offdiagonal: np.ndarray  # (k - 1,) T's subdiagonal
    eigenvalues: np.ndarray  # (k,) T's (and G's) eigenvalues, ascending

    def values(self) -> torch.Tensor:
        """Every eigenvalue of G, ascending, float64 (k,)."""
        return torch.from_numpy(self.eigenvalues.copy())

    def top_vectors(self, r: int) -> torch.Tensor:
        """The eigenvectors of G's r largest eigenvalues, descending: (k, r) float64."""
        k = self.diagonal.size
        if r == 0 or k == 1:
            return torch.ones(k, r, dtype=torch.float64)
        host = _loaded()
        with host.threads():
            z = self._inverse_iteration(r) if self._inverse_iteration_pays(r) else None  # (k, r) ascending
            if z is None:  # MRRR: robust for any clustering
                _, z = host.linalg.eigh_tridiagonal(self.diagonal, self.offdiagonal, select="i",
                                               select_range=(k - r, k - 1), lapack_driver="stemr")
        vectors = torch.from_numpy(z[:, ::-1].copy())  # (k, r) of T, descending (a copy: r = 1 keeps strides)
        # Q = diag(1, Q') with Q' in QR form on rows/columns 1..k-1 of the reflector storage.
        vectors[1:] = torch.ormqr(self.reflectors[1:, : k - 1], self.tau, vectors[1:])
        return vectors

    def _inverse_iteration_pays(self, r: int) -> bool:
        """Whether dstein's reorthogonalization stays cheap (Σc² ≤ 320·r over the clusters of the
        r top eigenvalues) and T is one unreduced block (no zero off-diagonal, which dstein
        would need split points and per-block values for)."""
        if not np.all(self.offdiagonal != 0):
            return False
        top = self.eigenvalues[-r:]  # (r,) ascending
        norm = float(np.max(np.abs(self.diagonal) + np.abs(np.r_[0.0, self.offdiagonal])
                            + np.abs(np.r_[self.offdiagonal, 0.0])))  # ‖T‖₁
        starts = np.flatnonzero(np.diff(top) > _CLUSTER_GAP * norm) + 1  # where a new cluster begins
        sizes = np.diff(np.r_[0, starts, r])  # (clusters,)
        return int(np.sum(sizes.astype(np.int64) ** 2)) <= _CLUSTER_BUDGET * r

    def _inverse_iteration(self, r: int) -> np.ndarray | None:
        """T's eigenvectors for its r largest eigenvalues by inverse iteration from the known
        values (dstein), ascending (k, r); None if any failed to converge."""
        k = self.diagonal.size
        block = np.ones(k, dtype=np.int32)  # every value in T's one block
        split = np.zeros(k, dtype=np.int32)
        split[0] = k  # the block ends at row k
        z, info = _loaded().lapack.dstein(self.diagonal, self.offdiagonal, self.eigenvalues[-r:], block, split)
        return z if info == 0 else None


def _loaded() -> host_blas.HostBlas:
    host = host_blas.loaded()
    assert host is not None, "tridiagonal route without SciPy: check available() first"
    return host


def reduce(gram: torch.Tensor) -> Tridiagonal | None:
    """G's tridiagonal form, or None where this route does not apply (SciPy missing, or G
    not a float64 matrix in host memory: a GPU keeps torch's eigh).

    Args:
        gram: the symmetric (k, k) Gram matrix; its lower triangle is read.
    Returns:
        The Tridiagonal, or None.
    """
    host = host_blas.loaded()
    if host is None or gram.device.type != "cpu" or gram.dtype != torch.float64 or gram.shape[0] < 1:
        return None
    k = gram.shape[0]
    if k == 1:
        value = gram.numpy()[0].copy()
        return Tridiagonal(gram.clone(), torch.zeros(0, dtype=torch.float64), value, np.zeros(0), value.copy())
    with host.threads():
        lwork = int(host.lapack.dsytrd_lwork(k, lower=1)[0])  # the blocked algorithm: half BLAS3
        # Fortran order: G is symmetric, so its transpose's buffer is G in column-major layout.
        c, d, e, tau, info = host.lapack.dsytrd(gram.numpy().T, lower=1, lwork=max(lwork, 1))
        if info != 0:
            return None  # not expected for a finite symmetric matrix; torch's eigh then decides
        lam = host.linalg.eigvalsh_tridiagonal(d, e, lapack_driver="sterf")  # (k,) ascending, O(k²)
    # c is column-major, the layout ormqr (LAPACK) reads: viewed as is, not copied.
    return Tridiagonal(torch.from_numpy(c), torch.from_numpy(tau), d, e, np.ascontiguousarray(lam))
