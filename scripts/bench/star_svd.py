"""Time star_dist's STAR transform against the naive full-SVD STAR (the authors' algorithm).

    nice -n 10 .venv/bin/python scripts/bench/star_svd.py [--repeats 3] [--skip-4096sq]

For each float32 matrix (flat full-rank Gaussian, rank-64 plus 1e-3 noise, and a σ_i ∝ 1/i
power law) at η = 40 it times:
  naive        torch.linalg.svd(full_matrices=False), the reference rank rule on its σ,
               U_r diag(σ') V_rᵀ formed densely (as github.com/IBM/STAR does);
  star_auto    Star(): values-only SVD, then the certified block iteration or Gram + eigh,
               whichever its planner picks (the route is recorded);
  star_gram    Star(top_method="gram"), where "auto" picked the iteration;
each followed by what the engine does with the result (acc += update), and reports the median
of the runs (contenders interleaved round by round), the median per-round speedup over naive,
and the max difference of the results relative to
max|naive|. Then naive vs dense vs factorized STAR on a 4096×4096 rank-16 LoRA update (B @ A).
Writes scripts/bench/results/star_svd.json. Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from star_dist.methods import LowRank, Star, StarParams  # noqa: E402
from star_dist.methods.spectral import kept_rank, singular_values, top_factors  # noqa: E402

ETA = 40.0


def naive_star(tau: torch.Tensor, eta: float) -> torch.Tensor:
    """The authors' STAR: full thin SVD, searchsorted rank, rescale, dense reconstruction."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)  # (m, k), (k,), (k, n)
    total = s.sum()
    r = int(torch.searchsorted(torch.cumsum(s, 0), (total * eta / 100).reshape(1))) + 1
    r = min(r, s.numel())
    kept = s[:r] * (total / s[:r].sum())  # (r,)
    return (u[:, :r] * kept) @ vh[:r]  # (m, n)


def accumulate(acc: torch.Tensor, update: torch.Tensor | LowRank) -> None:
    """The engine's acc += w · f(τ), w = 1."""
    if isinstance(update, LowRank):
        acc.addmm_(update.left, update.right)  # (m, r) @ (r, n)
    else:
        acc.add_(update)


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Run every contender once per round, `repeats` rounds, so load from other jobs on a shared
    machine hits them alike. Returns the wall times per contender and each one's last result."""
    times: dict = {name: [] for name in fns}
    results: dict = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return times, results


def summarize(row: dict, times: dict, baseline: str) -> None:
    """Median seconds per contender, and its speedup: median over rounds of baseline / it."""
    for name, runs in times.items():
        row[f"{name}_s"] = statistics.median(runs)
        row[f"{name}_runs_s"] = runs
        if name != baseline:
            ratios = [t0 / t for t0, t in zip(times[baseline], runs, strict=True)]
            row[f"{name}_speedup"] = statistics.median(ratios)


