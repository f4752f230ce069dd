"""Straightforward reference merges, written from the papers, independent of star_dist.

Slow and memory-hungry on purpose (full SVDs, all models in memory): they exist to check
the streaming, sharded, distributed engine against the plain definition.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder (single file or sharded)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half inputs; float64 stays float64 (as the engine computes)."""
    return x if x.dtype == torch.float64 else x.float()


def star_truncate(tau: torch.Tensor, eta: float) -> torch.Tensor:
    """STAR on one task vector: full SVD, keep the smallest r reaching η% of Σσ, rescale."""
    if tau.dim() != 2:
        return tau
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    total = s.sum()
    if total == 0:
        return torch.zeros_like(tau)
    r = int((torch.cumsum(s, 0) < eta / 100 * total).sum().item()) + 1
    r = min(r, s.numel())
    s_kept = s[:r] * (total / s[:r].sum())
    return (u[:, :r] * s_kept) @ vh[:r]


def star(base: torch.Tensor, fts: list[torch.Tensor], eta: float = 40, lam: float = 1.0) -> torch.Tensor:
    taus = [star_truncate(upcast(ft) - upcast(base), eta) for ft in fts]
    return upcast(base) + lam * torch.stack(taus).mean(0)


def task_arithmetic(base: torch.Tensor, fts: list[torch.Tensor], weights: list[float], lam: float) -> torch.Tensor:
    return upcast(base) + lam * sum(w * (upcast(ft) - upcast(base)) for w, ft in zip(weights, fts, strict=True))


def average(fts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([upcast(ft) for ft in fts]).mean(0)


def ties(base: torch.Tensor, fts: list[torch.Tensor], density: float, lam: float = 1.0) -> torch.Tensor:
    """TIES-Merging (Yadav et al., 2023): trim to top-k% magnitude, elect sign by summed mass,
    mean over the models that agree with the elected sign."""
    trimmed = []
    for ft in fts:
        tau = upcast(ft) - upcast(base)
        k = int(density * tau.numel())
        mask = torch.zeros(tau.numel(), dtype=torch.bool)
        if k > 0:  # the k largest |τ|; equal magnitudes taken in flat order (a stable sort)
            mask[torch.argsort(tau.abs().flatten(), descending=True, stable=True)[:k]] = True
        trimmed.append(tau * mask.view(tau.shape))
    stacked = torch.stack(trimmed)  # (N, ...)
    sign = torch.sign(stacked.sum(0))
    sign[sign == 0] = 1
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0).clamp(min=1)
    merged = (stacked * agree).sum(0) / count
    return upcast(base) + lam * merged


# -- the spectral family: TSV-M, Iso-C, Iso-CTS ----------------------------------------------
# Written after the authors' code (AntoAndGar/task_singular_vectors, danielm1405/iso-merging):
# full float64 SVDs, every task's triplets placed in zero-padded k-wide slots, polar factors of
# the padded matrices. `floor=True` adds star_dist's documented change: a direction whose σ is
# at most 4·eps32·‖τ‖_F (τ: the matrix it comes from; for Iso-CTS the largest of the sum and the
# tasks) is zeroed in its slot (an exact zero column does not change the polar factor of the
# others) and the isotropic σ is the mean of the rest; `floor=False` is the authors' code.

EPS32 = float(torch.finfo(torch.float32).eps)


