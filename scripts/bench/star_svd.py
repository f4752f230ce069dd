"""STAR's dense kernels against the naive full-SVD STAR, their accuracy, and a whole merge.

    nice -n 10 .venv/bin/python scripts/bench/star_svd.py                 # kernel, accuracy, ranks, merge
    nice -n 10 .venv/bin/python scripts/bench/star_svd.py --quick         # small sizes, under a minute
    nice -n 10 .venv/bin/python scripts/bench/star_svd.py --sections kernel,accuracy --sizes 1024,2048

Sections (one BLAS thread; contenders interleaved round by round, medians, per-round ratios):
  kernel    one task vector, η = 40, four spectra (flat Gaussian, rank-64 + 1e-3 noise, σ_i ∝ 1/i,
            and σ_i ∝ i^-0.67 with random orthonormal vectors, as real fine-tunes have: "real_like"),
            square k×k and 1:4 k×4k: `naive` (torch.linalg.svd, the authors' rule, U_r diag(σ') V_rᵀ
            formed) vs `star` (Star(): Gram values and vectors from one tridiagonal reduction on the
            CPU, methods/tridiagonal.py; on a GPU the certified iteration or eigh) vs `star_svd_values`
            (Star(values_method="svd"): the float32 values-only SVD, the previous default); each
            followed by the engine's acc += update. Kept ranks of all three and of the reference rule.
  accuracy  the STAR result vs STAR computed from a float64 SVD with the same r (max |diff| / max
            |exact|), for star and naive; σ from the Gram route and from the float32 SVD vs float64
            truth: the σ that carry the nuclear norm (relative), the tiny σ of a rank-deficient τ
            (absolute, over σ_1); and Σ|σ̂ − σ| of the float32 SVD over k·u32·‖τ‖_F, which the
            rank window (`star_dist/methods/spectrum.py`) allows 2 of.
  ranks     η from 1 to 100 on every spectrum: the Gram route's rank vs the reference rule's, and
            how often it fell back to the reference values ("gram->svd").
  merge     a generated llama-shaped fp32 model × 4 fine-tunes (task vectors with σ_i ∝ i^-0.67
            like real fine-tunes', spectra.py; `--merge-spectrum lowrank`: rank 4 + flat noise),
            each merge in a child process:
            star_dist in-process (1 thread) vs the naive in-memory STAR (every model loaded, a
            float32 full SVD per matrix, one thread); wall time, peak anonymous memory above the
            imports (sampled every 2 ms), and the largest difference of the merged weights.
  lora      dense vs factorized STAR on a 4096×4096 rank-16 LoRA update (slow: ~1 min).
Writes scripts/bench/results/star_svd.json (or star_svd_quick.json, or `--name`.json); the issue's
291M merge: `--sections merge --merge-model 291M --name star_svd_merge_291M` (~8 min a round).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402

from star_dist.methods import LowRank, Star, StarParams  # noqa: E402
from star_dist.methods.spectral import gram_side, kept_rank, singular_values  # noqa: E402
from star_dist.methods.spectrum import gram_values, star_spectrum  # noqa: E402

ETA = 40.0
KINDS = ("full_rank", "lowrank_plus_noise", "power_law", "real_like")
U32 = float(torch.finfo(torch.float32).eps) / 2


# -- the contenders ----------------------------------------------------------------------------


def naive_star(tau: torch.Tensor, eta: float) -> torch.Tensor:
    """The authors' STAR: full thin SVD, searchsorted rank, rescale, dense reconstruction."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)  # (m, k), (k,), (k, n)
    r = naive_rank(s, eta)
    kept = s[:r] * (s.sum() / s[:r].sum())  # (r,)
    return (u[:, :r] * kept) @ vh[:r]  # (m, n)


def naive_rank(s: torch.Tensor, eta: float) -> int:
    """The authors' rule on their float32 σ: first cumulative sum ≥ η% of Σσ, capped at k."""
    r = int(torch.searchsorted(torch.cumsum(s, 0), (s.sum() * eta / 100).reshape(1))) + 1
    return min(r, s.numel())


