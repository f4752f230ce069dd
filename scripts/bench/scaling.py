"""Ray scaling and Ray's fixed cost: the same STAR merge on 1 and 2 workers, and a tiny merge
in-process against Ray.

    nice -n 10 .venv/bin/python scripts/bench/scaling.py            # ~8 min on 2 busy cores
    nice -n 10 .venv/bin/python scripts/bench/scaling.py --quick    # < 1 min smoke run

1. Scaling: generated llama-shaped float32 models (hidden 1024, intermediate 2816, GQA,
   3 fine-tunes), cut into many output shards (`max_shard_size`), merged with STAR through
   `star_dist.merge(runtime="ray", workers=1 | 2, threads_per_worker=1)` on one embedded
   Ray cluster (`ray.init(num_cpus=2)`, started once here; star_dist reuses it). The two
   worker counts alternate within each round (1,2 then 2,1), so slow drift in other people's
   load hits both alike; speedup = median(t1) / median(t2). Only the merge call is timed; it
   includes star_dist creating its worker actors (new processes that import torch).
2. Fixed cost: the default `make_tiny_merge` merged in-process, on Ray with the cluster
   already up, and from scratch through the CLI (`star-dist merge --runtime ray`, which starts
   and stops its own embedded cluster) against the CLI with `--runtime local`.
3. Every output is hashed: 1 worker, 2 workers and in-process must be byte-identical.

Writes scripts/bench/results/scaling.json (every sample, medians, machine, the CPU other
processes used during each timing, per-shard worker seconds). Timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _bench import (  # noqa: E402
    PYTHON,
    CpuLoad,
    OwnCpu,
    child_env,
    machine_info,
    median,
    output_hashes,
    ray_loopback_env,
    star_dist_digest,
    write_result,
)

ray_loopback_env()  # before anything imports ray

import torch  # noqa: E402

import star_dist  # noqa: E402
from star_dist.output import STATE_DIR  # noqa: E402
from star_dist.tiny_models import TinyShape, llama_config, make_base, make_finetune, make_tiny_merge, save_model  # noqa: E402

STAR_CLI = str(Path(PYTHON).with_name("star-dist"))


def make_models(folder: Path, shape: TinyShape, n_models: int) -> dict[str, Any]:
    """base/ and ft0..ft{N-1}/ in float32, and the STAR config (η = 40) over them."""
    base = make_base(shape, seed=0)
    config = llama_config(shape, "float32")
    save_model(folder / "base", base, config, "float32", shards=2)
    for i in range(n_models):
        save_model(folder / f"ft{i}", make_finetune(base, seed=1000 * (i + 1)), config, "float32", shards=2)
    return {
        "merge_method": "star",
        "base_model": str(folder / "base"),
        "models": [{"model": str(folder / f"ft{i}")} for i in range(n_models)],
        "parameters": {"eta": 40},
        "dtype": "float32",
    }


def timed_merge(config: dict[str, Any], out: Path, **options: Any) -> dict[str, Any]:
    """One merge into a fresh folder: wall time, machine load, output hashes, shard timings."""
    shutil.rmtree(out, ignore_errors=True)
    with CpuLoad() as load, OwnCpu() as own:
        start = time.perf_counter()
        result = star_dist.merge(config, out, quiet=True, **options)
        wall = time.perf_counter() - start
    shards = []
    for path in sorted((out / STATE_DIR / "shards").glob("*.json")):
        worker = json.loads(path.read_text())["worker"]
        shards.append({"file": path.stem, "pid": worker["pid"], "seconds": worker["seconds"]})
    busy: dict[int, float] = {}
    for s in shards:
        busy[s["pid"]] = busy.get(s["pid"], 0.0) + s["seconds"]
    workers = options.get("workers") or 1
    return {
        "wall_s": wall,
        "machine_busy_cores": load.busy_cores,
        "own_cores": own.cpu_s / wall,  # this process and its Ray cluster
        "others_cores": max(load.busy_cores - own.cpu_s / wall, 0.0),
        # Σ shard seconds / (workers × wall): 1.0 = every worker merging all the time
        "worker_utilization": sum(s["seconds"] for s in shards) / (workers * wall),
        "shards": sum(name.endswith(".safetensors") for name in result.files),
        "shard_seconds_sum": sum(s["seconds"] for s in shards),
        "worker_busy_s": sorted(busy.values(), reverse=True),
        "hashes": output_hashes(out),
    }


def bench_scaling(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import ray

    shape = TinyShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                      heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab)
    start = time.perf_counter()
    config = make_models(work / "models", shape, args.models)
    gen_s = time.perf_counter() - start
    print(f"generated base + {args.models} fine-tunes ({shape}) in {gen_s:.1f}s", flush=True)

    local = timed_merge(config, work / "out_local", runtime="local", max_shard_size=args.max_shard_size)
    print(f"in-process: {local['wall_s']:.1f}s, {local['shards']} files", flush=True)

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2,
             log_to_driver=False, logging_level="ERROR")
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    try:
        for rnd in range(args.rounds):
            order = (1, 2) if rnd % 2 == 0 else (2, 1)
            for workers in order:
                run = timed_merge(config, work / f"out_w{workers}", runtime="ray", workers=workers,
                                  threads_per_worker=1, max_shard_size=args.max_shard_size)
                run["round"] = rnd
                ref = local["hashes"]
                run["differing_files"] = sorted(k for k in ref if run["hashes"].get(k) != ref[k])
                if run["differing_files"]:  # kept for a look (with --workdir)
                    shutil.move(work / f"out_w{workers}", work / f"mismatch_w{workers}_round{rnd}")
                runs[workers].append(run)
                print(f"round {rnd} workers={workers}: {run['wall_s']:.1f}s (machine busy "
                      f"{run['machine_busy_cores']:.2f} cores, ours {run['own_cores']:.2f}, worker "
                      f"utilization {run['worker_utilization']:.2f})", flush=True)
        tiny = bench_tiny_with_cluster(args, work)
    finally:
        ray.shutdown()
    tiny["cli"] = bench_tiny_cli(args, work)

    reference = local["hashes"]
    identical = all(r["hashes"] == reference for w in runs for r in runs[w])
    t1 = median([r["wall_s"] for r in runs[1]])
    t2 = median([r["wall_s"] for r in runs[2]])
    for w in runs:
        for r in runs[w]:
            del r["hashes"]
    return {
        "shape": vars(shape),
        "n_models": args.models,
        "dtype": "float32",
        "method": "star",
        "eta": 40,
        "max_shard_size": args.max_shard_size,
        "output_files": local["shards"],
        "generate_s": gen_s,
        "local_in_process": {k: v for k, v in local.items() if k != "hashes"},
        "workers_1": runs[1],
        "workers_2": runs[2],
        "median_s": {"workers_1": t1, "workers_2": t2},
        "speedup_2_over_1": t1 / t2,
        "target_speedup": 1.7,
        "cpu_share": {"workers_1": median([r["own_cores"] for r in runs[1]]),
                      "workers_2": median([r["own_cores"] for r in runs[2]])},
        "projected_speedup_idle_machine": projected_idle_speedup(runs[1], runs[2]),
        "byte_identical_local_w1_w2": identical,
        "tiny_merge_overhead": tiny,
    }


def projected_idle_speedup(one: list[dict[str, Any]], two: list[dict[str, Any]]) -> float:
    """An estimate, not a measurement: the speedup if nobody else used the CPU.

    A run's own CPU seconds C = wall × own_cores are the work, whatever share of the machine
    it got. On an idle machine each worker has a core, so wall ≈ (C / workers) / utilization,
    and the speedup ≈ 2 · (C1 / C2) · (u2 / u1), medians over the rounds. It keeps what
    star_dist controls (load balance, actor start, the extra CPU of 2 workers sharing memory
    bandwidth) and removes the CPU taken by other people's jobs.
    """

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return median([r[key] if key != "cpu_s" else r["wall_s"] * r["own_cores"] for r in runs])

    work = med(one, "cpu_s") / med(two, "cpu_s")
    return 2 * work * med(two, "worker_utilization") / med(one, "worker_utilization")


def bench_tiny_with_cluster(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The default tiny merge in-process against Ray (cluster already up), interleaved."""
    yaml_path = make_tiny_merge(work / "tiny")
    config = star_dist.load_config(yaml_path)
    local, on_ray = [], []
    hashes = []
    for _ in range(args.tiny_repeats):
        a = timed_merge(config, work / "tiny_out_local", runtime="local")
        b = timed_merge(config, work / "tiny_out_ray", runtime="ray")
        local.append(a["wall_s"])
        on_ray.append(b["wall_s"])
        hashes += [a["hashes"], b["hashes"]]
    print(f"tiny merge: in-process {median(local):.2f}s, ray (cluster up) {median(on_ray):.2f}s", flush=True)
    return {
        "in_process_s": local,
        "ray_cluster_up_s": on_ray,
        "median_in_process_s": median(local),
        "median_ray_cluster_up_s": median(on_ray),
        "ray_cluster_up_overhead_s": median(on_ray) - median(local),
        "byte_identical_local_ray": all(h == hashes[0] for h in hashes),
    }


