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


def test_gpu_bench_skips_a_section_that_would_not_fit() -> None:
    """After the kernel rows, a section predicts its time from their seconds per element and
    records why it was skipped, instead of running past the machine's limit."""
    import torch

    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    import gpu

    rates = gpu.seconds_per_element([{"shape": [8192, 8192], "naive_s": 20.0, "star_s": 2.0},
                                     {"shape": [4096, 4096], "skipped": "predicted 99s"}])
    assert rates == {"naive": 20.0 / 8192**2, "star": 2.0 / 8192**2}
    cpu, short = torch.device("cpu"), gpu.Budget(5.0)  # upload predicts 28 s, the merge minutes
    assert gpu.bench_merge(cpu, False, short, rates)["skipped"].startswith("predicted ")
    assert gpu.bench_upload(cpu, False, short, rates)["skipped"].startswith("predicted ")
    assert "skipped" in gpu.bench_merge(cpu, False, gpu.Budget(1e6), None)  # no kernel row ran: no prediction