def _polar(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def _task_vectors(base: torch.Tensor, fts: list[torch.Tensor], weights: list[float] | None) -> list[torch.Tensor]:
    weights = weights or [1.0] * len(fts)
    return [w * (upcast(ft) - upcast(base)).double() for w, ft in zip(weights, fts, strict=True)]


def _mean_or(base: torch.Tensor, taus: list[torch.Tensor], lam: float) -> torch.Tensor | None:
    """The authors' rule for what is not a matrix: base + λ·mean(τ); None for a matrix."""
    if taus[0].dim() == 2 and taus[0].numel() > 0:
        return None
    return (upcast(base).double() + lam * torch.stack(taus).mean(0)).to(upcast(base).dtype)


def tsv(base: torch.Tensor, fts: list[torch.Tensor], lam: float = 1.0, weights: list[float] | None = None,
        floor: bool = True) -> torch.Tensor:
    """TSV-M (Gargiulo et al., CVPR 2025): top ⌊k/N⌋ triplets per task, polar U and V, recombine."""
    taus = _task_vectors(base, fts, weights)
    mean = _mean_or(base, taus, lam)
    if mean is not None:
        return mean
    (m, n), n_tasks = taus[0].shape, len(taus)
    k = min(m, n)
    r = k // n_tasks
    sum_u, sum_s, sum_v = torch.zeros(m, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), \
        torch.zeros(k, n, dtype=torch.float64)
    for i, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        keep = (s[:r] > 4 * EPS32 * torch.linalg.norm(tau)) if floor else torch.ones(r, dtype=torch.bool)
        sum_u[:, i * r:(i + 1) * r] = u[:, :r] * keep
        sum_s[i * r:(i + 1) * r] = s[:r] * keep
        sum_v[i * r:(i + 1) * r] = vh[:r] * keep[:, None]
    delta = _polar(sum_u) @ torch.diag(sum_s) @ _polar(sum_v)
    return (upcast(base).double() + lam * delta).to(upcast(base).dtype)


def iso_c(base: torch.Tensor, fts: list[torch.Tensor], lam: float = 1.0, weights: list[float] | None = None,
          floor: bool = True) -> torch.Tensor:
    """Iso-C (Marczak et al., ICML 2025): SVD of the summed task vector, every σ set to their mean."""
    taus = _task_vectors(base, fts, weights)
    mean = _mean_or(base, taus, lam)
    if mean is not None:
        return mean
    total = sum(taus)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    keep = (s > 4 * EPS32 * torch.linalg.norm(total)) if floor else torch.ones_like(s, dtype=torch.bool)
    s_mean = (s * keep).sum() / keep.sum().clamp(min=1)  # the authors: over all k (keep all True)
    delta = u @ torch.diag(s_mean * keep) @ vh
    return (upcast(base).double() + lam * delta).to(upcast(base).dtype)


def iso_cts(base: torch.Tensor, fts: list[torch.Tensor], lam: float = 1.0, fraction: float = 0.8,
            weights: list[float] | None = None, floor: bool = True) -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025): common subspace of the sum + each task's residual
    directions, U and V orthogonalized, every σ set to the mean of the k slots."""
    taus = _task_vectors(base, fts, weights)
    mean = _mean_or(base, taus, lam)
    if mean is not None:
        return mean
    (m, n), n_tasks = taus[0].shape, len(taus)
    k = min(m, n)
    common = int(k * fraction)
    common = k - round((k - common) / n_tasks) * n_tasks
    per_task = (k - common) // n_tasks
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    scale = max(float(torch.linalg.norm(sum(taus))), *(float(torch.linalg.norm(t)) for t in taus))
    limit = 4 * EPS32 * scale if floor else -1.0
    keep_c = s[:common] > limit
    u_c = u[:, :common] * keep_c
    slots_u, slots_s, slots_v = torch.zeros(m, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), \
        torch.zeros(k, n, dtype=torch.float64)
    for i, tau in enumerate(taus):
        residual = tau - u_c @ u_c.T @ tau
        ut, st, vt = torch.linalg.svd(residual, full_matrices=False)
        keep = st[:per_task] > limit
        slots_u[:, i * per_task:(i + 1) * per_task] = ut[:, :per_task] * keep
        slots_s[i * per_task:(i + 1) * per_task] = st[:per_task] * keep
        slots_v[i * per_task:(i + 1) * per_task] = vt[:per_task] * keep[:, None]
    start = n_tasks * per_task
    slots_u[:, start:] = u_c
    slots_s[start:] = s[:common] * keep_c
    slots_v[start:] = vh[:common] * keep_c[:, None]
    kept = torch.cat([slots_s[:start] > 0, keep_c])
    delta = _polar(slots_u) @ torch.diag(slots_s.sum() / kept.sum().clamp(min=1) * kept) @ _polar(slots_v)
    return (upcast(base).double() + lam * delta).to(upcast(base).dtype)