def accumulate(acc: torch.Tensor, update: torch.Tensor | LowRank) -> None:
    """The engine's acc += w · f(τ), w = 1."""
    if isinstance(update, LowRank):
        acc.addmm_(update.left, update.right)  # (m, r) @ (r, n)
    else:
        acc.add_(update)


def make(kind: str, m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """float32 (m, n) test matrices: a flat spectrum, a low-rank signal, a decaying spectrum,
    and ("rank_deficient") rank 64 exactly, whose other σ are float32 rounding noise."""
    if kind == "full_rank":
        return torch.randn(m, n, generator=gen) / n**0.5  # (m, n) Marchenko–Pastur: flat
    if kind in ("lowrank_plus_noise", "rank_deficient"):
        left = torch.randn(m, 64, generator=gen)  # (m, 64)
        right = torch.randn(64, n, generator=gen) / n**0.5  # (64, n)
        noise = 1e-3 * torch.randn(m, n, generator=gen) if kind == "lowrank_plus_noise" else 0.0
        return left @ right / 8 + noise  # (m, n)
    if kind == "real_like":  # σ_i ∝ i^-0.67 exactly, random singular vectors: real fine-tunes' (spectra.py)
        from star_dist.tiny_models import power_law_update

        return power_law_update(m, n, gen) / m**0.5
    k = min(m, n)  # "power_law": σ_i roughly ∝ 1/i, like a fine-tuning update's heavy tail
    decay = torch.arange(1, k + 1, dtype=torch.float32) ** -1.0  # (k,)
    left = torch.randn(m, k, generator=gen) / m**0.5  # (m, k) nearly orthonormal columns
    right = torch.randn(k, n, generator=gen) / n**0.5  # (k, n)
    return (left * decay) @ right  # (m, n)


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Every contender once per round, `repeats` rounds, so other jobs' load hits them alike.
    Returns the wall times per contender and each one's last result."""
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
            row[f"{name}_speedup"] = statistics.median([a / b for a, b in zip(times[baseline], runs, strict=True)])


# -- kernel ------------------------------------------------------------------------------------


def star_step(tau: torch.Tensor, box: dict, **options: Any):
    """One engine step with Star(**options): transform, then acc += update; stats into `box`."""
    star = Star(StarParams(ETA), **options)

    def run() -> torch.Tensor:
        acc = torch.zeros_like(tau)
        update, stats = star.transform(tau)
        box.update(stats)
        accumulate(acc, update)
        return acc

    return run


def naive_step(tau: torch.Tensor):
    def run() -> torch.Tensor:
        acc = torch.zeros_like(tau)
        accumulate(acc, naive_star(tau, ETA))
        return acc

    return run


def kernel_row(kind: str, m: int, n: int, repeats: int, gen: torch.Generator) -> dict:
    tau = make(kind, m, n, gen)
    stats: dict = {}
    old: dict = {}
    fns = {"naive": naive_step(tau), "star": star_step(tau, stats),
           "star_svd_values": star_step(tau, old, values_method="svd")}
    times, results = interleaved(fns, repeats)
    row: dict = {"shape": [m, n], "kind": kind, "eta": ETA, "repeats": repeats}
    summarize(row, times, "naive")
    reference = kept_rank(singular_values(tau), ETA)
    row.update(
        kept_rank_star=stats["kept_rank"], kept_rank_svd_values=old["kept_rank"], kept_rank_reference=reference,
        kept_rank_naive=naive_rank(torch.linalg.svdvals(tau), ETA), spectrum_route=star_spectrum(tau, ETA).route,
    )
    ref = results["naive"]
    for name in ("star", "star_svd_values"):
        row[f"{name}_max_rel_diff_vs_naive"] = float((results[name] - ref).abs().max() / ref.abs().max())
    print(f"{m}x{n} {kind:18s} r={row['kept_rank_star']:4d} naive {row['naive_s']:6.2f}s star {row['star_s']:6.2f}s "
          f"(x{row['star_speedup']:.2f}; svd values x{row['star_svd_values_speedup']:.2f})", flush=True)
    return row


def bench_kernel(sizes: list[int], repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [kernel_row(kind, m, n, repeats, gen) for k in sizes for m, n in ((k, k), (k, 4 * k)) for kind in KINDS]


# -- accuracy ----------------------------------------------------------------------------------


def exact_star(tau: torch.Tensor, r: int) -> torch.Tensor:
    """STAR with rank r from a float64 SVD of the same float32 τ."""
    u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
    return (u[:, :r] * (s[:r] * s.sum() / s[:r].sum())) @ vh[:r]  # (m, n) float64


def value_errors(tau: torch.Tensor) -> dict:
    """σ from the Gram route and from the float32 SVD against a float64 SVD of the same τ."""
    truth = torch.linalg.svdvals(tau.double())  # (k,)
    gram = gram_values(gram_side(tau))
    svd32 = singular_values(tau).double()
    big = truth > 1e-3 * truth[0]  # the σ that carry the nuclear norm
    k = truth.numel()
    out = {}
    for name, s in (("gram", gram), ("svd32", svd32)):
        err = (s - truth).abs()
        out[f"{name}_max_rel_err_large_sigma"] = float((err[big] / truth[big]).max())
        out[f"{name}_max_abs_err_small_sigma_over_s1"] = float(err[~big].max() / truth[0]) if (~big).any() else None
        out[f"{name}_nuclear_norm_rel_err"] = float((s.sum() - truth.sum()).abs() / truth.sum())
        out[f"{name}_sum_abs_err_over_k_u32_fro"] = float(err.sum() / (k * U32 * truth.norm()))
    return out


def accuracy_row(kind: str, m: int, n: int, gen: torch.Generator) -> dict:
    tau = make(kind, m, n, gen)
    update, stats = Star(StarParams(ETA)).transform(tau)
    exact = exact_star(tau, stats["kept_rank"])
    scale = exact.abs().max()
    ours = float((update.left.double() @ update.right.double() - exact).abs().max() / scale)
    naive = float((naive_star(tau, ETA).double() - exact).abs().max() / scale)
    row = {"shape": [m, n], "kind": kind, "kept_rank": stats["kept_rank"],
           "star_max_rel_err_vs_float64": ours, "naive_max_rel_err_vs_float64": naive, **value_errors(tau)}
    print(f"{m}x{n} {kind:18s} STAR error vs float64: star {ours:.1e}, naive {naive:.1e}; σ rel err (large): "
          f"gram {row['gram_max_rel_err_large_sigma']:.1e}, svd32 {row['svd32_max_rel_err_large_sigma']:.1e}",
          flush=True)
    return row


def bench_accuracy(sizes: list[int]) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    shapes = [(k, k) for k in sizes] + [(k, 4 * k) for k in sizes] + [(4 * sizes[0], sizes[0])]
    return [accuracy_row(kind, m, n, gen) for m, n in shapes for kind in (*KINDS, "rank_deficient")]


# -- ranks -------------------------------------------------------------------------------------


def bench_ranks(sizes: list[int]) -> dict:
    """The Gram route's rank against the reference rule's, η from 1 to 100, every spectrum."""
    gen = torch.Generator().manual_seed(2)
    etas = [1, 5, 10, 20, 30, 40, 50, 60, 75, 90, 95, 99, 100]
    cases, fallbacks, rows = 0, 0, []
    for m, n in [(k, k) for k in sizes] + [(k, 4 * k) for k in sizes]:
        for kind in (*KINDS, "rank_deficient"):
            tau = make(kind, m, n, gen)
            reference_values = singular_values(tau)
            for eta in etas:
                spectrum = star_spectrum(tau, eta)
                reference = kept_rank(reference_values, eta)
                cases += 1
                fallbacks += spectrum.route == "gram->svd"
                rows.append({"shape": [m, n], "kind": kind, "eta": eta, "rank": spectrum.rank,
                             "reference_rank": reference, "route": spectrum.route})
    differ = [row for row in rows if row["rank"] != row["reference_rank"]]
    print(f"ranks: {cases} cases, {len(differ)} differ from the reference rule, {fallbacks} fell back", flush=True)
    return {"cases": cases, "rank_differs": len(differ), "fallbacks": fallbacks,
            "fallback_cases": [r for r in rows if r["route"] == "gram->svd"], "differing": differ}


# -- a whole merge -----------------------------------------------------------------------------


def load_in_memory(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model copied into process memory, as `torch.load` would hold it.

    safetensors' `load_file` leaves tensors backed by the file's pages (file-backed, not
    anonymous memory), which would hide the naive merge's real footprint from RssAnon."""
    sys.path.insert(0, str(ROOT / "tests"))
    from reference import load_folder

    return {name: tensor.clone() for name, tensor in load_folder(folder).items()}


def naive_merge(folder: Path, out: Path, n_models: int) -> None:
    """The naive in-memory STAR: load the base and every fine-tune whole, full SVD per matrix."""
    from safetensors.torch import save_file

    base = load_in_memory(folder / "base")
    fts = [load_in_memory(folder / f"ft{i}") for i in range(n_models)]
    merged = {}
    for name, w in base.items():
        taus = [ft[name].float() - w.float() for ft in fts]
        if w.dim() == 2:
            taus = [naive_star(tau, ETA) for tau in taus]
        merged[name] = (w.float() + torch.stack(taus).mean(0)).to(w.dtype).contiguous()
    save_file(merged, str(out / "model.safetensors"))


def naive_child(job: dict) -> None:
    """Child side of the naive merge: imports, baseline memory, merge, one JSON line."""
    torch.set_num_threads(1)
    baseline = _bench.proc_status("self")
    start = time.perf_counter()
    naive_merge(Path(job["folder"]), Path(job["out"]), job["n_models"])
    print(json.dumps({"merge_wall_s": time.perf_counter() - start, "baseline_rss_anon": baseline.get("RssAnon", 0)}))


def run_sampled(cmd: list[str]) -> dict:
    """Run a child, sampling its anonymous memory every 2 ms; its last JSON line plus the peak."""
    proc = subprocess.Popen(cmd, env={**_bench.child_env(), **_bench.PINNED_MALLOC_ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = {"anon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["anon"] = max(peak["anon"], _bench.proc_status(proc.pid).get("RssAnon", 0))
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"naive merge child failed ({proc.returncode}):\n{err[-3000:]}")
    report = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    report["peak_rss_anon_above_baseline"] = peak["anon"] - report["baseline_rss_anon"]
    return report


def merged_difference(ours: Path, naive: Path) -> float:
    """max |ours − naive| over max |naive − base|, across every tensor (the update's scale)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from reference import load_folder

    a, b, base = load_folder(ours), load_folder(naive), load_folder(naive.parent / "base")
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in b)
    scale = max(float((b[k].double() - base[k].double()).abs().max()) for k in b)
    return diff / scale


def bench_merge(shape_args: dict, n_models: int, repeats: int, spectrum: str = "power_law") -> dict:
    from star_dist.tiny_models import TinyShape, llama_shapes, make_tiny_merge

    shape = TinyShape(**shape_args)
    params = sum(math.prod(s) for s in llama_shapes(shape).values())
    with tempfile.TemporaryDirectory(prefix="star_svd_merge_") as tmp:
        work = Path(tmp)
        config = make_tiny_merge(work, n_models=n_models, dtype="float32", shape=shape, shards=2, spectrum=spectrum)
        runs: dict[str, list[dict]] = {"star_dist": [], "naive": []}
        for round_ in range(repeats):
            for name in runs:
                out = work / f"{name}_out{round_}"
                out.mkdir()
                runs[name].append(run_contender(name, config, out, n_models))
                print(f"merge round {round_}: {name} {runs[name][-1]['merge_wall_s']:.1f}s, peak anon "
                      f"{runs[name][-1]['peak_rss_anon_above_baseline'] / _bench.MIB:.0f} MiB", flush=True)
        diff = merged_difference(work / "star_dist_out0", work / "naive_out0")
        estimate = plan_estimate(config)
    summary = merge_summary(runs, shape_args, params, n_models, diff)
    estimate["time_over_measured"] = estimate["cpu_seconds"] / summary["star_dist_s"]
    estimate["memory_over_measured"] = estimate["cpu_peak_bytes"] / _bench.MIB / summary["star_dist_peak_anon_mib"]
    print(f"plan estimate: {estimate['cpu_seconds']:.1f} s (x{estimate['time_over_measured']:.2f} the measured), "
          f"{estimate['cpu_peak_bytes'] / _bench.MIB:.0f} MiB (x{estimate['memory_over_measured']:.2f})", flush=True)
    return {"spectrum": spectrum, **summary, "plan_estimate": estimate}


def plan_estimate(config: Path) -> dict:
    """What `star-dist plan` states for star_dist's contender (one worker, one thread): the CPU
    time at this machine's probed rates and the peak memory, to hold against the measured."""
    import star_dist

    torch.set_num_threads(1)
    cpu = star_dist.plan(config, threads_per_worker=1, workers=1).estimate.cpu
    return {"cpu_seconds": cpu.seconds, "cpu_peak_bytes": cpu.peak_host_bytes, "rates": cpu.rates.label}


def run_contender(name: str, config: Path, out: Path, n_models: int) -> dict:
    if name == "star_dist":
        job = {"config": str(config), "out": str(out), "options": {"threads_per_worker": 1}}
        return _bench.run_merge_child(job, env=_bench.PINNED_MALLOC_ENV)
    job = {"folder": str(config.parent), "out": str(out), "n_models": n_models}
    script = str(Path(__file__).resolve())
    return run_sampled(["nice", "-n", "10", sys.executable, script, "naive-child", json.dumps(job)])


def merge_summary(runs: dict, shape_args: dict, params: int, n_models: int, diff: float) -> dict:
    ours, naive = runs["star_dist"], runs["naive"]
    speed = [b["merge_wall_s"] / a["merge_wall_s"] for a, b in zip(ours, naive, strict=True)]
    peak = "peak_rss_anon_above_baseline"
    memory = [b[peak] / a[peak] for a, b in zip(ours, naive, strict=True)]
    row = {"shape": shape_args, "parameters": params, "n_models": n_models, "dtype": "float32", "threads": 1,
           "star_dist_s": statistics.median(r["merge_wall_s"] for r in ours),
           "naive_s": statistics.median(r["merge_wall_s"] for r in naive),
           "speedup": statistics.median(speed), "speedup_per_round": speed,
           "star_dist_peak_anon_mib": statistics.median(r["peak_rss_anon_above_baseline"] for r in ours) / _bench.MIB,
           "naive_peak_anon_mib": statistics.median(r["peak_rss_anon_above_baseline"] for r in naive) / _bench.MIB,
           "memory_ratio": statistics.median(memory), "max_diff_over_update_scale": diff, "runs": runs}
    print(f"merge {params / 1e6:.0f}M x{n_models}: star_dist {row['star_dist_s']:.1f}s vs naive {row['naive_s']:.1f}s "
          f"(x{row['speedup']:.2f}), peak anon {row['star_dist_peak_anon_mib']:.0f} vs "
          f"{row['naive_peak_anon_mib']:.0f} MiB "
          f"(x{row['memory_ratio']:.2f} less), max diff {diff:.1e} of the update", flush=True)
    return row


# -- LoRA --------------------------------------------------------------------------------------


def bench_lora(repeats: int, size: int = 4096) -> dict:
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(size, 16, generator=gen) * 0.02  # (m, 16) s·B
    a = torch.randn(16, size, generator=gen) * 0.02  # (16, n) A
    dense_stats: dict = {}
    low_stats: dict = {}
    fns = {"naive_dense": naive_step(b @ a), "star_dense": star_step(b @ a, dense_stats)}
    star = Star(StarParams(ETA))

    def factored() -> torch.Tensor:
        acc = torch.zeros(size, size)
        update, stats = star.transform(LowRank(b, a))
        low_stats.update(stats)
        accumulate(acc, update)
        return acc

    fns["star_factorized"] = factored
    times, results = interleaved(fns, repeats)
    row = {"shape": [size, size], "lora_rank": 16, "eta": ETA, "repeats": repeats}
    summarize(row, times, "naive_dense")
    scale = results["star_dense"].abs().max()
    diff = float((results["star_dense"] - results["star_factorized"]).abs().max() / scale)
    row.update(kept_rank_dense=dense_stats["kept_rank"], kept_rank_factorized=low_stats["kept_rank"],
               max_rel_diff_factorized_vs_dense=diff)
    print(f"LoRA {size}² r16: naive {row['naive_dense_s']:.2f}s, dense {row['star_dense_s']:.2f}s, "
          f"factorized {row['star_factorized_s']:.4f}s", flush=True)
    return row


# -- main --------------------------------------------------------------------------------------

MERGE_SHAPES = {
    "62M": {"hidden": 1024, "intermediate": 2816, "layers": 4, "heads": 16, "kv_heads": 4, "vocab": 8192},
    "291M": {"hidden": 1024, "intermediate": 2816, "layers": 20, "heads": 16, "kv_heads": 4, "vocab": 32000},
    "quick": {"hidden": 256, "intermediate": 704, "layers": 2, "heads": 8, "kv_heads": 2, "vocab": 2048},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="kernel,accuracy,ranks,merge",
                        help="any of kernel,accuracy,ranks,merge,lora")
    parser.add_argument("--sizes", default="1024,2048", help="k for the k×k and k×4k kernel matrices")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--merge-model", default="62M", choices=sorted(MERGE_SHAPES))
    parser.add_argument("--merge-repeats", type=int, default=2)
    parser.add_argument("--merge-spectrum", default="power_law", choices=["power_law", "lowrank"],
                        help="the fine-tunes' task vectors: power_law like real ones (spectra.py), or "
                        "rank 4 + flat noise")
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 round: a smoke run")
    parser.add_argument("--update", action="store_true", help="keep the other sections of the existing JSON")
    parser.add_argument("--name", help="results/<name>.json (default star_svd, or star_svd_quick with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats, args.merge_model, args.merge_repeats = "256", 1, "quick", 1
    torch.set_num_threads(1)  # a benchmark setting; the library sets nothing global
    sizes = [int(s) for s in args.sizes.split(",")]
    sections = set(args.sections.split(","))
    name = args.name or ("star_svd_quick" if args.quick else "star_svd")
    previous = _bench.RESULTS / f"{name}.json"
    report: dict[str, Any] = json.loads(previous.read_text()) if args.update and previous.exists() else {}
    report.update(eta=ETA, **{f"machine_start_{'_'.join(sorted(sections))}": _bench.machine_info()})
    if "kernel" in sections:
        report["kernel"] = bench_kernel(sizes, args.repeats)
    if "accuracy" in sections:
        report["accuracy"] = bench_accuracy(sizes[:1])
    if "ranks" in sections:
        report["ranks"] = bench_ranks([min(sizes[0], 512)])
    if "merge" in sections:
        report["merge"] = bench_merge(MERGE_SHAPES[args.merge_model], 4, args.merge_repeats, args.merge_spectrum)
    if "lora" in sections:
        report["lora_4096_rank16"] = bench_lora(max(1, args.repeats - 1))
    report[f"machine_end_{'_'.join(sorted(sections))}"] = _bench.machine_info()
    print(f"wrote {_bench.write_result(name, report)}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "naive-child":
        naive_child(json.loads(sys.argv[2]))
    else:
        main()
