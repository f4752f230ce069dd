"""What people publish: the model card, `star-dist report`, and `--push-to-hub` (hub mocked:
tests/hub_mock.py runs the real CLI with a recording HfApi)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import star_dist
from star_dist.planner import build_plan
from star_dist.shard import merge_shard
from star_dist.tiny_models import make_tiny_merge
from tests.conftest import REPO, run_cli

SECRET = "hf_starDistTestTokenNeverShown0123456789"


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_has_hub_metadata_and_the_config_as_written(tiny_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(out), "--runtime", "local", "--eta", "60", "-q")
    assert proc.returncode == 0, proc.stderr
    card = (out / "README.md").read_text()
    assert _front_matter(card) == {"base_model": "base", "base_model_relation": "merge",
                                   "library_name": "transformers", "tags": ["merge", "star_dist", "star"]}
    written = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    # merge.yaml's own relative paths, the flag applied: what the user gave, not the resolved paths
    assert written == {"merge_method": "star", "base_model": "base", "models": [{"model": "ft0"}, {"model": "ft1"},
                       {"model": "ft2"}], "parameters": {"eta": 60.0}}
    assert "pypi.org" not in card
    assert "## Merge report" in card and "star-dist report out" in card


def test_report_page_plots_and_card_link(tiny_fp32: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    star_dist.merge(tiny_fp32 / "merge.yaml", out, quiet=True, verify=False)
    proc = run_cli("report", str(out))
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(p.name for p in (out / "report").glob("*.png"))
    assert pngs == ["kept_rank.png", "nuclear_norm.png", "tensor_seconds.png"]
    assert all((out / "report" / p).read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    page = (out / "report" / "index.html").read_text()
    assert all(f'<img src="{p}"' in page for p in pngs) and "model.layers.1.mlp.up_proj.weight" in page
    card = (out / "README.md").read_text()
    assert "[report/index.html](report/index.html)" in card and "![kept_rank](report/kept_rank.png)" in card
    assert card.count("## Merge report") == 1 and card.rstrip().endswith("```")  # config section kept after it


def test_report_without_ranks_and_on_a_bad_folder(tiny_fp32: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "ties"
    star_dist.merge({**yaml.safe_load((tiny_fp32 / "merge.yaml").read_text()), "merge_method": "ties",
                     "parameters": {"density": 0.5}, "base_model": str(tiny_fp32 / "base"),
                     "models": [{"model": str(tiny_fp32 / f"ft{i}")} for i in range(3)]}, out, quiet=True)
    assert run_cli("report", str(out)).returncode == 0
    assert sorted(p.name for p in (out / "report").glob("*.png")) == ["tensor_seconds.png"]
    proc = run_cli("report", str(tmp_path / "nothing"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"star-dist: error: {tmp_path / 'nothing' / 'merge_report.json'}: not found; "
                                   "`star-dist report` needs a finished star-dist output folder")


def _push(tiny_fp32: Path, tmp_path: Path, *extra: str, env: dict[str, str] | None = None):
    record = tmp_path / "calls.json"
    out = tmp_path / "out"
    args = ["merge", str(tiny_fp32 / "merge.yaml"), str(out), "--runtime", "local", "--push-to-hub", "me/merged",
            *extra]
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "hub_mock.py"), str(record), *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**_env(), "HF_TOKEN": SECRET, **(env or {})})
    return proc, out, record


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(REPO)}


def _no_secret_anywhere(proc: subprocess.CompletedProcess[str], out: Path) -> None:
    assert SECRET not in proc.stdout + proc.stderr
    for path in out.rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_push_to_hub_uploads_the_output_not_the_bookkeeping(tiny_fp32: Path, tmp_path: Path) -> None:
    proc, out, record = _push(tiny_fp32, tmp_path, "--private")
    assert proc.returncode == 0, proc.stderr
    assert "pushed to https://huggingface.co/me/merged" in proc.stdout
    create, upload = json.loads(record.read_text())
    assert create == {"call": "create_repo", "repo_id": "me/merged", "repo_type": "model", "private": True,
                      "exist_ok": True}
    assert upload["call"] in ("upload_large_folder", "upload_folder") and upload["folder_path"] == str(out)
    assert upload["sent"] == ["README.md", "config.json", "generation_config.json", "merge_report.json",
                              "model.safetensors"]
    assert (out / ".star_dist" / "plan.json").exists()  # kept locally, for resume; never sent
    _no_secret_anywhere(proc, out)


def test_push_failure_is_one_line_with_the_token_masked(tiny_fp32: Path, tmp_path: Path) -> None:
    proc, out, _ = _push(tiny_fp32, tmp_path, env={"HUB_MOCK_FAIL": "1"})
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("star-dist: error: push to hub me/merged: 401 Client Error: Unauthorized; invalid token ***")
    assert "then rerun: the upload resumes" in line
    _no_secret_anywhere(proc, out)


def test_private_needs_a_repo(tiny_fp32: Path, tmp_path: Path) -> None:
    proc = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(tmp_path / "o"), "--private")
    assert proc.returncode == 2 and "--private applies to --push-to-hub REPO" in proc.stderr


def test_adapter_merge_advances_the_progress_per_module(tmp_path: Path) -> None:
    """In-process, the bar moves as each module's factors are merged, not only at the end."""
    make_tiny_merge(tmp_path, n_models=1, dtype="float32", shards=1, lora=2)
    config = star_dist.load_config(tmp_path / "merge_lora.yaml")
    plan = build_plan(star_dist.MergeConfig.from_dict({**config.to_dict(), "output_format": "adapter"}),
                      tmp_path / "out", star_dist.RunOptions(runtime="local"))
    (tmp_path / "out").mkdir()
    seen: list[tuple[str, int]] = []
    job = plan.shards[0]
    merge_shard(plan.run, job, on_tensor=lambda name, nbytes: seen.append((name, nbytes)))
    assert [name for name, _ in seen] == [t.name for t in job.tensors]
    assert sum(n for _, n in seen) == job.bytes_out and len(seen) == 4  # q_proj, v_proj of 2 layers
