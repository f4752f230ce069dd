"""The merge methods under test and one call of star_dist's public API per merge.

Every merged model in the report is made by `star_dist.merge`, from full fine-tuned folders
or from PEFT LoRA adapter folders as they were saved (star_dist computes τ = s·B·A itself).
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import star_dist
import torch
from safetensors.torch import load_file, save_file


@dataclass(frozen=True)
class Method:
    """A merge method as reported: fixed parameters plus a grid tuned on validation data."""

    label: str
    merge_method: str
    params: dict[str, float] = field(default_factory=dict)
    grid: tuple[dict[str, float], ...] = ()
    # Validation candidates derived from one star_dist merge at λ = 1 (see `rescale`), for
    # methods whose grid is λ alone and whose merge costs full SVDs; test scores always come
    # from a star_dist merge at the chosen λ.
    rescale_lambda: bool = False

    def candidates(self) -> list[dict[str, float]]:
        """Parameter sets to try (one when nothing is tuned)."""
        return [{**self.params, **g} for g in self.grid] or [dict(self.params)]


def _grid(**axes: tuple[float, ...]) -> tuple[dict[str, float], ...]:
    names = list(axes)
    return tuple(dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values()))


# Task arithmetic sums task vectors (weights 1), so λ is the scale of the sum; TIES' disjoint
# mean is already an average, so its λ sits near 1. STAR and average tune nothing (as in the
# STAR paper: plain 1/N mean of the truncated task vectors).
TA_LAMBDAS = (0.3, 0.5, 1.0)
TIES_DENSITIES = (0.2, 0.5)
TIES_LAMBDAS = (0.8, 1.2)
STAR_ETAS = (20, 40, 60, 80)
# TSV-M, Iso-C, Iso-CTS: the global scale α (star_dist's `lambda`), default 1; the authors tune
# it on validation over 0.1, 0.2, …, 3.0, a grid this machine's budget cuts to these values.
ALPHAS = (0.5, 1.0, 1.5, 2.0)
# (label, star_dist method): each reported twice, at α = 1 (data-free) and with α tuned.
SPECTRAL = (("TSV-M", "tsv"), ("Iso-C", "iso_c"), ("Iso-CTS", "iso_cts"))


def methods(ta_lambdas: tuple[float, ...] = TA_LAMBDAS,
            ties_densities: tuple[float, ...] = TIES_DENSITIES,
            ties_lambdas: tuple[float, ...] = TIES_LAMBDAS,
            star_etas: tuple[int, ...] = STAR_ETAS,
            alphas: tuple[float, ...] = ALPHAS) -> list[Method]:
    """Every merged method in the table, in report order."""
    return [
        Method("average", "average"),
        Method("task arithmetic", "task_arithmetic", grid=_grid(**{"lambda": ta_lambdas})),
        Method("TIES", "ties", grid=_grid(density=ties_densities, **{"lambda": ties_lambdas})),
        *[Method(f"STAR η={eta}", "star", {"eta": eta}) for eta in star_etas],
        *[Method(f"{label} α=1", name, {"lambda": 1.0}) for label, name in SPECTRAL],
        *[Method(f"{label} (α tuned)", name, grid=_grid(**{"lambda": alphas}), rescale_lambda=True)
          for label, name in SPECTRAL],
    ]


def spectral_labels() -> tuple[str, ...]:
    """The report labels of TSV-M, Iso-C and Iso-CTS, untuned and tuned."""
    return tuple(f"{label} {suffix}" for suffix in ("α=1", "(α tuned)") for label, _ in SPECTRAL)


def merge_config(method: Method, params: dict[str, float], base_dir: Path,
                 inputs: list[Path]) -> dict[str, Any]:
    """The mergekit-like config dict star_dist takes (same keys as its YAML files)."""
    return {
        "merge_method": method.merge_method,
        "base_model": str(base_dir),
        "models": [{"model": str(p)} for p in inputs],
        "parameters": dict(params),
        "dtype": "float32",
    }


def run_merge(method: Method, params: dict[str, float], base_dir: Path, inputs: list[Path],
              out_dir: Path) -> Path:
    """Merge through star_dist's public API into ``out_dir`` (an HF folder) and return it."""
    star_dist.merge(merge_config(method, params, base_dir, inputs), out_dir,
                    overwrite=True, quiet=True, runtime="local")
    return out_dir


def discard(folder: Path) -> None:
    """Merged folders are scored once then deleted: ~90 MB each, hundreds per run."""
    shutil.rmtree(folder, ignore_errors=True)


def rescale(base_dir: Path, unit_dir: Path, lam: float, out_dir: Path) -> Path:
    """W_base + λ·(W(1) − W_base): star_dist's merge at `lambda: λ` from its merge at 1.

    Every method here is W = W_base + λ·Δ with Δ independent of λ, so one merge (its SVDs)
    serves every λ of a validation grid; the two differ by float32 rounding only (star_dist
    adds λ·Δ to the base once, here Δ is recovered as W(1) − W_base first).
    """
    base = load_file(str(base_dir / "model.safetensors"))
    unit = load_file(str(unit_dir / "model.safetensors"))
    out = {name: (b + lam * (unit[name].to(torch.float32) - b.to(torch.float32))).to(b.dtype)
           if b.is_floating_point() else unit[name] for name, b in base.items()}
    discard(out_dir)
    shutil.copytree(unit_dir, out_dir)
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
