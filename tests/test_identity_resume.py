"""Paths and identity (issue 12 §1) and what a resume trusts (§2): absolute paths, a
fingerprint that ignores how paths were spelled and where the merge was started, the device
each shard ran on, size+mtime trust with `--verify-resume` re-hashing, and the finalize
check of every shard against its manifest before the index."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import pytest

import star_dist
from star_dist.config import RunOptions
from star_dist.errors import ConfigError, OutputError
from star_dist.planner import RunSpec, ShardJob

from .conftest import folder_bytes, run_cli


def test_run_options_report_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        RunOptions(runtime="banana", workers=0, max_shard_size=-5, threads_per_worker=0, start_timeout_s=float("nan"),
                   device="tpu", quiet="yes")
    message = str(info.value)
    for part in ("runtime 'banana' is not one of auto, ray, local", "workers must be at least 1",
                 "max_shard_size must be a positive number of bytes, got -5", "threads_per_worker must be at least 1",
                 "start_timeout_s must be a positive number", "device 'tpu'", "quiet must be true or false"):
        assert part in message, part
    assert "\n" not in message
    with pytest.raises(ConfigError, match="but runtime is 'local'"):
        RunOptions(runtime="local", address="auto")
    with pytest.raises(ConfigError, match="unknown run option.*runtim"):
        star_dist.merge({}, "out", runtim="ray")
    assert RunOptions().runtime == "auto"


def test_run_wide_settings_live_once_in_the_run_spec(tiny_fp32: Path, tmp_path: Path) -> None:
    """Method, weights, output folder and fingerprint are the plan's one RunSpec; a shard job
    carries only its own file and tensors, so none of them travels once per shard."""
    plan = star_dist.plan(tiny_fp32 / "merge.yaml", tmp_path / "out", max_shard_size="60kB")
    assert len(plan.shards) > 2
    assert not {f.name for f in dataclasses.fields(RunSpec)} & {f.name for f in dataclasses.fields(ShardJob)}
    assert plan.run.fingerprint == plan.fingerprint and plan.run.out_dir == str(plan.out_dir)
    for job in plan.shards:
        assert plan.run.fingerprint.encode() not in pickle.dumps(job)


def test_paths_are_absolute_and_the_fingerprint_ignores_spelling(
    tiny_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same merge spelled from two directories (relative flags, then the config from
    elsewhere) plans the same fingerprint, with absolute paths in every shard job."""
    monkeypatch.chdir(tiny_fp32)
    here = star_dist.plan({"base_model": "base", "models": [{"model": "ft0"}, {"model": "./ft1/"}]}, "out")
    monkeypatch.chdir(tmp_path)
    cfg = {"base_model": str(tiny_fp32 / "base"),
           "models": [{"model": str(tiny_fp32 / "ft0")}, {"model": os.path.relpath(tiny_fp32 / "ft1")}]}
    there = star_dist.plan(cfg, tiny_fp32 / "out")
    assert here.fingerprint == there.fingerprint
    assert here.out_dir == tiny_fp32 / "out" and here.out_dir.is_absolute()
    assert Path(here.run.out_dir).is_absolute()
    for job in here.shards:
        files = [f for t in job.tensors for f in (t.base.file, *(m.file for m in t.models))]
        assert all(Path(f).is_absolute() for f in files)
    assert "device" not in here.identity["settings"]  # --device auto is a request, not an identity


