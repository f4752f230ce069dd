"""`--runtime auto` against forcing Ray or in-process, on the tiny demo merge, through the CLI.

A tiny merge is where the old default (always start an embedded Ray cluster) hurt most:
the work takes a second, Ray's start-up ten. Runs the three interleaved, `--rounds` times,
records the medians, what auto chose and why, the machine's load, and checks that all
three wrote the same bytes.

    .venv/bin/python scripts/bench/runtime_auto.py [--rounds 3]   # -> results/runtime_auto.json
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import CpuLoad, child_env, machine_info, median, output_hashes, write_result  # noqa: E402

STAR_DIST = Path(sys.executable).parent / "star-dist"
MODES = {"auto (default)": [], "ray": ["--runtime", "ray"], "local": ["--runtime", "local"]}


def timed(config: Path, out: Path, extra: list[str]) -> tuple[float, str]:
    """Wall seconds of one `star-dist merge` (a fresh output folder), and its runtime line."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([str(STAR_DIST), "merge", str(config), str(out), *extra], capture_output=True, text=True,
                          env=child_env(), check=True)
    seconds = time.perf_counter() - start
    line = next((x for x in done.stdout.splitlines() if x.startswith("runtime ")), "")
    return seconds, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_auto_"))
    subprocess.run([str(STAR_DIST), "make-tiny", str(work / "in")], check=True, capture_output=True, env=child_env())
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    lines, hashes = {}, {}
    with CpuLoad() as load:
        for rnd in range(args.rounds):
            order = list(MODES) if rnd % 2 == 0 else list(reversed(MODES))
            for mode in order:
                seconds, lines[mode] = timed(work / "in" / "merge.yaml", work / mode.split()[0], MODES[mode])
                times[mode].append(round(seconds, 2))
                hashes[mode] = output_hashes(work / mode.split()[0])
    result = {
        "what": "star-dist merge of the make-tiny demo (3 bf16 fine-tunes, 21 tensors), wall seconds per mode",
        "rounds": times,
        "median_s": {mode: median(v) for mode, v in times.items()},
        "runtime_line": lines,
        "same_bytes": len({tuple(sorted(h.items())) for h in hashes.values()}) == 1,
        "busy_cores_during": round(load.busy_cores, 2),
        "machine": machine_info(),
    }
    print(write_result("runtime_auto", result))
    print(result["median_s"], result["runtime_line"]["auto (default)"], "same bytes:", result["same_bytes"])
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
