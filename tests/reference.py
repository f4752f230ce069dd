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
