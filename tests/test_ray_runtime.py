"""The Ray runtime on a real local loopback cluster: same bytes with any number of workers,
a worker that dies mid-shard, fake GPU slots, and an unreachable cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import star_dist
from star_dist.config import RunOptions
from star_dist.errors import ClusterError, MergeError
from star_dist.runtime import ray as ray_runtime
from star_dist.runtime.ray import actor_device, pool_shape

from .conftest import BIN, REPO, folder_bytes, run_cli, snapshot
from .faults import crashing_worker

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
    monkeypatch.setattr(ray_runtime, "ShardWorker", crashing_worker(once_marker=marker))
    out = tmp_path / "ray"
    star_dist.merge(tiny_fp32 / "merge.yaml", out, runtime="ray", workers=2, quiet=True, max_shard_size="60kB")
    assert marker.exists(), "the fault was never injected"
    crashed_pid = int(marker.read_text())
    assert folder_bytes(out) == expected
    pids = {json.loads(p.read_text())["worker"]["pid"] for p in (out / ".star_dist" / "shards").glob("*.json")}
    assert crashed_pid not in pids


def test_a_shard_that_always_kills_its_worker_fails_cleanly_and_the_rerun_resumes(
    tiny_fp32: Path, tmp_path: Path
) -> None:
    """One line naming the shard, exit 2, the finished shards kept; then the same command
    (without the fault) resumes them and gives the in-process bytes."""
    config = tiny_fp32 / "merge.yaml"
    expected = _local_reference(config, tmp_path / "local")
    jobs = sorted(star_dist.plan(config, tmp_path / "out", max_shard_size="60kB").shards,
                  key=lambda j: (-j.cost, j.index))
    doomed = jobs[-1].file_name  # run last by the single worker, so every other shard is done first
    args = ["merge", str(config), str(tmp_path / "out"), "--max-shard-size", "60kB", "--workers", "1",
            "--runtime", "ray"]
    result = subprocess.run([sys.executable, "-m", "tests.faults", "--crash-on-shard", doomed, "--", *args, "--quiet"],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and doomed in lines[0] and "died" in lines[0], result.stderr
    manifests = tmp_path / "out" / ".star_dist" / "shards"
    kept = {p.name.removesuffix(".json") for p in manifests.glob("*.json")}
    assert kept == {j.file_name for j in jobs[:-1]}
    assert not (tmp_path / "out" / doomed).exists()
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    rerun = run_cli(*args, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"({len(kept)} resumed)" in rerun.stdout
    assert folder_bytes(tmp_path / "out") == expected


def test_pool_shape_uses_one_whole_gpu_per_actor() -> None:
    gpu = pool_shape([{"CPU": 16, "GPU": 4}], RunOptions(device="auto"), n_jobs=10)
    assert (gpu.workers, gpu.num_gpus, gpu.num_cpus, gpu.runnable) == (4, 1.0, 1.0, 4)
    more = pool_shape([{"CPU": 16, "GPU": 2}], RunOptions(workers=3), n_jobs=10)
    assert (more.workers, more.num_gpus, more.runnable) == (3, 1.0, 2)  # never a fractional GPU
    lean = pool_shape([{"CPU": 1, "GPU": 2}, {"CPU": 8, "GPU": 2}], RunOptions(), n_jobs=10)
    assert (lean.workers, lean.num_cpus) == (4, 0.5)  # the leanest GPU node must hold its share
    assert pool_shape([{"CPU": 16, "GPU": 4}], RunOptions(device="cpu", threads_per_worker=4), 10).workers == 4
    assert pool_shape([{"CPU": 16, "GPU": 4}], RunOptions(device="cpu"), n_jobs=3).workers == 3
    later = pool_shape([{"CPU": 2}], RunOptions(device="cuda", workers=8), n_jobs=20)
    assert (later.workers, later.num_gpus, later.runnable) == (8, 1.0, 0)
    with pytest.raises(ClusterError, match="no GPUs"):
        pool_shape([{"CPU": 2}], RunOptions(device="cuda"), n_jobs=3)
    with pytest.raises(ClusterError, match="no GPU that Ray can see"):  # embedded: no GPU will ever come
        pool_shape([{"CPU": 2}], RunOptions(device="cuda", workers=2), n_jobs=3, embedded=True)


def test_pool_shape_sizes_cpu_workers_on_each_node() -> None:
    squeezed = pool_shape([{"CPU": 2}], RunOptions(workers=4), n_jobs=10)
    assert (squeezed.workers, squeezed.num_cpus, squeezed.runnable) == (4, 0.5, 4)
    # 4 CPUs in all, but no node has 4: ask for what a node has, not for the sum.
    split = pool_shape([{"CPU": 2}, {"CPU": 2}], RunOptions(threads_per_worker=4), n_jobs=10)
    assert (split.workers, split.num_cpus, split.runnable) == (2, 2.0, 2)
    uneven = pool_shape([{"CPU": 1}, {"CPU": 7}], RunOptions(workers=8), n_jobs=10)
    assert (uneven.num_cpus, uneven.runnable) == (1.0, 8)
    odd = pool_shape([{"CPU": 2}, {"CPU": 2}], RunOptions(workers=3), n_jobs=10)
    assert odd.runnable == 3 and odd.num_cpus == 1.0
    tenths = pool_shape([{"CPU": 0.3}], RunOptions(workers=3), n_jobs=10)  # fractional node CPUs
    assert (tenths.num_cpus, tenths.runnable) == (0.1, 3)
    head_only = pool_shape([{"CPU": 0}], RunOptions(), n_jobs=5)  # a 0-CPU head: no CPU invented
    assert (head_only.workers, head_only.num_cpus, head_only.runnable) == (1, 1.0, 0)


def test_an_actor_computes_on_a_gpu_only_when_ray_gave_it_one() -> None:
    assert actor_device("auto", [], cuda_available=True) == "cpu"  # a CPU actor on a GPU node
    assert actor_device("auto", ["0"], cuda_available=True) == "cuda"
    assert actor_device("auto", ["0"], cuda_available=False) == "cpu"  # fake GPU slots
    assert actor_device("cpu", ["0"], cuda_available=True) == "cpu"
    with pytest.raises(MergeError, match="no CUDA device"):
        actor_device("cuda", [], cuda_available=True)


def test_workers_that_can_never_start_fail_within_the_start_timeout(
    ray_cluster, tiny_fp32: Path, tmp_path: Path
) -> None:
    """GPU workers asked of a CPU-only (joined) cluster: a clear error, not a silent hang."""
    out = tmp_path / "out"
    start = time.monotonic()
    with pytest.raises(ClusterError, match=r"no Ray worker started within \d+s \(each asks for 1 CPU and 1 GPU"):
        star_dist.merge(tiny_fp32 / "merge.yaml", out, runtime="ray", device="cuda", workers=2, quiet=True,
                        start_timeout_s=3)
    assert time.monotonic() - start < 60
    assert not (out / "model.safetensors.index.json").exists()


def test_embedded_cluster_without_gpus_refuses_cuda_at_once(tiny_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(out), "--device", "cuda", "--workers", "2",
                     "--runtime", "ray", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no GPU that Ray can see" in lines[0], result.stderr
    assert not out.exists() or snapshot(out) == {}


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
        # More workers than GPUs: the third waits for a GPU that never frees, and must not
        # hold a shard hostage while it waits.
        star_dist.merge({str(tiny_fp32 / 'merge.yaml')!r}, {str(tmp_path / 'gpu3')!r}, runtime="ray",
                        quiet=True, max_shard_size="60kB", workers=3)
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
    assert {m["worker"]["device"] for m in manifests} == {"cpu"}  # 'auto' on slots with no CUDA behind them
    assert folder_bytes(tmp_path / "gpu3") == expected
    assert "CUDA-ERROR" in result.stdout and "no CUDA device" in result.stdout
    assert not (tmp_path / "cuda").exists()


def test_multi_node_cluster_with_a_cpu_less_head(tiny_fp32: Path, tmp_path: Path) -> None:
    """A real 3-node loopback cluster: a 0-CPU head and two 1-CPU nodes, 2 threads per
    worker. No node holds 2 CPUs, so each actor must ask for what one node has (asking for
    2 would never be placed); both nodes work, and the bytes are the in-process ones."""
    expected = _local_reference(tiny_fp32 / "merge.yaml", tmp_path / "local", threads_per_worker=2)
    # Short (Ray's socket paths have a length limit), and keeps Ray's record of this
    # cluster out of /tmp/ray, where `--address auto` would look.
    ray_tmp = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    script = textwrap.dedent(f"""
        import json, ray, star_dist
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 0}})
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        star_dist.merge({str(tiny_fp32 / 'merge.yaml')!r}, {str(tmp_path / 'ray')!r}, runtime="ray", quiet=True,
                        threads_per_worker=2, max_shard_size="60kB", start_timeout_s=90)
        ray.shutdown()
        cluster.shutdown()
    """)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert folder_bytes(tmp_path / "ray") == expected
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "ray" / ".star_dist" / "shards").glob("*.json")]
    assert len({m["worker"]["worker"] for m in manifests}) == 2


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
    """--runtime ray, no --address: the CLI starts its own loopback cluster, merges, and stops it."""
    expected = _local_reference(tiny_fp32 / "merge.yaml", tmp_path / "local")
    result = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(tmp_path / "out"), "--max-shard-size", "60kB",
                     "--runtime", "ray")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merged into" in result.stdout
    # Worker logs reach the driver, tagged with the worker id, on stderr: stdout stays the result's.
    assert "[worker " in result.stderr and "[worker " not in result.stdout
    assert folder_bytes(tmp_path / "out") == expected
