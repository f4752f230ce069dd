"""One run per output folder: a second run is refused naming the holder; a dead holder's
lock is taken over, with flock and (where a file system has none) by pid on this host."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import star_dist
from star_dist import lock as lock_module
from star_dist.errors import OutputError
from star_dist.lock import LOCK_FILE, OutputLock

from .conftest import BIN, folder_bytes, run_cli, snapshot


def _merge(config: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("merge", str(config), str(out), "--runtime", "local", "-q")


def test_a_second_run_is_refused_naming_the_holder(tiny_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputLock(out) as held:
        assert held.created_folder
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        before = snapshot(out)
        result = _merge(tiny_fp32 / "merge.yaml", out)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "another star-dist run is writing" in lines[0] and f"pid {os.getpid()}" in lines[0]
        assert snapshot(out) == before
    assert not out.exists(), "the lock removes the folder it created, when left empty"


def test_two_real_runs_at_once_one_wins_and_the_output_is_whole(tiny_fp32: Path, tmp_path: Path) -> None:
    """Started together on one folder: one merges, the other is refused (or, if it starts
    after the first ended, resumes the finished run); never a traceback, never a broken file."""
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    args = [str(BIN / "star-dist"), "merge", str(tiny_fp32 / "merge.yaml"), str(out), "--runtime", "local", "-q",
            "--max-shard-size", "60kB"]
    procs = [subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for code, err in results:
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and "another star-dist run" in err, err
    star_dist.merge(tiny_fp32 / "merge.yaml", tmp_path / "alone", runtime="local", quiet=True, max_shard_size="60kB")
    assert folder_bytes(out) == folder_bytes(tmp_path / "alone")
    assert not (out / LOCK_FILE).exists() and not list(out.glob("*.tmp"))


def test_a_killed_holders_lock_is_taken_over(tiny_fp32: Path, tmp_path: Path) -> None:
    """SIGKILL leaves the lock file; the kernel dropped its flock, so the next run takes it."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from star_dist.lock import OutputLock\n"
         "with OutputLock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"  # type: ignore[union-attr]
    assert _merge(tiny_fp32 / "merge.yaml", out).returncode == 2  # alive: refused
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (out / LOCK_FILE).exists()
    result = _merge(tiny_fp32 / "merge.yaml", out)
    assert result.returncode == 0, result.stderr
    assert not (out / LOCK_FILE).exists()


def test_without_flock_a_dead_pid_on_this_host_is_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system without flock, only the pid can tell: dead on this host is stale;
    alive, or on another host (which cannot be checked), is refused."""
    monkeypatch.setattr(lock_module, "_flock", lambda fd: None)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for host, pid, taken in ((socket.gethostname(), int(dead.stdout), True),
                             (socket.gethostname(), os.getppid(), False),
                             ("another-node", int(dead.stdout), False)):
        (out / LOCK_FILE).write_text(json.dumps({"host": host, "pid": pid, "started": "earlier"}))
        if taken:
            with OutputLock(out):
                assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        else:
            with pytest.raises(OutputError, match=f"pid {pid} on {host}, started earlier"):
                OutputLock(out).__enter__()
    assert (out / LOCK_FILE).exists() and out.is_dir()


def test_an_empty_lock_file_being_written_is_not_stale_at_once(tmp_path: Path) -> None:
    """A lock file with no holder yet is a run that is starting: refused while fresh."""
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text("")
    with pytest.raises(OutputError, match="a run that is starting now"):
        OutputLock(out).__enter__()
    old = time.time() - 60
    os.utime(out / LOCK_FILE, (old, old))
    with OutputLock(out):
        pass
    assert not (out / LOCK_FILE).exists()
