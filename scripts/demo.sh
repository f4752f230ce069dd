#!/usr/bin/env bash
# Set up, make three tiny llama-shaped fine-tunes, and merge them with STAR on a local Ray
# cluster of two workers that star-dist starts (loopback only) and stops. Ray is asked for
# explicitly: `--runtime auto` would merge something this small in-process. Output: ./demo_out
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # keep every Ray port on 127.0.0.1
unset RAY_ADDRESS
bin=.venv/bin
work="${DEMO_WORK:-demo_out/inputs}"
out="${DEMO_OUT:-demo_out/merged}"
rm -rf "$work" "$out"
"$bin/star-dist" make-tiny "$work" --models 3
"$bin/star-dist" plan "$work/merge.yaml" --max-shard-size 200kB
"$bin/star-dist" merge "$work/merge.yaml" "$out" --max-shard-size 200kB --runtime ray --workers 2
"$bin/python" - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
report = json.loads((out / "merge_report.json").read_text())
ranks = [r for t in report["tensors"].values() for r in t.get("kept_rank", []) if r]
print(f"\n{out}: {sorted(p.name for p in out.iterdir() if p.is_file())}")
print(f"STAR kept rank per task matrix: median {statistics.median(ranks)}, min {min(ranks)}, max {max(ranks)}")
PY
