"""Peak memory against the number of models: STAR and task arithmetic stream, TIES is bounded.

    nice -n 10 .venv/bin/python scripts/bench/memory.py            # ~5 min on 2 busy cores
    nice -n 10 .venv/bin/python scripts/bench/memory.py --quick    # < 1 min smoke run

A model made of one big float32 matrix (16384×1024 = 64 MiB by default, shaped like an
embedding table: as many bytes as a 4096×4096 matrix, but its SVD is cheap enough to run
14 STARs in a few minutes on one thread) plus a norm vector; N = 2, 4, 8 fine-tunes of it.
Each (method, N) merge runs in its own child process (`star_dist.merge(runtime="local")`,
1 thread), measured from outside (see _bench.py):

* `peak_rss_anon`: the highest anonymous resident memory, sampled every 2 ms from
  /proc/<pid>/status. This is what the merge allocates (tensors, LAPACK workspace, the
  Python heap). The figure to read is the peak *above the baseline* (RssAnon after
  importing torch and star_dist, just before the merge).
* `vm_hwm` and `ru_maxrss`: the kernel's high-water mark of the whole RSS. star_dist reads
  inputs through private memory maps, so every input page it touches is resident as a
  *file-backed* page (page cache, reclaimable, shared) and counts here: this grows with N
  by construction (N × 64 MiB of inputs read) even though the merge holds none of it.

Expected: STAR and task arithmetic hold the base, the accumulator and one task vector (plus
STAR's SVD workspace), whatever N; TIES holds row blocks of all N task vectors sized to about
two copies of the tensor in total. Also recorded: the plan's own estimate (`star-dist plan`).
Writes scripts/bench/results/memory.json.
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
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from _bench import MIB, machine_info, run_merge_child, write_result  # noqa: E402

import star_dist  # noqa: E402
from star_dist.tiny_models import make_finetune, save_model  # noqa: E402

METHODS = {"star": {"eta": 40}, "task_arithmetic": {}, "ties": {"density": 0.2}}


def make_models(folder: Path, rows: int, cols: int, n_models: int) -> None:
    """base/ and ft0..ft{N-1}/: one (rows, cols) float32 matrix and a (cols,) norm each."""
    gen = torch.Generator().manual_seed(0)
    base = {
        "model.embed_tokens.weight": torch.randn(rows, cols, generator=gen) / cols**0.5,  # (rows, cols)
        "model.norm.weight": torch.ones(cols) + 0.01 * torch.randn(cols, generator=gen),  # (cols,)
    }
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32"}
    save_model(folder / "base", base, config, "float32")
    for i in range(n_models):
        save_model(folder / f"ft{i}", make_finetune(base, seed=1000 * (i + 1)), config, "float32")


def merge_config(folder: Path, method: str, n_models: int) -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": str(folder / "base"),
        "models": [{"model": str(folder / f"ft{i}")} for i in range(n_models)],
        "parameters": METHODS[method],
        "dtype": "float32",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2048×512 matrix, N = 2, 4: a < 1 min smoke run")
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4, 8], help="numbers of fine-tunes")
    parser.add_argument("--repeats", type=int, default=2, help="merges per (method, N); the peak is their max")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--workdir", help="where to generate models (default: a temporary folder, removed)")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.cols, args.n, args.repeats = 2048, 512, [2, 4], 1
    machine = machine_info()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="star_bench_memory_"))
    start = time.perf_counter()
    tensor_bytes = args.rows * args.cols * 4
    runs: list[dict[str, Any]] = []
    try:
        make_models(work, args.rows, args.cols, max(args.n))
        print(f"one {args.rows}x{args.cols} float32 tensor ({tensor_bytes / MIB:.0f} MiB) per model", flush=True)
        for method in args.methods:
            for n in args.n:
                config = merge_config(work, method, n)
                out = work / f"out_{method}_{n}"
                estimate = star_dist.plan(config, out).peak_memory_per_worker
                for repeat in range(args.repeats):
                    run = run_merge_child({"config": config, "out": str(out)})
                    shutil.rmtree(out, ignore_errors=True)
                    row = {"method": method, "n_models": n, "repeat": repeat, "plan_estimate_bytes": estimate, **run}
                    row["peak_above_baseline_in_tensor_copies"] = row["peak_rss_anon_above_baseline"] / tensor_bytes
                    runs.append(row)
                    print(f"{method:16s} N={n}: peak RssAnon +{row['peak_rss_anon_above_baseline'] / MIB:6.0f} MiB "
                          f"({row['peak_above_baseline_in_tensor_copies']:.1f} tensor copies; plan estimate "
                          f"{estimate / MIB:.0f} MiB), VmHWM {row['vm_hwm'] / MIB:6.0f} MiB, "
                          f"{row['merge_wall_s']:.1f}s", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for method in args.methods:
        # The sampled peak is a lower bound of the true one: the largest of the repeats.
        peaks = [max(r["peak_rss_anon_above_baseline"] for r in runs if r["method"] == method and r["n_models"] == n)
                 for n in args.n]
        hwm = [max(r["vm_hwm"] for r in runs if r["method"] == method and r["n_models"] == n) for n in args.n]
        summary[method] = {
            "n_models": list(args.n),
            "peak_above_baseline_mib": [round(p / MIB, 1) for p in peaks],
            "peak_above_baseline_tensor_copies": [round(p / tensor_bytes, 2) for p in peaks],
            "growth_largest_n_over_smallest_n": peaks[-1] / max(peaks[0], 1),
            "vm_hwm_mib": [round(h / MIB, 1) for h in hwm],
        }
    result = {
        "benchmark": "memory",
        "quick": args.quick,
        "machine": machine,
        "loadavg_at_end": list(os.getloadavg()),
        "total_s": time.perf_counter() - start,
        "tensor_shape": [args.rows, args.cols],
        "tensor_bytes": tensor_bytes,
        "runtime": "local",
        "threads": 1,
        "memory_method": "RssAnon of the merging child process sampled every 2 ms from /proc/<pid>/status, "
                         "minus its RssAnon after imports; VmHWM and ru_maxrss also count the file-backed "
                         "pages of the memory-mapped inputs, which grow with N by construction",
        "summary": summary,
        "runs": runs,
    }
    path = write_result("memory_quick" if args.quick else "memory", result)
    print()
    for method, s in summary.items():
        print(f"{method:16s} N={s['n_models']}: peak above baseline {s['peak_above_baseline_mib']} MiB "
              f"(x{s['growth_largest_n_over_smallest_n']:.2f} from N={s['n_models'][0]} to "
              f"{s['n_models'][-1]}); VmHWM {s['vm_hwm_mib']} MiB")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
