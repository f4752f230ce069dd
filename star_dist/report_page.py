"""`star-dist report OUT`: merge_report.json as an HTML page with PNG plots, linked from the card.

Three plots, from the report alone (no weights are read): STAR's kept rank per layer and
model (median over the layer's matrices), the task vectors' nuclear norm per layer and model
before truncation and after the rescale (equal when STAR kept it, as it should), and each
tensor's merge time. A method without ranks (TIES, task arithmetic) gets the time plot only.
matplotlib is needed (`pip install matplotlib`); the page itself is plain HTML, no scripts.
"""

from __future__ import annotations

import html
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .errors import InputError
from .output import write_atomic

REPORT_JSON = "merge_report.json"
REPORT_DIR = "report"  # inside the output folder: index.html and the PNGs
NON_LAYER = -1  # embeddings, final norm, lm_head: drawn as the first row
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.|(?:^|\.)h\.(\d+)\.|(?:^|\.)blocks?\.(\d+)\.")


def write_report_page(out_dir: Path) -> Path:
    """Render `out_dir/merge_report.json` into `out_dir/report/index.html` and its PNGs.

    Args:
        out_dir: a finished star-dist output folder.

    Returns:
        The path of the HTML page.

    Raises:
        InputError: no readable merge_report.json, or matplotlib is not installed.
    """
    report = read_report(out_dir / REPORT_JSON)
    page_dir = out_dir / REPORT_DIR
    page_dir.mkdir(exist_ok=True)
    plots = [name for name in (_plot_ranks(report, page_dir), _plot_norms(report, page_dir),
                               _plot_times(report, page_dir)) if name]
    page = page_dir / "index.html"
    write_atomic(page, page_html(report, plots).encode())
    return page


def read_report(path: Path) -> dict[str, Any]:
    """The merge report, or one line saying why it cannot be read."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not found; `star-dist report` needs a finished star-dist output folder") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the merge report ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("tensors"), dict):
        raise InputError(f"{path}: not a star-dist merge report (no 'tensors' mapping)")
    return report


def layer_of(name: str) -> int:
    """The layer index in a tensor name (`model.layers.12.mlp...` -> 12); NON_LAYER outside."""
    match = _LAYER.search(name)
    return int(next(g for g in match.groups() if g is not None)) if match else NON_LAYER


def per_layer(report: dict[str, Any], key: str) -> dict[int, list[list[float]]]:
    """For each layer, each model's values of `key` (kept_rank, a norm) over the layer's tensors.

    Args:
        report: the parsed merge_report.json (its "models" and "tensors").
        key: the per-model list to collect from each tensor's entry ("kept_rank", "nuclear_norm_before"...).
    Returns:
        Layer index (NON_LAYER for tensors outside the layers) -> one list of floats per model,
        sorted by layer; tensors without a full per-model list and None values are skipped.
    """
    n_models = len(report.get("models") or [])
    out: dict[int, list[list[float]]] = defaultdict(lambda: [[] for _ in range(n_models)])
    for name, entry in report["tensors"].items():
        values = entry.get(key)
        if isinstance(values, list) and len(values) == n_models:
            for i, v in enumerate(values):
                if v is not None:
                    out[layer_of(name)][i].append(float(v))
    return dict(sorted(out.items()))


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise InputError("star-dist report draws its plots with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _layer_labels(layers: list[int]) -> list[str]:
    return ["other" if layer == NON_LAYER else str(layer) for layer in layers]


def _plot_ranks(report: dict[str, Any], page_dir: Path) -> str:
    """Heatmap: median kept rank, layers down, models across."""
    ranks = per_layer(report, "kept_rank")
    if not ranks:
        return ""
    plt = _pyplot()
    layers = list(ranks)
    grid = [[statistics.median(v) if v else float("nan") for v in ranks[layer]] for layer in layers]
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(grid[0]), 1.5 + 0.25 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="median kept rank")
    ax.set(xlabel="model", ylabel="layer", title="STAR kept rank per layer and model")
    ax.set_xticks(range(len(grid[0])), [str(i + 1) for i in range(len(grid[0]))])
    ax.set_yticks(range(len(layers)), _layer_labels(layers))
    return _save(fig, page_dir, "kept_rank.png")


def _plot_norms(report: dict[str, Any], page_dir: Path) -> str:
    """Per layer and model: the task vectors' nuclear norm before truncation and after rescale."""
    before, after = per_layer(report, "nuclear_norm_before"), per_layer(report, "nuclear_norm_after")
    if not before:
        return ""
    plt = _pyplot()
    layers = list(before)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i in range(len(before[layers[0]])):
        ax.plot(range(len(layers)), [sum(before[layer][i]) for layer in layers], "o-", label=f"model {i + 1}: before")
        ax.plot(range(len(layers)), [sum(after[layer][i]) for layer in layers], "x--", label=f"model {i + 1}: kept")
    ax.set(xlabel="layer", ylabel="nuclear norm (sum over the layer's matrices)",
           title="Nuclear norm of the task vectors: before truncation, kept after rescale")
    ax.set_xticks(range(len(layers)), _layer_labels(layers))
    ax.legend(fontsize="small")
    return _save(fig, page_dir, "nuclear_norm.png")


def _plot_times(report: dict[str, Any], page_dir: Path) -> str:
    """Bar per tensor, in the report's order: where the merge spent its time."""
    seconds = [float(e.get("seconds") or 0.0) for e in report["tensors"].values()]
    if not seconds:
        return ""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(seconds)), seconds, width=1.0)
    title = f"Merge time per tensor (total {sum(seconds):.2f} s)"
    ax.set(xlabel="tensor (report order)", ylabel="seconds", title=title)
    return _save(fig, page_dir, "tensor_seconds.png")


def _save(fig: Any, page_dir: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(page_dir / name, dpi=100)
    plt.close(fig)
    return name


def page_html(report: dict[str, Any], plots: list[str]) -> str:
    """The page: what was merged, the plots, and a per-tensor table; every value HTML-escaped.

    Args:
        report: the parsed merge_report.json.
        plots: the PNG file names to show, relative to the page's folder (empty: no plots).
    Returns:
        The HTML document, as text.
    """
    esc = html.escape
    models = "".join(f"<li>{i + 1}: <code>{esc(str(m))}</code></li>" for i, m in enumerate(report.get("models") or []))
    rows = "".join(
        f"<tr><td><code>{esc(name)}</code></td><td>{esc(str(e.get('kept_rank', '')))}</td>"
        f"<td>{float(e.get('seconds') or 0):.4f}</td></tr>"
        for name, e in report["tensors"].items()
    )
    images = "".join(f'<p><img src="{esc(p)}" alt="{esc(p)}"></p>' for p in plots)
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>star_dist merge report</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td{padding:0 1em}</style></head><body>"
        f"<h1>Merge report</h1><p>Method <b>{esc(str(report.get('merge_method')))}</b>, parameters "
        f"<code>{esc(json.dumps(report.get('parameters')))}</code>, weights "
        f"<code>{esc(json.dumps(report.get('weights')))}</code>, star_dist {esc(str(report.get('star_dist_version')))}."
        f"</p><p>Base: <code>{esc(str(report.get('base_model')))}</code></p><ol>{models}</ol>{images}"
        f"<h2>Per tensor</h2><table><tr><th>tensor</th><th>kept rank per model</th><th>seconds</th></tr>{rows}"
        "</table></body></html>\n"
    )
