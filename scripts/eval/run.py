"""Regenerate docs/quality.md and its plot from scratch: data, fine-tunes, merges, scores.

    python scripts/eval/run.py --out docs/            # the full benchmark (see README.md)
    python scripts/eval/run.py --smoke --out /tmp/q   # 3 tasks, tiny: the test suite's check
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import data  # noqa: E402
import merge_runs as mr  # noqa: E402
import report  # noqa: E402
from experiment import Experiment, Preset, combine, log  # noqa: E402
from finetune import FinetuneConfig  # noqa: E402
from tasks import ALL_TASKS, Sizes, build_tasks  # noqa: E402

WORK = Path(__file__).resolve().parent / "work"

FULL = Preset(
    name="full",
    tasks=tuple(ALL_TASKS),
    sizes=Sizes(test=1000, val=100, train=4000, class_cap=1500),
    seeds=(0, 1, 2),
    sweep=(2, 4, len(ALL_TASKS)),
    sweep_methods=("average", "task arithmetic", "TIES", "STAR η=40", *mr.spectral_labels()),
    full=FinetuneConfig("full", steps=60, batch_size=16, lr=1e-4, max_len=24),
    lora=FinetuneConfig("lora", steps=60, batch_size=16, lr=1e-3, max_len=24),
    max_len=24,
)

SMOKE = Preset(
    name="smoke",
    tasks=("tweet_sentiment", "wordnet_pos", "language_id"),
    sizes=Sizes(test=150, val=60, train=600, class_cap=400),
    seeds=(0,),
    sweep=(3,),
    sweep_methods=(),
    full=FinetuneConfig("full", steps=20, batch_size=8, lr=1e-4, max_len=16),
    lora=FinetuneConfig("lora", steps=20, batch_size=8, lr=1e-3, max_len=16),
    max_len=16,
    ta_lambdas=(0.5,),
    ties_densities=(0.5,),
    ties_lambdas=(1.0,),
    star_etas=(40,),
    alphas=(0.5, 1.0),
    # each spectral method once, and one α tuning. In full fine-tunes their SVDs of the
    # 30522×384 embedding (which LoRA leaves alone) dominate the run: there only Iso-C (α
    # tuned), the one whose merge is a single SVD per matrix, and its λ rescaling.
    spectral=("TSV-M α=1", "Iso-C (α tuned)", "Iso-CTS α=1"),
    spectral_full=("Iso-C (α tuned)",),
)


PRESETS = {"full": FULL, "smoke": SMOKE}
REGIMES = ("full", "lora")


def run_regime(preset: str, work: Path, regime: str, threads: int) -> dict[str, Any]:
    """One regime's experiment (in a worker process when running in parallel)."""
    torch.set_num_threads(threads)
    return Experiment(PRESETS[preset], work, regime).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"),
                        help="where quality.md, quality_sweep.png and quality.json go")
    parser.add_argument("--smoke", action="store_true", help="3 tasks, tiny sizes, 1 seed")
    parser.add_argument("--work", type=Path, default=WORK,
                        help="cache for data, checkpoints and scores (gitignored)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete this preset's cached checkpoints and scores first")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=2,
                        help="2: full FT and LoRA in two processes at once; 1: one after the other")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (1 is fastest on a busy machine: "
                             "OpenMP threads spin when cores are oversubscribed)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite quality.md and the plot from the quality.json already in --out")
    args = parser.parse_args(argv)

    if args.report_only:
        results = json.loads((args.out / "quality.json").read_text())
        smoke = results["preset"]["name"] == "smoke"
        command = "python scripts/eval/run.py" + (" --smoke" if smoke else "") + f" --out {args.out}"
        log(f"wrote {report.write(results, args.out, command)} from {args.out / 'quality.json'}")
        return 0
    preset = SMOKE if args.smoke else FULL
    if args.fresh:
        shutil.rmtree(args.work / "runs" / preset.name, ignore_errors=True)
    start = time.perf_counter()
    data.base_model_dir()
    build_tasks(list(preset.tasks), args.work, preset.sizes)  # fetch + cache before forking
    jobs = [(preset.name, args.work, regime, args.threads) for regime in REGIMES]
    if args.jobs == 1:
        parts = [run_regime(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(run_regime, *zip(*jobs, strict=True)))
    results = combine(parts)
    results["wall_seconds"] = time.perf_counter() - start
    command = "python scripts/eval/run.py" + (" --smoke" if args.smoke else "") + f" --out {args.out}"
    path = report.write(results, args.out, command)
    log(f"wrote {path} in {results['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
