"""What the architecture check costs: per CLI call on a tiny merge, and at 70B from headers.

    nice -n 10 .venv/bin/python scripts/bench/verify.py            # ~2 min on 2 busy cores
    nice -n 10 .venv/bin/python scripts/bench/verify.py --rounds 2 # quicker

(a) `star-dist plan` and `star-dist merge --runtime local` on the tiny models (make-tiny, 3
    fine-tunes), each in a fresh process, interleaved in rounds: as shipped with an empty
    architecture cache (cold: plan checks the base against its config.json, building it with
    transformers; merge also checks the output), with a cache filled by an earlier run (warm),
    and with transformers made unimportable in that process (`sys.modules['transformers'] =
    None`), where the check skips itself: star_dist without the check. Medians, wall and CPU
    (user + system) seconds, and each one's difference from the unchecked run.
(b) `verify_folder` on a Llama-3-70B-shaped checkpoint (hidden 8192, intermediate 28672, 80
    layers, 64 heads / 8 KV heads, vocab 128256; `tiny_models.save_sparse_model`: real headers
    over 30 shards, holes for the data), in a child process: the architecture built on the
    meta device and all 723 tensors compared (cold cache). Wall and CPU time, peak RSS.

Writes scripts/bench/results/verify.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _bench import PYTHON, child_env, machine_info, median, write_result  # noqa: E402

BLOCKED = "import sys; sys.modules['transformers'] = None; "
CLI = "from star_dist.cli import main; sys.exit(main({args!r}))"


def _cli_seconds(args: list[str], blocked: bool, cache: Path) -> tuple[float, float]:
    """Wall time and CPU time (user + system, which a busy machine inflates far less) of one
    star-dist call in a fresh process, import time included, as a user sees it."""
    code = (BLOCKED if blocked else "import sys; ") + CLI.format(args=args)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {**child_env(), "STAR_DIST_CACHE": str(cache)}
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"star-dist {' '.join(args)} failed: {proc.stderr.strip()}")
    return elapsed, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def cli_overhead(rounds: int, work: Path) -> dict[str, object]:
    """(a): plan and merge, with and without the check, interleaved."""
    from star_dist.tiny_models import make_tiny_merge

    config = str(make_tiny_merge(work / "tiny", n_models=3, dtype="bfloat16"))
    kinds = ("cold", "warm", "unchecked")  # cold: an empty architecture cache; warm: one filled before
    keys = [f"{cmd}_{kind}_{clock}" for cmd in ("plan", "merge") for kind in kinds for clock in ("wall", "cpu")]
    times: dict[str, list[float]] = {k: [] for k in keys}
    warm = work / "warm_cache"
    _cli_seconds(["plan", config], False, warm)  # fills it
    for r in range(rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            out = str(work / f"out_{r}_{kind}")
            merge = ["merge", config, out, "--runtime", "local", "-q"]
            for cmd, args in (("plan", ["plan", config]), ("merge", merge)):
                cache = warm if kind == "warm" else work / f"cold_{r}_{cmd}"
                wall, cpu = _cli_seconds(args, kind == "unchecked", cache)
                times[f"{cmd}_{kind}_wall"].append(wall)
                times[f"{cmd}_{kind}_cpu"].append(cpu)
    med = {k: median(v) for k, v in times.items()}
    added = {f"{cmd}_{kind}_{clock}": med[f"{cmd}_{kind}_{clock}"] - med[f"{cmd}_unchecked_{clock}"]
             for cmd in ("plan", "merge") for kind in ("cold", "warm") for clock in ("wall", "cpu")}
    return {"seconds": times, "median_seconds": med, "added_seconds_median": added}


def _meta_70b(work: Path) -> dict[str, object]:
    """(b), run in a child: `verify_folder` on a sparse 70B checkpoint (real headers, 30 shards)."""
    from star_dist.tiny_models import LLAMA_70B, save_sparse_model
    from star_dist.verify import verify_folder

    os.environ["STAR_DIST_CACHE"] = str(work / "cache_70b")
    apparent = save_sparse_model(work / "llama70b", LLAMA_70B)
    start = time.perf_counter()
    cpu = time.process_time()
    summary = verify_folder(work / "llama70b").summary()
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "apparent_gb": apparent / 1e9, "summary": summary,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def meta_70b(work: Path) -> dict[str, object]:
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import verify; "
            f"print(json.dumps(verify._meta_70b(verify.Path({str(work)!r}))))")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=child_env(), timeout=600)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp:
        result = {"machine": machine_info(), "cli": cli_overhead(args.rounds, Path(tmp)),
                  "meta_70b": meta_70b(Path(tmp))}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    print(f"wrote {write_result('verify', result)}")


if __name__ == "__main__":
    main()