def test_a_merge_started_from_another_directory_resumes(tiny_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--max-shard-size", "60kB", "--runtime", "local", "-q"]
    first = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(out), *args)
    assert first.returncode == 0, first.stderr
    expected = folder_bytes(out)
    (out / "model.safetensors.index.json").unlink()  # as a run killed before its index
    victim = sorted(out.glob("model-*.safetensors"))[0]
    victim.unlink()
    rel_config = os.path.relpath(tiny_fp32 / "merge.yaml", tmp_path)
    again = run_cli("merge", rel_config, "out", *args[:-1], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"({len(expected) - 1} resumed)" in again.stdout
    assert folder_bytes(out) == expected


def _finished(tiny_fp32: Path, out: Path) -> dict[str, bytes]:
    star_dist.merge(tiny_fp32 / "merge.yaml", out, runtime="local", quiet=True, max_shard_size="60kB")
    return folder_bytes(out)


def _flip_a_bit_keeping_size_and_mtime(shard: Path) -> None:
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_resume_trusts_size_and_mtime_and_verify_resume_rehashes(tiny_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    expected = _finished(tiny_fp32, out)
    (out / "model.safetensors.index.json").unlink()
    shard = sorted(out.glob("model-*.safetensors"))[1]
    _flip_a_bit_keeping_size_and_mtime(shard)
    trusted = star_dist.merge(tiny_fp32 / "merge.yaml", out, runtime="local", quiet=True, max_shard_size="60kB")
    assert trusted.shards_resumed == trusted.shards_total  # not re-read: size and mtime match
    assert folder_bytes(out)[shard.name] != expected[shard.name]
    result = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(out), "--max-shard-size", "60kB", "--runtime",
                     "local", "--verify-resume")
    assert result.returncode == 0, result.stderr
    assert f"--verify-resume: redoing 1 shard(s) whose bytes changed: {shard.name}" in result.stderr
    assert f"({len(expected) - 1} resumed)" in result.stdout
    assert folder_bytes(out) == expected


def test_a_touched_shard_is_redone_without_hashing(tiny_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    expected = _finished(tiny_fp32, out)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    os.utime(shard)  # mtime changed: no longer what the manifest recorded
    result = star_dist.merge(tiny_fp32 / "merge.yaml", out, runtime="local", quiet=True, max_shard_size="60kB")
    assert result.shards_resumed == result.shards_total - 1
    assert folder_bytes(out) == expected


def test_shards_computed_on_another_device_are_redone(tiny_fp32: Path, tmp_path: Path) -> None:
    """A manifest says its shard ran on a GPU (as a GPU run writes it); this CPU run redoes
    that shard instead of mixing it in, and records the device it used."""
    out = tmp_path / "out"
    expected = _finished(tiny_fp32, out)
    manifest_file = sorted((out / ".star_dist" / "shards").glob("*.json"))[0]
    manifest = json.loads(manifest_file.read_text())
    assert manifest["device"] == "cpu"
    manifest_file.write_text(json.dumps({**manifest, "device": "cuda"}))
    result = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(out), "--max-shard-size", "60kB",
                     "--runtime", "local", "--device", "auto")
    assert result.returncode == 0, result.stderr
    assert "redoing 1 shard(s) computed on another device than this run's (cpu)" in result.stderr
    assert json.loads(manifest_file.read_text())["device"] == "cpu"
    assert folder_bytes(out) == expected


def test_finalize_refuses_a_shard_the_driver_sees_with_another_size(tiny_fp32: Path, tmp_path: Path) -> None:
    from star_dist.output import claim_output_dir
    from star_dist.planner import build_plan
    from star_dist.run import finalize
    from star_dist.shard import merge_shard

    plan = build_plan(star_dist.load_config(tiny_fp32 / "merge.yaml"), tmp_path / "out",
                      RunOptions(max_shard_size=60_000))
    claim_output_dir(plan.out_dir, plan.identity, overwrite=False)
    manifests = [merge_shard(plan.run, job) for job in plan.shards]
    lost = plan.out_dir / manifests[1]["file"]
    lost.unlink()  # as if its worker wrote to a disk the driver does not see
    with pytest.raises(OutputError) as info:
        finalize(plan, manifests)
    assert str(info.value).startswith(f"{lost}: its worker wrote {manifests[1]['size']} bytes, but it is missing")
    assert "mount the shared file system at the same path on every node" in str(info.value)
    assert not (plan.out_dir / "model.safetensors.index.json").exists()
