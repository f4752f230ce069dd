"""Storage every node agrees on (issue 12 §2, §6) and `--runtime auto` (issue 13 §3).

The multi-node test is a real loopback Ray cluster whose head, worker node and driver each
run from their own working directory with their own HF_HOME (a node's processes inherit
the directory and environment its raylet started with), as on a real cluster. A path that
differs per node is made with /proc/self/cwd, which each process resolves to its own
working directory: the driver sees one folder, the worker node another.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import star_dist
from star_dist.config import RunOptions
from star_dist.runtime import choose
from star_dist.runtime.choose import choose_runtime
from star_dist.runtime.storage import StorageCheck, check_node_storage

from .conftest import folder_bytes, run_cli
from .test_hub_nodes import cache_repo


def test_a_node_missing_an_input_or_the_output_fails_naming_both(tmp_path: Path) -> None:
    present = tmp_path / "in.safetensors"
    present.write_bytes(b"x" * 10)
    out = tmp_path / "out"
    (out / ".star_dist").mkdir(parents=True)
    check_node_storage(StorageCheck(((str(present), 10),), str(out)), "node-1")  # all seen: no error
    assert list((out / ".star_dist").iterdir()) == []  # the probe is gone
    gone, elsewhere = tmp_path / "gone", tmp_path / "elsewhere"
    cases = [
        (StorageCheck(((str(gone), 10),), str(out)), f"node node-1: cannot see input {gone} (No such file"),
        (StorageCheck(((str(present), 11),), str(out)), f"input {present} has 10 bytes here but 11 where"),
        (StorageCheck((), str(elsewhere)), f"cannot write into the output folder {elsewhere} (No such file"),
    ]
    for check, expected in cases:
        with pytest.raises(star_dist.StarDistError) as info:
            check_node_storage(check, "node-1")
        assert expected in str(info.value) and "mount the shared file system at the same path" in str(info.value)


def test_auto_runs_small_merges_here_and_large_ones_on_ray(
    tiny_fp32: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = star_dist.plan(tiny_fp32 / "merge.yaml", max_shard_size="60kB")
    small = choose_runtime(plan, RunOptions())
    assert small.runtime == "local" and "less than Ray's ~10s start-up" in small.reason
    assert choose_runtime(star_dist.plan(tiny_fp32 / "merge.yaml"), RunOptions()).reason.startswith(
        "the plan has 1 shard")
    monkeypatch.setattr(choose, "estimate_seconds", lambda plan: 3600.0)  # as if the work took an hour
    monkeypatch.setattr(choose, "local_parallelism", lambda options: (4, "4 CPU group(s) of 1 thread(s)"))
    large = choose_runtime(plan, RunOptions())
    assert large.runtime == "ray" and large.address is None and "so on an embedded Ray cluster" in large.reason
    assert choose_runtime(plan, RunOptions(workers=1)).runtime == "local"
    assert choose_runtime(plan, RunOptions(runtime="local")).runtime == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    joined = choose_runtime(star_dist.plan(tiny_fp32 / "merge.yaml"), RunOptions())
    assert (joined.runtime, joined.address) == ("ray", "auto") and "RAY_ADDRESS=127.0.0.1:6379" in joined.reason


def test_plan_says_where_merge_would_run_and_why(tiny_fp32: Path) -> None:
    text = run_cli("plan", str(tiny_fp32 / "merge.yaml"), "--max-shard-size", "60kB")
    assert text.returncode == 0, text.stderr
    assert "runtime     local: about 0s of work: " in text.stdout
    as_json = run_cli("plan", str(tiny_fp32 / "merge.yaml"), "--json", "--address", "127.0.0.1:9")
    runtime = json.loads(as_json.stdout)["runtime"]
    assert runtime["runtime"] == "ray" and runtime["address"] == "127.0.0.1:9"
    assert runtime["reason"] == "--address 127.0.0.1:9 given: joining that cluster"


MULTI_NODE = """
import json, os, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster

work = Path(sys.argv[1])
def node_env(name):
    os.chdir(work / name)
    os.environ["HF_HOME"] = str(work / name / "hf")
