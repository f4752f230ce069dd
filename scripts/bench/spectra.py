"""The singular value spectra of real task vectors: what a fair synthetic STAR benchmark must look like.

    .venv/bin/python scripts/bench/spectra.py BASE FT [FT ...]          # folders with model.safetensors
    .venv/bin/python scripts/bench/spectra.py --eval                     # the quality eval's full fine-tunes

For every 2-D tensor of each fine-tune (τ = W_ft − W_base, float64 SVD values): the kept rank
at η = 40 as a fraction of min(m, n), σ_1/σ_median, and the power-law exponent α of
σ_i ∝ i^-α fitted on i = 1..k/2 (least squares in log-log). STAR's speed depends on these: the
kept rank sets how many vectors it needs, and the decay how close σ_r and σ_{r+1} sit.
Writes scripts/bench/results/spectra.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EVAL_FT = ROOT / "scripts" / "eval" / "work" / "runs" / "full" / "ft"


def spectrum_stats(tau: torch.Tensor, eta: float = 40.0) -> dict[str, float]:
    """Kept-rank fraction, σ_1/σ_median and the fitted α of one task vector."""
    s = torch.linalg.svdvals(tau.double())  # (k,) descending
    k = s.numel()
    cumulative = torch.cumsum(s, 0)
    r = int((cumulative < eta / 100 * cumulative[-1]).sum()) + 1
    half = max(2, k // 2)
    x = torch.log(torch.arange(1, half + 1, dtype=torch.float64))
    y = torch.log(s[:half].clamp(min=1e-300))
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return {"k": k, "kept_fraction": r / k, "s1_over_median": float(s[0] / s[k // 2]), "alpha": -slope}


def measure(base: Path, fine_tunes: list[Path], min_side: int = 64) -> dict:
    """Per-matrix statistics over every fine-tune, and their medians and ranges."""
    base_tensors = load_file(str(base / "model.safetensors"))
    rows = []
    for folder in fine_tunes:
        tuned = load_file(str(folder / "model.safetensors"))
        for name, w in base_tensors.items():
            if w.dim() != 2 or min(w.shape) < min_side or name not in tuned:
                continue
            tau = tuned[name].double() - w.double()
            if not bool(tau.any()):
                continue  # a tensor training never touched (an unused pooler)
            rows.append({"model": folder.name, "tensor": name, "shape": list(w.shape), **spectrum_stats(tau)})
    summary = {}
    for key in ("kept_fraction", "s1_over_median", "alpha"):
        values = sorted(r[key] for r in rows)
        summary[key] = {"median": statistics.median(values), "p10": values[len(values) // 10],
                        "p90": values[(9 * len(values)) // 10]}
    return {"base": str(base), "fine_tunes": [str(f) for f in fine_tunes], "matrices": len(rows),
            "summary": summary, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, help="BASE FT [FT ...]")
    parser.add_argument("--eval", action="store_true", help="the quality eval's full fine-tunes (cached)")
    args = parser.parse_args()
    if args.eval:
        sys.path.insert(0, str(ROOT / "scripts" / "eval"))
        import data  # the eval's own: where its base model lives

        runs = sorted(EVAL_FT.glob("full_*"))
        if not runs:
            raise SystemExit(f"no cached fine-tunes under {EVAL_FT}: run scripts/eval/run.py first")
        base, fine_tunes = data.base_model_dir(), sorted(p for p in runs[-1].iterdir() if p.is_dir())
    elif len(args.folders) >= 2:
        base, fine_tunes = args.folders[0], args.folders[1:]
    else:
        raise SystemExit("give BASE FT [FT ...], or --eval")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = measure(base, fine_tunes)
    for key, row in result["summary"].items():
        print(f"{key:16s} median {row['median']:.3g}  (p10 {row['p10']:.3g}, p90 {row['p90']:.3g})")
    result["machine"] = _bench.machine_info()
    print(f"wrote {_bench.write_result('spectra', result)}  ({result['matrices']} matrices)")
    assert math.isfinite(result["summary"]["alpha"]["median"])


if __name__ == "__main__":
    main()
