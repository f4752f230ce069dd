"""Peak memory against the number of models: STAR and task arithmetic stream, TIES is bounded.

    nice -n 10 .venv/bin/python scripts/bench/memory.py            # ~7 min on 2 busy cores
    nice -n 10 .venv/bin/python scripts/bench/memory.py --quick    # < 1 min smoke run

A model made of one big float32 matrix (16384×1024 = 64 MiB by default, shaped like an
embedding table: as many bytes as a 4096×4096 matrix, but its SVD is cheap enough to run
14 STARs in a few minutes on one thread) plus a norm vector; N = 2, 4, 8 fine-tunes of it.
Each (method, N) merge runs `--repeats` times (default 2), each in its own child process
(`star_dist.merge(runtime="local")`, 1 thread), measured from outside (see _bench.py), under
two malloc settings: `mmap_threshold_1MiB` (MALLOC_MMAP_THRESHOLD_=1048576: every freed
tensor goes back to the kernel at once, so RssAnon is what the merge holds) and
`glibc_default` (as users run it: glibc keeps some freed blocks below its self-adjusting
mmap threshold, up to 32 MiB each, in its heap, which adds up to a tensor copy or two).

* `peak_rss_anon`: the highest anonymous resident memory, sampled every 2 ms from
  /proc/<pid>/status. This is what the merge allocates (tensors, LAPACK workspace, the
  Python heap). The figure to read is the peak *above the baseline* (RssAnon after
  importing torch and star_dist, just before the merge). Sampling can miss a short spike, so
  the summary keeps the largest of the repeats.
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
from _bench import MIB, PINNED_MALLOC_ENV, machine_info, run_merge_child, star_dist_digest, write_result  # noqa: E402

import star_dist  # noqa: E402
from star_dist.tiny_models import make_finetune, save_model  # noqa: E402

METHODS = {"star": {"eta": 40}, "task_arithmetic": {}, "ties": {"density": 0.2}}
# What the merge holds (freed tensors go back to the kernel at once), and what a user sees.
ALLOCATORS = {"mmap_threshold_1MiB": PINNED_MALLOC_ENV, "glibc_default": {}}


def make_models(folder: Path, rows: int, cols: int, n_models: int) -> None:
    """base/ and ft0..ft{N-1}/: one (rows, cols) float32 matrix and a (cols,) norm each."""
    gen = torch.Generator().manual_seed(0)
    base = {
        "model.embed_tokens.weight": torch.randn(rows, cols, generator=gen) / cols**0.5,  # (rows, cols)
        "model.norm.weight": torch.ones(cols) + 0.01 * torch.randn(cols, generator=gen),  # (cols,)
    }
    # A real llama config for exactly these tensors (no layers, tied head), so the plan's
    # architecture check accepts them; its defaults would describe a 7B model.
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
              "vocab_size": rows, "hidden_size": cols, "intermediate_size": 4 * cols, "num_hidden_layers": 0,
              "num_attention_heads": max(1, cols // 128), "tie_word_embeddings": True}
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


def measure(
    work: Path, method: str, n: int, allocator: str, env: dict[str, str], repeats: int, tensor_bytes: int
) -> list[dict[str, Any]]:
    """`repeats` merges of N fine-tunes with one method, each in a fresh child process."""
    config = merge_config(work, method, n)
    out = work / f"out_{method}_{n}"
    estimate = star_dist.plan(config, out).peak_memory_per_worker
    rows = []
    for repeat in range(repeats):
        run = run_merge_child({"config": config, "out": str(out)}, env=env)
        shutil.rmtree(out, ignore_errors=True)
        row = {"allocator": allocator, "method": method, "n_models": n, "repeat": repeat,
               "plan_estimate_bytes": estimate, **run}
        row["peak_above_baseline_in_tensor_copies"] = row["peak_rss_anon_above_baseline"] / tensor_bytes
        rows.append(row)
        print(f"[{allocator}] {method:16s} N={n}: peak RssAnon +{row['peak_rss_anon_above_baseline'] / MIB:4.0f} MiB "
              f"({row['peak_above_baseline_in_tensor_copies']:.1f} tensor copies; plan estimate "
              f"{estimate / MIB:.0f} MiB), VmHWM {row['vm_hwm'] / MIB:5.0f} MiB, {row['merge_wall_s']:.1f}s",
              flush=True)
    return rows


def summarize(runs: list[dict[str, Any]], allocator: str, method: str, ns: list[int], tensor_bytes: int) -> dict:
    """Per N, the largest sampled peak of the repeats (each is a lower bound of the true one)."""

    def largest(key: str, n: int) -> int:
        return max(r[key] for r in runs if (r["allocator"], r["method"], r["n_models"]) == (allocator, method, n))

    peaks = [largest("peak_rss_anon_above_baseline", n) for n in ns]
    return {
        "n_models": list(ns),
        "peak_above_baseline_mib": [round(p / MIB, 1) for p in peaks],
        "peak_above_baseline_tensor_copies": [round(p / tensor_bytes, 2) for p in peaks],
        "growth_largest_n_over_smallest_n": peaks[-1] / max(peaks[0], 1),
        "plan_estimate_mib": [round(largest("plan_estimate_bytes", n) / MIB, 1) for n in ns],
        "vm_hwm_mib": [round(largest("vm_hwm", n) / MIB, 1) for n in ns],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2048×512, N = 2, 4, pinned malloc: a < 1 min smoke run")
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4, 8], help="numbers of fine-tunes")
    parser.add_argument("--repeats", type=int, default=2, help="merges per (method, N); the peak is their max")
    parser.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=list(ALLOCATORS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--workdir", help="where to generate models (default: a temporary folder, removed)")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.cols, args.n, args.repeats = 2048, 512, [2, 4], 1
        args.allocators = ["mmap_threshold_1MiB"]
    machine = machine_info()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="star_bench_memory_"))
    start = time.perf_counter()
    tensor_bytes = args.rows * args.cols * 4
    runs: list[dict[str, Any]] = []
    try:
        make_models(work, args.rows, args.cols, max(args.n))
        print(f"one {args.rows}x{args.cols} float32 tensor ({tensor_bytes / MIB:.0f} MiB) per model", flush=True)
        for allocator in args.allocators:
            env = ALLOCATORS[allocator]
            for method in args.methods:
                for n in args.n:
                    runs += measure(work, method, n, allocator, env, args.repeats, tensor_bytes)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    summary = {a: {m: summarize(runs, a, m, args.n, tensor_bytes) for m in args.methods} for a in args.allocators}
    result = {
        "benchmark": "memory",
        "quick": args.quick,
        "machine": machine,
        "loadavg_at_end": list(os.getloadavg()),
        "star_dist_changed_during_run": star_dist_digest() != machine["star_dist_digest"],
        "total_s": time.perf_counter() - start,
        "tensor_shape": [args.rows, args.cols],
        "tensor_bytes": tensor_bytes,
        "runtime": "local",
        "threads": 1,
        "memory_method": "RssAnon of the merging child process sampled every 2 ms from /proc/<pid>/status, "
                         "minus its RssAnon after imports; VmHWM and ru_maxrss also count the file-backed "
                         "pages of the memory-mapped inputs, which grow with N by construction. "
                         "mmap_threshold_1MiB: MALLOC_MMAP_THRESHOLD_=1048576, so freed tensors leave RssAnon "
                         "at once (what the merge holds); glibc_default: as a user runs it (plus allocator slack)",
        "summary": summary,
        "runs": runs,
    }
    path = write_result("memory_quick" if args.quick else "memory", result)
    print()
    for allocator, per_method in summary.items():
        for method, row in per_method.items():
            print(f"[{allocator}] {method:16s} N={row['n_models']}: peak above baseline "
                  f"{row['peak_above_baseline_mib']} MiB = {row['peak_above_baseline_tensor_copies']} tensor copies "
                  f"(plan estimate {row['plan_estimate_mib']}); VmHWM {row['vm_hwm_mib']} MiB")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
