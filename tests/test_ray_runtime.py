"""The Ray runtime on a real local loopback cluster: same bytes with any number of workers,
a worker that dies mid-shard, fake GPU slots, and an unreachable cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import star_dist
from star_dist.config import RunOptions
from star_dist.errors import ClusterError
from star_dist.runtime.ray import CRASH_ONCE_ENV, pool_shape

from .conftest import folder_bytes, run_cli, snapshot

pytestmark = pytest.mark.ray


def _local_reference(config: Path, out: Path, **kw) -> dict[str, bytes]:
    star_dist.merge(config, out, runtime="local", quiet=True, max_shard_size="60kB", **kw)
    return folder_bytes(out)


def test_same_bytes_with_1_2_4_workers_as_in_process(ray_cluster, tiny_fp32: Path, tmp_path: Path) -> None:
    config = tiny_fp32 / "merge.yaml"
    expected = _local_reference(config, tmp_path / "local")
    assert len(expected) >= 3
    for workers in (1, 2, 4):
        out = tmp_path / f"ray{workers}"
        result = star_dist.merge(config, out, runtime="ray", workers=workers, quiet=True, max_shard_size="60kB")
        assert folder_bytes(out) == expected, f"{workers} workers"
        assert result.shards_total == len(expected)
        manifests = [json.loads(p.read_text()) for p in (out / ".star_dist" / "shards").glob("*.json")]
        assert len({m["worker"]["worker"] for m in manifests}) <= workers


def test_a_worker_dying_mid_shard_is_replaced(
    ray_cluster, tiny_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _local_reference(tiny_fp32 / "merge.yaml", tmp_path / "local")
    marker = tmp_path / "crashed.pid"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))
    out = tmp_path / "ray"
    star_dist.merge(tiny_fp32 / "merge.yaml", out, runtime="ray", workers=2, quiet=True, max_shard_size="60kB")
    assert marker.exists(), "the fault was never injected"
    crashed_pid = int(marker.read_text())
    assert folder_bytes(out) == expected
    pids = {json.loads(p.read_text())["worker"]["pid"] for p in (out / ".star_dist" / "shards").glob("*.json")}
    assert crashed_pid not in pids


def test_pool_shape_uses_one_actor_per_gpu() -> None:
    gpu = pool_shape({"CPU": 16, "GPU": 4}, RunOptions(device="auto"), n_jobs=10)
    assert (gpu.workers, gpu.num_gpus) == (4, 1.0)
    assert pool_shape({"CPU": 16, "GPU": 4}, RunOptions(device="cpu", threads_per_worker=4), 10).workers == 4
    assert pool_shape({"CPU": 16, "GPU": 4}, RunOptions(device="cpu"), n_jobs=3).workers == 3
    squeezed = pool_shape({"CPU": 2}, RunOptions(workers=4), n_jobs=10)
    assert squeezed.workers == 4 and squeezed.num_cpus == 0.5
    later = pool_shape({"CPU": 2}, RunOptions(device="cuda", workers=8), n_jobs=20)
    assert (later.workers, later.num_gpus) == (8, 1.0)
    with pytest.raises(ClusterError, match="no GPUs"):
        pool_shape({"CPU": 2}, RunOptions(device="cuda"), n_jobs=3)


def test_fake_gpu_slots_get_one_actor_each(tiny_fp32: Path, tmp_path: Path) -> None:
    """A cluster with 2 fake GPU slots: 2 actors, each holding its own GPU id (computing on
    the CPU, since no CUDA device exists here), and the same bytes as in-process."""
    expected = _local_reference(tiny_fp32 / "merge.yaml", tmp_path / "local")
    script = textwrap.dedent(f"""
        import os, ray, star_dist
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=128 * 1024**2,
                 log_to_driver=False)
        star_dist.merge({str(tiny_fp32 / 'merge.yaml')!r}, {str(tmp_path / 'gpu')!r}, runtime="ray",
                        quiet=True, max_shard_size="60kB")
        try:
            star_dist.merge({str(tiny_fp32 / 'merge.yaml')!r}, {str(tmp_path / 'cuda')!r}, runtime="ray",
                            quiet=True, device="cuda")
        except star_dist.StarDistError as exc:
            print("CUDA-ERROR", exc)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert folder_bytes(tmp_path / "gpu") == expected
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "gpu" / ".star_dist" / "shards").glob("*.json")]
    gpu_ids = {tuple(m["worker"]["gpu_ids"]) for m in manifests}
    assert gpu_ids <= {("0",), ("1",)} and len(gpu_ids) >= 1 and all(len(g) == 1 for g in gpu_ids)
    assert "CUDA-ERROR" in result.stdout and "no CUDA device" in result.stdout
    assert not (tmp_path / "cuda").exists()


def test_unreachable_cluster_is_a_clear_error_not_a_hang(tiny_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(
        "merge", str(tiny_fp32 / "merge.yaml"), str(out), "--address", "127.0.0.1:9", "--connect-timeout", "2",
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1:9 is not reachable" in lines[0], result.stderr
    assert snapshot(out) == {}


def test_embedded_cluster_from_the_cli(tiny_fp32: Path, tmp_path: Path) -> None:
    """No --address: the CLI starts its own loopback cluster, merges, and stops it."""
    expected = _local_reference(tiny_fp32 / "merge.yaml", tmp_path / "local")
    result = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(tmp_path / "out"), "--max-shard-size", "60kB")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merged into" in result.stdout
    assert "[worker " in result.stdout  # worker logs reach the driver, tagged with the worker id
    assert folder_bytes(tmp_path / "out") == expected
