"""Peak memory of TSV-M, Iso-C and Iso-CTS against the number of models, beside the plan's estimate.

    nice -n 10 .venv/bin/python scripts/bench/memory_family.py           # ~3 min on 2 busy cores
    nice -n 10 .venv/bin/python scripts/bench/memory_family.py --quick   # < 1 min smoke run

Same protocol as memory.py (whose pieces it reuses): one float32 matrix (4096×1024 = 16 MiB
by default: every one of these methods runs a full float64 SVD per model, so the matrix is
smaller than memory.py's) plus a norm vector, N = 2, 4, 8 fine-tunes, each merge in its own
child process on 1 thread, RssAnon sampled every 2 ms with MALLOC_MMAP_THRESHOLD_=1 MiB.
Expected: flat in N (a fold holds a sum, or TSV-M's N·⌊k/N⌋ ≤ k singular vector pairs, never
N task vectors), and below the plan's estimate. Writes scripts/bench/results/memory_family.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory  # noqa: E402
from _bench import PINNED_MALLOC_ENV, machine_info, star_dist_digest, write_result  # noqa: E402

FAMILY = {"tsv": {}, "iso_c": {}, "iso_cts": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024×256, N = 2, 4: a < 1 min smoke run")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.cols, args.n = 1024, 256, [2, 4]
    memory.METHODS.update(FAMILY)  # memory.merge_config reads the parameters from there
    machine, start = machine_info(), time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="star_bench_memory_family_"))
    tensor_bytes = args.rows * args.cols * 4
    runs: list[dict[str, Any]] = []
    try:
        memory.make_models(work, args.rows, args.cols, max(args.n))
        for method in FAMILY:
            for n in args.n:
                runs += memory.measure(work, method, n, "mmap_threshold_1MiB", PINNED_MALLOC_ENV, args.repeats,
                                       tensor_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {m: memory.summarize(runs, "mmap_threshold_1MiB", m, args.n, tensor_bytes) for m in FAMILY}
    result = {
        "benchmark": "memory_family", "quick": args.quick, "machine": machine,
        "loadavg_at_end": list(os.getloadavg()),
        "star_dist_changed_during_run": star_dist_digest() != machine["star_dist_digest"],
        "total_s": time.perf_counter() - start, "tensor_shape": [args.rows, args.cols],
        "tensor_bytes": tensor_bytes, "runtime": "local", "threads": 1,
        "memory_method": "as memory.py: RssAnon of the merging child sampled every 2 ms, minus its RssAnon "
                         "after imports, MALLOC_MMAP_THRESHOLD_=1048576",
        "summary": summary, "runs": runs,
    }
    path = write_result("memory_family_quick" if args.quick else "memory_family", result)
    for method, row in summary.items():
        print(f"{method:8s} N={row['n_models']}: peak above baseline {row['peak_above_baseline_mib']} MiB = "
              f"{row['peak_above_baseline_tensor_copies']} tensor copies (plan {row['plan_estimate_mib']} MiB)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
