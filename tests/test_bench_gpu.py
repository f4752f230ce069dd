"""scripts/bench/gpu.py is prepared for a GPU machine none of us has: its CPU dry run must work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_cpu_dry_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts/bench/gpu.py"), "--cpu-dry-run", "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu"
    assert report["accuracy"]["gram64_max_abs_err_over_s1"] < report["accuracy"]["svd32_max_abs_err_over_s1"]
    kernel = [row for row in report["kernel"] if "skipped" not in row]
    assert len(kernel) == 12  # 3 shapes × fp32/bf16 × 2 spectra
    assert all(row["kept_rank_star"] == row["kept_rank_reference"] for row in kernel)
    assert all(row["max_rel_diff_vs_naive"] < 1e-4 for row in kernel)
    assert report["upload"]["tensors"] == 8
    assert report["merge"]["max_abs_diff_vs_naive"] < 1e-2  # bf16 outputs: a rounding step at most