def bench_tiny_cli(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`star-dist merge` from scratch: --runtime ray (starts its own cluster) vs --runtime local."""
    yaml_path = work / "tiny" / "merge.yaml"
    times: dict[str, list[float]] = {"local": [], "ray": []}
    hashes = []
    for _ in range(args.cli_repeats):
        for runtime in ("local", "ray"):
            out = work / f"tiny_cli_{runtime}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [STAR_CLI, "merge", str(yaml_path), str(out), "--runtime", runtime, "--quiet"]
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
            times[runtime].append(wall)
            hashes.append(output_hashes(out))
    m_local, m_ray = median(times["local"]), median(times["ray"])
    print(f"tiny merge via CLI: --runtime local {m_local:.2f}s, --runtime ray (new cluster) {m_ray:.2f}s", flush=True)
    return {
        "cli_local_s": times["local"],
        "cli_ray_new_cluster_s": times["ray"],
        "median_cli_local_s": m_local,
        "median_cli_ray_new_cluster_s": m_ray,
        "ray_new_cluster_overhead_s": m_ray - m_local,
        "byte_identical_cli_local_ray": all(h == hashes[0] for h in hashes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models, one round: a < 1 min smoke run")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--models", type=int, default=3, help="fine-tunes to merge")
    parser.add_argument("--max-shard-size", default="12MB", help="output shard size: many shards to share out")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved 1-worker/2-worker rounds")
    parser.add_argument("--tiny-repeats", type=int, default=5)
    parser.add_argument("--cli-repeats", type=int, default=3)
    parser.add_argument("--workdir", help="where to generate models (default: a temporary folder, removed)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab = 256, 704, 2, 1024
        args.heads, args.kv_heads = 8, 2
        args.max_shard_size, args.rounds, args.tiny_repeats, args.cli_repeats = "1MB", 1, 2, 1
    torch.set_num_threads(1)  # the driver computes nothing; workers set their own threads

    work = Path(args.workdir or tempfile.mkdtemp(prefix="star_bench_scaling_"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        machine = machine_info()
        result = bench_scaling(args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "scaling",
        "quick": args.quick,
        "machine": machine,
        "loadavg_at_end": list(os.getloadavg()),
        "star_dist_changed_during_run": star_dist_digest() != machine["star_dist_digest"],
        "total_s": time.perf_counter() - start,
        **result,
    }
    path = write_result("scaling_quick" if args.quick else "scaling", result)
    tiny = result["tiny_merge_overhead"]
    print(
        f"\nSTAR merge, {result['output_files']} files: 1 worker {result['median_s']['workers_1']:.1f}s, "
        f"2 workers {result['median_s']['workers_2']:.1f}s -> speedup x{result['speedup_2_over_1']:.2f} "
        f"(target x1.7) with {result['cpu_share']['workers_1']:.2f} vs {result['cpu_share']['workers_2']:.2f} "
        f"cores for us (projected on an idle machine: x{result['projected_speedup_idle_machine']:.2f}); "
        f"byte-identical (local, 1, 2 workers): {result['byte_identical_local_w1_w2']}\n"
        f"tiny merge: in-process {tiny['median_in_process_s']:.2f}s, Ray with cluster up "
        f"{tiny['median_ray_cluster_up_s']:.2f}s (+{tiny['ray_cluster_up_overhead_s']:.2f}s); CLI local "
        f"{tiny['cli']['median_cli_local_s']:.2f}s, CLI Ray from scratch "
        f"{tiny['cli']['median_cli_ray_new_cluster_s']:.2f}s "
        f"(+{tiny['cli']['ray_new_cluster_overhead_s']:.2f}s)\nwrote {path}"
    )


if __name__ == "__main__":
    main()