node_env("head")
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # no worker runs on the head
node_env("node")
cluster.add_node(num_cpus=2)
node_env("driver")  # before star_dist imports huggingface_hub, which reads HF_HOME once
cluster.wait_for_nodes()
import star_dist
ray.init(address=cluster.address, log_to_driver=False)
opts = dict(runtime="ray", quiet=True, max_shard_size="60kB", start_timeout_s=120)
results = {}
r = star_dist.merge("models/merge.yaml", "out", **opts)  # relative to the driver's directory
results["bytes_read"] = r.bytes_read_per_worker
shard = sorted(Path("out").glob("model-*.safetensors"))[1]  # one bit flipped, size and mtime kept
st, data = shard.stat(), bytearray(shard.read_bytes())
data[-1] ^= 1
shard.write_bytes(bytes(data))
os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
(Path("out") / "model.safetensors.index.json").unlink()
results["verified"] = star_dist.merge("models/merge.yaml", "out", verify_resume=True, **opts).shards_resumed
hub_config = {"base_model": "tiny-org/base", "models": [{"model": "tiny-org/ft0"}, {"model": "tiny-org/ft1"}]}
star_dist.merge(hub_config, "hub_out", **opts)
try:
    star_dist.merge("models/merge.yaml", "/proc/self/cwd/per_node_out", **opts)
except star_dist.StarDistError as exc:
    results["unseen_output"] = str(exc)
results["driver_left"] = os.path.exists("per_node_out")
print("RESULTS" + json.dumps(results))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.ray
@pytest.mark.slow
def test_nodes_with_their_own_directories_and_hub_caches(tiny_fp32: Path, tmp_path: Path) -> None:
    """Head, worker node and driver in different directories with different HF_HOMEs:
    relative paths given to the driver work on the worker node; --verify-resume re-hashes
    there and repairs a flipped bit; hub inputs are read from the worker node's own cache;
    and a node that does not see the driver's output folder fails at once, naming itself."""
    for name in ("head", "node", "driver"):
        (tmp_path / name).mkdir()
    shutil.copytree(tiny_fp32, tmp_path / "driver" / "models")
    for name in ("driver", "node"):  # each pre-filled, offline (conftest sets HF_HUB_OFFLINE)
        for model in ("base", "ft0", "ft1"):
            cache_repo(tmp_path / name / "hf" / "hub", f"tiny-org/{model}", tiny_fp32 / model)
    expected = folder_bytes(star_dist.merge(tiny_fp32 / "merge.yaml", tmp_path / "ref", runtime="local", quiet=True,
                                            max_shard_size="60kB").out_dir)
    hub_expected = folder_bytes(star_dist.merge(
        {"base_model": str(tiny_fp32 / "base"), "models": [{"model": str(tiny_fp32 / m)} for m in ("ft0", "ft1")]},
        tmp_path / "hub_ref", runtime="local", quiet=True, max_shard_size="60kB").out_dir)
    ray_tmp = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        run = subprocess.run([sys.executable, "-c", textwrap.dedent(MULTI_NODE), str(tmp_path)], capture_output=True,
                             text=True, timeout=400, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    # The JSON is one line; Ray may print its own notices after it (an actor killed at shutdown).
    results = json.JSONDecoder().raw_decode(run.stdout.split("RESULTS", 1)[1].lstrip())[0]
    driver = tmp_path / "driver"
    assert folder_bytes(driver / "out") == expected
    assert results["verified"] == len(expected) - 1  # the flipped shard was redone, the rest kept
    assert sum(results["bytes_read"].values()) > 0 and all(k.startswith("worker ") for k in results["bytes_read"])
    assert folder_bytes(driver / "hub_out") == hub_expected
    manifests = [json.loads(p.read_text()) for p in (driver / "hub_out" / ".star_dist" / "shards").glob("*.json")]
    read = [path for m in manifests for path in m["worker"]["hub_files"].values()]
    assert read and all(path.startswith(str(tmp_path / "node" / "hf")) for path in read)  # the node's own cache
    message = results["unseen_output"]
    assert message.startswith("a worker: node ") and "Ray node " in message
    assert "cannot write into the output folder /proc/self/cwd/per_node_out (No such file or directory)" in message
    assert "mount the shared file system at the same path on every node" in message and "\n" not in message
    assert not results["driver_left"]  # the run removed the folder it had created


def test_merge_reports_where_it_ran_and_the_bytes_each_worker_read(tiny_fp32: Path, tmp_path: Path) -> None:
    result = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    plan = star_dist.plan(tiny_fp32 / "merge.yaml", tmp_path / "out")
    assert summary["runtime"] == "local" and summary["runtime_reason"].startswith("the plan has 1 shard")
    assert summary["bytes_read_per_worker"] == {"local": plan.bytes_read}
    text = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(tmp_path / "out2"))
    assert "runtime local (the plan has 1 shard: one worker at a time, in this process)" in text.stdout
    assert "read local: " in text.stdout
