"""Inputs shared by the TSV-M and Iso tests: spectra like real task vectors, LoRA folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from star_dist.methods import FoldMethod, LowRank, dense
from star_dist.tiny_models import make_tiny_merge, save_model

from ..reference import load_folder


def decaying(m: int, n: int, seed: int, decay: float = 0.9) -> torch.Tensor:
    """A full-rank m×n task vector with σ_j = decay^j and random singular vectors (float32)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    sigma = decay ** torch.arange(k, dtype=torch.float64)
    return ((u * sigma) @ v.T).float()


def low_rank(m: int, n: int, r: int, seed: int) -> LowRank:
    """A LoRA-like task vector B·A of rank r (float32 factors)."""
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(m, r, generator=g) * 0.1, torch.randn(r, n, generator=g) * 0.1)


def run_fold(method: FoldMethod, taus: list, weights: list[float] | None = None) -> tuple[torch.Tensor, dict]:
    """Drive a method's fold the way the engine does: every pass, every model (None: absent)."""
    weights = weights or [1.0] * len(taus)
    shape = tuple(next(t for t in taus if t is not None).shape)
    fold = method.fold(shape, len(taus))
    for step in range(fold.passes):
        for i, (tau, w) in enumerate(zip(taus, weights, strict=True)):
            if tau is not None:
                fold.add(tau, w, i, step)
    update, stats = fold.finish()
    return dense(update), stats


def lora_folders(root: Path, n: int = 3) -> Path:
    """base/, lora0…/ PEFT adapters (rank 4 on q/v) and full0…/ = base + s·B·A in float32:
    the same task vectors as full checkpoints, for the dense route."""
    make_tiny_merge(root, n_models=0, dtype="float32", shards=2, lora=n)
    base = load_folder(root / "base")
    config = json.loads((root / "base" / "config.json").read_text())
    for i in range(n):
        adapter = load_file(str(root / f"lora{i}" / "adapter_model.safetensors"))
        lora_config = json.loads((root / f"lora{i}" / "adapter_config.json").read_text())
        scale = lora_config["lora_alpha"] / lora_config["r"]
        full = dict(base)
        for key, a in adapter.items():
            if ".lora_A." in key:
                name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                b = adapter[key.replace("lora_A", "lora_B")]
                full[name] = base[name] + scale * (b @ a)
        save_model(root / f"full{i}", full, config, "float32", shards=2)
    return root