def make(kind: str, m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """float32 (m, n) test matrices: a flat spectrum, a low-rank signal, a decaying spectrum."""
    if kind == "full_rank":
        return torch.randn(m, n, generator=gen) / n**0.5  # (m, n) Marchenko–Pastur: flat
    if kind == "lowrank_plus_noise":
        rank = 64
        left = torch.randn(m, rank, generator=gen)  # (m, 64)
        right = torch.randn(rank, n, generator=gen) / n**0.5  # (64, n)
        return left @ right / rank**0.5 + 1e-3 * torch.randn(m, n, generator=gen)  # (m, n)
    k = min(m, n)  # "power_law": σ_i roughly ∝ 1/i, like a fine-tuning update's heavy tail
    decay = torch.arange(1, k + 1, dtype=torch.float32) ** -1.0  # (k,)
    left = torch.randn(m, k, generator=gen) / m**0.5  # (m, k) nearly orthonormal columns
    right = torch.randn(k, n, generator=gen) / n**0.5  # (k, n)
    return (left * decay) @ right  # (m, n)


def route(tau: torch.Tensor) -> str:
    """The route "auto" takes for τ at η = 40, as Star runs it (a separate, untimed call)."""
    s = singular_values(tau)
    info: dict = {}
    top_factors(tau, kept_rank(s, ETA), "auto", s, info)
    return info["route"]


def star_run(method: str, tau: torch.Tensor, box: dict):
    """One engine step with Star(top_method=method): transform, then acc += update."""
    star = Star(StarParams(ETA), top_method=method)

    def run():
        acc = torch.zeros_like(tau)
        update, stats = star.transform(tau)
        box.update(stats)
        accumulate(acc, update)
        return acc

    return run


def bench_dense(shapes, repeats: int, gen: torch.Generator) -> list[dict]:
    rows = []
    for m, n in shapes:
        for kind in ("full_rank", "lowrank_plus_noise", "power_law"):
            tau = make(kind, m, n, gen)
            reps = repeats if m * n <= 4096 * 1024 else max(1, repeats - 1)
            row: dict = {"shape": [m, n], "kind": kind, "eta": ETA, "repeats": reps, "auto_route": route(tau)}
            stats: dict = {}

            def run_naive(tau=tau):
                acc = torch.zeros_like(tau)
                accumulate(acc, naive_star(tau, ETA))
                return acc

            fns = {"naive": run_naive, "star_auto": star_run("auto", tau, stats)}
            if not row["auto_route"].endswith("gram"):  # else "auto" is the Gram route already
                fns["star_gram"] = star_run("gram", tau, {})
            times, results = interleaved(fns, reps)
            summarize(row, times, "naive")
            ref = results["naive"]
            for name in fns:
                if name != "naive":
                    diff = (results[name] - ref).abs().max() / ref.abs().max()
                    row[f"{name}_max_rel_diff_vs_naive"] = float(diff)
            row["kept_rank"] = stats["kept_rank"]
            print(
                f"{m}x{n} {kind:18s} r={row['kept_rank']:5d} naive {row['naive_s']:7.2f}s  "
                f"star {row['star_auto_s']:7.2f}s (x{row['star_auto_speedup']:.2f}, {row['auto_route']})",
                flush=True,
            )
            rows.append(row)
            del tau, ref, results
    return rows


def bench_lora(repeats: int, gen: torch.Generator, size: int = 4096) -> dict:
    m = n = size
    rank = 16
    b = torch.randn(m, rank, generator=gen) * 0.02  # (m, 16) s·B
    a = torch.randn(rank, n, generator=gen) * 0.02  # (16, n) A
    star = Star(StarParams(ETA))

    def run_naive():
        acc = torch.zeros(m, n)
        accumulate(acc, naive_star(b @ a, ETA))  # the task vector formed, then the full SVD
        return acc

    def run_dense():
        acc = torch.zeros(m, n)
        update, stats = star.transform(b @ a)  # (m, n) formed, as a dense input would be
        accumulate(acc, update)
        return acc, stats

    def run_factored():
        acc = torch.zeros(m, n)
        update, stats = star.transform(LowRank(b, a))
        accumulate(acc, update)
        return acc, stats

    times, results = interleaved(
        {"naive_dense": run_naive, "star_dense": run_dense, "star_factorized": run_factored}, repeats
    )
    out_naive, (out_dense, st_dense), (out_fact, st_fact) = results.values()
    scale = out_dense.abs().max()
    row = {"shape": [m, n], "lora_rank": rank, "eta": ETA, "repeats": repeats}
    summarize(row, times, "naive_dense")
    row["speedup_factorized_vs_star_dense"] = statistics.median(
        [a / b for a, b in zip(times["star_dense"], times["star_factorized"], strict=True)]
    )
    row.update(
        {
            "kept_rank_dense": st_dense["kept_rank"],
            "kept_rank_factorized": st_fact["kept_rank"],
            "max_rel_diff_factorized_vs_dense": float((out_dense - out_fact).abs().max() / scale),
            "max_rel_diff_factorized_vs_naive": float((out_naive - out_fact).abs().max() / scale),
        }
    )
    print(
        f"LoRA {m}x{n} r16: naive {row['naive_dense_s']:.2f}s, star dense {row['star_dense_s']:.2f}s, "
        f"factorized {row['star_factorized_s']:.4f}s (x{row['star_factorized_speedup']:.0f} vs naive), "
        f"ranks {row['kept_rank_dense']}/{row['kept_rank_factorized']}",
        flush=True,
    )
    return row


def bench_accuracy(gen: torch.Generator) -> list[dict]:
    """Distance of naive (float32 SVD) and of Star() to STAR computed in float64 with the same r."""
    rows = []
    for m, n in [(1024, 1024), (4096, 1024), (1024, 4096)]:
        for kind in ("full_rank", "lowrank_plus_noise", "power_law"):
            tau = make(kind, m, n, gen)
            update, stats = Star(StarParams(ETA)).transform(tau)
            r = stats["kept_rank"]
            u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
            exact = (u[:, :r] * (s[:r] * s.sum() / s[:r].sum())) @ vh[:r]  # (m, n) float64
            scale = exact.abs().max()
            ours = (update.left.double() @ update.right.double() - exact).abs().max() / scale
            naive = (naive_star(tau, ETA).double() - exact).abs().max() / scale
            rows.append(
                {
                    "shape": [m, n],
                    "kind": kind,
                    "kept_rank": r,
                    "star_max_rel_err_vs_float64": float(ours),
                    "naive_max_rel_err_vs_float64": float(naive),
                }
            )
            print(f"{m}x{n} {kind:18s} error vs float64: star {float(ours):.1e}, naive {float(naive):.1e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (1: stable timings on a shared machine)")
    parser.add_argument("--skip-4096sq", action="store_true", help="leave out 4096×4096")
    parser.add_argument("--out", default=str(ROOT / "scripts/bench/results/star_svd.json"))
    parser.add_argument("--accuracy-only", action="store_true", help="only (re)compute the accuracy section of --out")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)  # a benchmark setting; the library sets nothing global
    if args.accuracy_only:
        report = json.loads(Path(args.out).read_text())
        report["accuracy"] = bench_accuracy(torch.Generator().manual_seed(1))
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"updated {args.out}")
        return
    gen = torch.Generator().manual_seed(0)
    shapes = [(1024, 1024), (4096, 1024), (1024, 4096)]
    if not args.skip_4096sq:
        shapes.append((4096, 4096))
    dense = bench_dense(shapes, args.repeats, gen)
    lora = bench_lora(max(1, args.repeats - 1), gen)
    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_at_end": os.getloadavg(),
        "note": (
            "shared 2-core machine, other jobs running; medians of the runs; speedup = naive / star; "
            "star = Star() with its default top_method 'auto'"
        ),
        "dense": dense,
        "lora_4096_rank16": lora,
        "accuracy": bench_accuracy(torch.Generator().manual_seed(1)),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
