"""Ctrl-C (a real SIGINT) and SIGTERM in the middle of an in-process merge: the run ends
at once, leaves no partial file and no lock, and the same command resumes to the same
bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import star_dist
from star_dist.lock import LOCK_FILE

from .conftest import BIN, folder_bytes

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_merge_then_the_same_command_resumes(medium_models: Path, tmp_path: Path, signum: int) -> None:
    out = tmp_path / "out"
    args = [str(BIN / "star-dist"), "merge", str(medium_models / "merge.yaml"), str(out), "--runtime", "local",
            "--max-shard-size", "1MB", "-q"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    manifests = out / ".star_dist" / "shards"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list(manifests.glob("*.json"))) < 2:
        assert proc.poll() is None, f"the merge ended before the signal: {proc.stderr.read()}"  # type: ignore[union-attr]
        time.sleep(0.02)
    proc.send_signal(signum)
    code = proc.wait(timeout=60)
    err = proc.stderr.read()  # type: ignore[union-attr]
    assert code == 128 + signum, (code, err)
    assert err.strip().splitlines() == ["star-dist: interrupted; rerun the same command to resume"], err
    assert not list(out.rglob("*.tmp")) and not (out / LOCK_FILE).exists()
    assert not (out / "model.safetensors.index.json").exists()

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    star_dist.merge(medium_models / "merge.yaml", tmp_path / "alone", runtime="local", quiet=True, max_shard_size="1MB")
    assert folder_bytes(out) == folder_bytes(tmp_path / "alone")
