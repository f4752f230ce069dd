"""Hub inputs per node (issue 12 §3): pinned once in the driver, each node fetching into its
own cache only the files its shards read. No network here: a cache laid out exactly as
huggingface_hub lays it out (blobs named by hash, snapshot links) stands in for the driver's,
and a mocked `hf_hub_download` serves two simulated nodes with separate caches."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest

import star_dist
from star_dist import hub
from star_dist.config import RunOptions
from star_dist.output import claim_output_dir
from star_dist.planner import build_plan
from star_dist.run import finalize
from star_dist.shard import merge_shard

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
MODELS = ("base", "ft0", "ft1")


def cache_repo(cache: Path, repo_id: str, source: Path, commit: str = COMMIT) -> Path:
    """Put `source`'s files into a hub cache as huggingface_hub does: blobs/<sha256> and
    snapshots/<commit>/<file> links to them, refs/main naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def driver_cache(tiny_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The driver's hub cache holding tiny-org/{base,ft0,ft1}, offline (as conftest sets)."""
    cache = tmp_path / "driver_cache"
    for name in MODELS:
        cache_repo(cache, f"tiny-org/{name}", tiny_fp32 / name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


HUB_CONFIG = {"merge_method": "star", "base_model": "tiny-org/base",
              "models": [{"model": "tiny-org/ft0"}, {"model": "tiny-org/ft1"}]}


def test_hub_ids_are_pinned_and_identified_by_content(driver_cache: Path, tmp_path: Path) -> None:
    """The plan names hub files by repo@commit/file and their blob hash, not by cache path:
    another cache holding the same commit plans the same fingerprint."""
    plan = star_dist.plan(HUB_CONFIG, tmp_path / "out", max_shard_size="60kB")
    uris = [key for key in plan.identity["files"] if key.startswith("hf://")]
    assert len(uris) == len(plan.identity["files"]) == 9  # 3 repos x 3 shard files
    assert all(f"@{COMMIT}/" in uri for uri in uris)
    assert all(f.commit == COMMIT for job in plan.shards for f in job.hub_files)
    assert not plan.local_files  # nothing a worker must see by path
    other = tmp_path / "other_cache"
    shutil.copytree(driver_cache, other, symlinks=True)
    huggingface_hub.constants.HF_HUB_CACHE = str(other)  # restored by the fixture's monkeypatch
    assert star_dist.plan(HUB_CONFIG, tmp_path / "out", max_shard_size="60kB").fingerprint == plan.fingerprint


def test_each_node_fetches_only_the_files_its_shards_read(
    driver_cache: Path, tiny_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two simulated nodes with empty caches of their own, a mocked hub that serves the
    pinned commit: each node downloads exactly the files of its own shards (not all of
    them), the output is byte-identical to merging the local folders, and the shards read
    each node's own copies."""
    downloads: list[tuple[str, str, str]] = []

    def fake_download(repo_id: str, filename: str, *, revision: str, cache_dir: str | None = None) -> str:
        assert revision == COMMIT  # the commit the driver pinned, never a moving branch
        downloads.append((str(cache_dir), repo_id, filename))
        target = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision / filename
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tiny_fp32 / repo_id.split("/")[1] / filename, target)
        return str(target)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    plan = build_plan(star_dist.load_config(HUB_CONFIG), tmp_path / "out", RunOptions(max_shard_size=60_000))
    claim_output_dir(plan.out_dir, plan.identity, overwrite=False)
    nodes = {"a": tmp_path / "node_a", "b": tmp_path / "node_b"}
    manifests, wanted = [], {"a": set(), "b": set()}
    for i, job in enumerate(plan.shards):
        node = "a" if i < len(plan.shards) // 2 else "b"  # each node takes a run of neighbouring shards
        local_job, fetched = hub.localize(job, cache_dir=nodes[node])
        assert all(path.startswith(str(nodes[node])) for path in fetched.values())
        manifests.append(merge_shard(plan.run, local_job))
        wanted[node] |= {(f.repo_id, f.filename) for f in job.hub_files}
    finalize(plan, manifests)
    for node, cache in nodes.items():
        got = {(repo, name) for where, repo, name in downloads if where == str(cache)}
        assert got == wanted[node], node
    all_files = {(f"tiny-org/{m}", p.name) for m in MODELS for p in (tiny_fp32 / m).glob("*.safetensors")}
    assert wanted["a"] < all_files and wanted["b"] < all_files  # neither node fetched everything
    reference = star_dist.merge({**HUB_CONFIG, "base_model": str(tiny_fp32 / "base"),
                                 "models": [{"model": str(tiny_fp32 / m)} for m in ("ft0", "ft1")]},
                                tmp_path / "ref", runtime="local", quiet=True, max_shard_size="60kB")
    assert _weights(plan.out_dir) == _weights(reference.out_dir)


def test_shards_are_grouped_by_input_file(tiny_fp32: Path) -> None:
    """Each output shard reads as few of the base's files as the limit allows: cutting the
    name-ordered tensors at file boundaries, no shard spans more than two input files."""
    plan = star_dist.plan(tiny_fp32 / "merge.yaml", max_shard_size="60kB")
    spans = [len({t.base.file for t in job.tensors}) for job in plan.shards]
    assert max(spans) <= 2 and sum(spans) <= len(plan.shards) + 3 - 1


def test_a_node_that_cannot_fetch_says_so(driver_cache: Path, tmp_path: Path) -> None:
    """Offline, with a cache that lacks the file: one line naming the pinned file and the fix."""
    plan = star_dist.plan(HUB_CONFIG, tmp_path / "out", max_shard_size="60kB")
    with pytest.raises(star_dist.InputError) as info:
        hub.localize(plan.shards[0], cache_dir=tmp_path / "empty_node_cache")
    message = str(info.value)
    assert message.startswith("hf://tiny-org/") and f"@{COMMIT}/" in message
    assert "pre-fill the node's cache (HF_HOME) or let it reach the hub" in message and "\n" not in message


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}
