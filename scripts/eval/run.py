"""Regenerate docs/quality.md and its plot from scratch: data, fine-tunes, merges, scores.

    python scripts/eval/run.py --out docs/            # the full benchmark (see README.md)
    python scripts/eval/run.py --smoke --out /tmp/q   # 3 tasks, tiny: the test suite's check
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import report  # noqa: E402
from experiment import Experiment, Preset, log  # noqa: E402
from finetune import FinetuneConfig  # noqa: E402
from tasks import ALL_TASKS, Sizes  # noqa: E402

WORK = Path(__file__).resolve().parent / "work"

FULL = Preset(
    name="full",
    tasks=tuple(ALL_TASKS),
    sizes=Sizes(test=1000, val=100, train=4000, class_cap=1500),
    seeds=(0, 1, 2),
    sweep=(2, 4, len(ALL_TASKS)),
    sweep_methods=("average", "task arithmetic", "TIES", "STAR η=40"),
    full=FinetuneConfig("full", steps=60, batch_size=8, lr=1e-4, max_len=24),
    lora=FinetuneConfig("lora", steps=60, batch_size=8, lr=1e-3, max_len=24),
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
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"),
                        help="where quality.md, quality_sweep.png and quality.json go")
    parser.add_argument("--smoke", action="store_true", help="3 tasks, tiny sizes, 1 seed")
    parser.add_argument("--work", type=Path, default=WORK,
                        help="cache for data, checkpoints and scores (gitignored)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete this preset's cached checkpoints and scores first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    preset = SMOKE if args.smoke else FULL
    if args.fresh:
        shutil.rmtree(args.work / "runs" / preset.name, ignore_errors=True)
    start = time.perf_counter()
    results = Experiment(preset, args.work).run()
    results["wall_seconds"] = time.perf_counter() - start
    command = "python scripts/eval/run.py" + (" --smoke" if args.smoke else "") + f" --out {args.out}"
    path = report.write(results, args.out, command)
    log(f"wrote {path} in {results['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
