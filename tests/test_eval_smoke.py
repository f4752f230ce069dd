"""The quality benchmark end to end, tiny: 3 real tasks, real fine-tunes, star_dist merges.

Runs ``scripts/eval/run.py --smoke`` exactly as a user would, then checks the numbers it
wrote: fine-tuning must beat the pretrained encoder on its own task, and every merged model
must beat the majority-class rate on every merged task. Everything it writes (the data
packages it unpacks, checkpoints, scores, the report) goes under the test's temp folder, so
the suite leaves nothing in the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_eval_smoke(tmp_path: Path) -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("the quality data comes partly from Debian packages: needs apt-get and dpkg-deb")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "eval" / "run.py"), "--smoke", "--fresh",
         "--out", str(tmp_path), "--work", str(tmp_path / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "quality.json").read_text())
    assert (tmp_path / "quality.md").read_text().startswith("# Merge quality")
    assert (tmp_path / "quality_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    tasks = results["tasks"]
    assert len(tasks) == 3
    for regime in ("full", "lora"):
        for name, accs in results["finetuned"][regime].items():
            for acc in accs:
                assert acc > results["pretrained"][name], (regime, name, acc)

    merged = [r for r in results["rows"] if r["method"] != "pretrained"]
    methods = {r["method"] for r in merged}
    assert {"average", "task arithmetic", "TIES"} <= methods
    assert any(m.startswith("STAR") for m in methods)
    assert {"TSV-M α=1", "Iso-C (α tuned)", "Iso-CTS α=1"} <= methods  # each spectral method once
    assert {r["regime"] for r in merged} == {"full", "lora"}
    for row in merged:
        assert set(row["test_acc"]) == set(tasks)
        for name, acc in row["test_acc"].items():
            assert acc > tasks[name]["majority"], (row["regime"], row["method"], name, acc)
