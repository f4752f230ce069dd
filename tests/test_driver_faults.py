"""A driver killed with SIGKILL mid-run, then the same command again; and `ray job submit`
against a local loopback head that the test starts and stops."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from safetensors import safe_open

import star_dist
from star_dist.safetensors_format import sha256_file

from .conftest import BIN, folder_bytes, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_killed_driver_leaves_no_partial_file_and_rerun_resumes(medium_models: Path, tmp_path: Path) -> None:
    config = medium_models / "merge.yaml"
    args = ["merge", str(config), str(tmp_path / "out"), "--workers", "1", "--max-shard-size", "1MB", "--quiet"]
    star_dist.merge(config, tmp_path / "local", runtime="local", quiet=True, max_shard_size="1MB")
    expected = folder_bytes(tmp_path / "local")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([str(BIN / "star-dist"), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    manifests = tmp_path / "out" / ".star_dist" / "shards"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list(manifests.glob("*.json"))) < 2:
        assert proc.poll() is None, "the merge ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait(timeout=30)
    done = {p.name.removesuffix(".json") for p in manifests.glob("*.json")}
    assert 0 < len(done) < len(expected), "kill did not land mid-run"
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    for shard in (tmp_path / "out").glob("model-*.safetensors"):  # final names: complete files only
        with safe_open(str(shard), framework="pt") as fh:
            assert fh.keys()
        if shard.name in done:
            manifest = json.loads((manifests / f"{shard.name}.json").read_text())
            assert manifest["sha256"] == sha256_file(shard)
    result = run_cli(*args[:-1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed" in result.stdout
    assert folder_bytes(tmp_path / "out") == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"port {port} never opened")


# The README's `ray job submit` line, run exactly as written (but for the dashboard port) from
# the folder that holds merge.yaml, as the README says; keep the two identical.
README_SUBMIT = ('ray job submit --address http://127.0.0.1:8265 -- '
                 'star-dist merge "$PWD/merge.yaml" "$PWD/out" --address auto')


def test_the_readme_shows_the_submit_line_this_test_runs() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert README_SUBMIT in readme


def test_ray_job_submit_against_a_local_head(tiny_fp32: Path, tmp_path: Path) -> None:
    """The head runs from its own directory, as a real cluster's does: the job's working
    directory is the head's, so the README passes absolute paths ("$PWD/...") from the
    submitter's folder; a relative config path fails with one line saying where it looked."""
    expected = folder_bytes(star_dist.merge(tiny_fp32 / "merge.yaml", tmp_path / "local", quiet=True).out_dir)
    work, head_dir = tmp_path / "work", tmp_path / "head"
    shutil.copytree(tiny_fp32, work)
    head_dir.mkdir()
    gcs_port, dashboard_port = _free_port(), _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": ray_tmp,
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={_free_port()}",
         f"--temp-dir={ray_tmp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=head_dir,
    )
    try:
        _wait_for_port(dashboard_port, 120)
        readme_line = README_SUBMIT.replace("8265", str(dashboard_port))
        # The head's job agent can lag its dashboard by a few seconds. (It never came up while
        # the session's other Ray cluster held the agent's default port 52365: hence the free
        # --dashboard-agent-listen-port above.)
        deadline = time.monotonic() + 60
        while True:
            submit = subprocess.run(["bash", "-c", readme_line], env=env, capture_output=True, text=True,
                                    timeout=300, cwd=work)
            if "No available agent to submit job" not in submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout.lower()
        assert folder_bytes(work / "out") == expected
        # `--address auto` from a shell that knows nothing of the head's --temp-dir (no
        # RAY_TMPDIR, no RAY_ADDRESS) still finds it, through its running GCS process; when
        # another cluster runs here too (the test session's own), it refuses to pick one. It
        # runs while the next job is submitted: both only use the head.
        from star_dist.runtime.ray_cluster import _recorded_clusters, _running_gcs_addresses

        shell_env = {k: v for k, v in env.items() if k != "RAY_TMPDIR"}
        others = set(_running_gcs_addresses()) - {f"127.0.0.1:{gcs_port}"}
        assert not _recorded_clusters() or others, "a recorded cluster here would make --address auto join it"
        joined = subprocess.Popen(
            [str(BIN / "star-dist"), "merge", str(tiny_fp32 / "merge.yaml"), str(tmp_path / "joined"),
             "--address", "auto", "--quiet"],
            env=shell_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            relative = subprocess.run(
                ["bash", "-c", readme_line.replace('"$PWD/merge.yaml" "$PWD/out"', "merge.yaml out")],
                env=env, capture_output=True, text=True, timeout=300, cwd=work)
            _, joined_stderr = joined.communicate(timeout=300)
        finally:
            if joined.poll() is None:
                joined.kill()
                joined.wait()
        assert relative.returncode != 0
        assert f"merge.yaml: cannot read the config (No such file or directory; looked in {head_dir})" in (
            relative.stdout + relative.stderr)
        if others:
            assert joined.returncode == 2 and "Ray clusters run here" in joined_stderr, joined_stderr[-3000:]
            assert f"127.0.0.1:{gcs_port}" in joined_stderr and not (tmp_path / "joined").exists()
        else:
            assert joined.returncode == 0, joined_stderr[-3000:]
            assert folder_bytes(tmp_path / "joined") == expected
            clusters = {json.loads(p.read_text())["worker"]["cluster"]
                        for p in (tmp_path / "joined" / ".star_dist" / "shards").glob("*.json")}
            assert clusters == {f"127.0.0.1:{gcs_port}"}, clusters  # this head's workers merged it
        # With that head recorded as this machine's current cluster, the embedded default
        # must still start a cluster of its own rather than join (or fail on) the head.
        embedded = subprocess.run(
            [str(BIN / "star-dist"), "merge", str(tiny_fp32 / "merge.yaml"), str(tmp_path / "embedded"), "--quiet",
             "--runtime", "ray"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert embedded.returncode == 0, embedded.stderr[-3000:]
        assert folder_bytes(tmp_path / "embedded") == expected
    finally:
        # SIGTERM to `ray start --block` alone: it drains the node through its GCS, then stops
        # what it started (~2 s). Sent to the whole group, the GCS dies first and the drain
        # waits out its 30 s timeout. Whatever is left of the group then goes with SIGKILL.
        head.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
