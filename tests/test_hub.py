"""Hub ids resolve through huggingface_hub's cache (no network here): a pre-filled local
cache folder, laid out exactly as huggingface_hub lays it out, stands in for the hub."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .conftest import run_cli
from .reference import load_folder, star

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_model(cache: Path, repo_id: str, source: Path) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


def test_merge_hub_ids_from_a_local_cache(tiny_fp32: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    for name in ("base", "ft0", "ft1"):
        _cache_model(cache, f"tiny-org/{name}", tiny_fp32 / name)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    result = run_cli("merge", str(out), "--base-model", "tiny-org/base", "--model", "tiny-org/ft0",
                     "--model", "tiny-org/ft1", "--runtime", "local", "-q", env=env)
    assert result.returncode == 0, result.stderr
    merged = load_folder(out)
    base, ft0, ft1 = (load_folder(tiny_fp32 / n) for n in ("base", "ft0", "ft1"))
    for name in base:
        torch.testing.assert_close(merged[name], star(base[name], [ft0[name], ft1[name]]), rtol=1e-5, atol=1e-6)
    assert "base_model: tiny-org/base" in (out / "README.md").read_text()  # hub front matter


def test_uncached_hub_id_is_one_clear_error(tiny_fp32: Path, tmp_path: Path) -> None:
    env = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("merge", str(tmp_path / "out"), "--base-model", str(tiny_fp32 / "base"),
                     "--model", "nobody/not-cached", "--runtime", "local", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody/not-cached" in lines[0] and "hub" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
