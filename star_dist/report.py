"""What a merged folder says about itself: the model card and merge_report.json."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from .methods import get_method
from .output import package_version, write_atomic
from .planner import MergePlan

STAR_PAPER = "https://aclanthology.org/2025.naacl-short.42/"


def merge_report(plan: MergePlan, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """merge_report.json's content: per tensor, its shard, method, seconds, and for STAR each
    model's kept rank and nuclear norms; with the run's method, parameters, weights and inputs.

    Args:
        plan: the plan that was run.
        manifests: every shard's manifest (their "tensors" and per-tensor "report").
    Returns:
        The report, as JSON-serializable data.
    """
    config = plan.config
    tensors: dict[str, Any] = {}
    for manifest in sorted(manifests, key=lambda m: m["file"]):
        for name in manifest["tensors"]:
            tensors[name] = {"shard": manifest["file"], **manifest["report"][name]}
    return {
        "star_dist_version": package_version(),
        "merge_method": config.merge_method,
        "parameters": dict(config.parameters),
        "weights": list(plan.run.weights),
        "models": [m.model for m in config.models],
        "base_model": config.base_model,
        "fingerprint": plan.fingerprint,
        "tensors": tensors,
    }


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """Write the report as out_dir/merge_report.json, atomically.

    Args:
        out_dir: the output folder.
        report: the report (`merge_report`).
    Raises:
        OutputError: the file cannot be written.
    """
    write_atomic(out_dir / "merge_report.json", (json.dumps(report, indent=1) + "\n").encode())


def card_front_matter(config: Any) -> str:
    """The hub's metadata block: base_model (the hub id, else the folder's name), its relation
    `merge`, library and tags; through huggingface_hub's ModelCardData when it is installed
    (the `hub` extra), else the same keys written by hand."""
    is_hub_id = not Path(config.base_model).exists()
    data = {
        "base_model": config.base_model if is_hub_id else Path(config.base_model).resolve().name,
        "base_model_relation": "merge",
        "library_name": "peft" if config.output_format == "adapter" else "transformers",
        "tags": ["merge", "star_dist", config.merge_method],
    }
    try:
        from huggingface_hub import ModelCardData
    except ImportError:
        return yaml.safe_dump(data, sort_keys=False).strip()
    return ModelCardData(**data).to_yaml().strip()


def model_card(plan: MergePlan, report: dict[str, Any]) -> str:
    """A README.md: front matter for the hub, then method, parameters, inputs, exact config.

    Args:
        plan: the plan that was run (config, output folder).
        report: the merge report (`merge_report`), for the weights, version and STAR's kept ranks.
    Returns:
        The model card, as Markdown text.
    """
    config = plan.config
    method = get_method(config.merge_method, config.method_params())
    lines = [
        "---", *card_front_matter(config).splitlines(), "---",
        *_card_header(plan.out_dir.name, config, method, report["star_dist_version"]),
        *_inputs_section(config, report["weights"]),
        *_parameters_section(config, method),
        *_star_section(report),
        *report_section(plan.out_dir),
        *config_section(config),
    ]
    return "\n".join(lines)


def _card_header(title: str, config: Any, method: Any, version: str) -> list[str]:
    """The title, the tool, method and its reference, and the base model."""
    return [
        "",
        f"# {title}",
        "",
        f"This model was merged with star_dist {version} using **{config.merge_method}**.",
        "",
        f"Method reference: {method.reference or 'see the star_dist README'}.",
        "",
        f"Base model: `{config.base_model}`",
        "",
    ]


def _inputs_section(config: Any, weights: list[float]) -> list[str]:
    """Each merged model with its resolved weight."""
    rows = [f"| {i + 1} | `{m.model}` | {weights[i]:.6g} |" for i, m in enumerate(config.models)]
    return ["## Inputs", "", "| # | model | weight |", "|---|---|---|", *rows, ""]


def _parameters_section(config: Any, method: Any) -> list[str]:
    """The method's parameters with λ, and the computation and output dtypes."""
    params = {**method.params_dict(), "lambda": config.lambda_}
    return [
        "## Parameters",
        "",
        *(f"- `{k}`: {v}" for k, v in params.items()),
        f"- computation dtype: {config.compute_dtype}; output dtype: {config.output_dtype or 'as the base'}",
        "",
    ]


def _star_section(report: dict[str, Any]) -> list[str]:
    """For STAR, the kept ranks in brief (median, min, max); nothing for other methods."""
    ranks = [r for entry in report["tensors"].values() for r in (entry.get("kept_rank") or []) if r is not None]
    if not ranks:
        return []
    return [
        "## STAR truncation",
        "",
        f"{len(ranks)} task-vector matrices truncated; kept rank: median "
        f"{statistics.median(ranks):g}, min {min(ranks)}, max {max(ranks)} "
        "(per tensor in `merge_report.json`). STAR: Lee et al., *STAR: Spectral Truncation "
        f"and Rescale for Model Merging*, NAACL 2025, {STAR_PAPER}",
        "",
    ]


def config_section(config: Any) -> list[str]:
    """The config exactly as the user gave it (their keys, values and paths; flags applied),
    so the card says how to redo the merge; the resolved config when built in Python."""
    written = config.as_written if config.as_written is not None else config.to_dict()
    text = yaml.safe_dump(written, sort_keys=False, allow_unicode=True).rstrip()
    return ["## Configuration", "", "As given to star-dist (paths as written):", "", "```yaml", text, "```", ""]


REPORT_HEADING = "## Merge report"


def report_section(out_dir: Path) -> list[str]:
    """Links to the per-tensor report and, once `star-dist report` has drawn it, its page and plots."""
    from .report_page import REPORT_DIR

    page = out_dir / REPORT_DIR / "index.html"
    numbers = "Per tensor (kept rank, nuclear norms, seconds): [merge_report.json](merge_report.json)."
    lines = [REPORT_HEADING, "", numbers]
    if not page.is_file():
        return [*lines, f"Plots: run `star-dist report {out_dir.name}` to draw them into `{REPORT_DIR}/`.", ""]
    lines.append(f"Plots and a table: [{REPORT_DIR}/index.html]({REPORT_DIR}/index.html).")
    for png in sorted(page.parent.glob("*.png")):
        lines += ["", f"![{png.stem}]({REPORT_DIR}/{png.name})"]
    return [*lines, ""]


def relink_card(out_dir: Path) -> None:
    """Rewrite the card's merge-report section after `star-dist report` (the rest is kept as
    it is, edits included); a card without that section gets it appended."""
    card = out_dir / "README.md"
    text = card.read_text() if card.is_file() else ""
    section = "\n".join(report_section(out_dir))
    start = text.find(REPORT_HEADING)
    if start < 0:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(REPORT_HEADING))
        new = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
    write_atomic(card, new.encode())
