"""The README's promises: its two commands exist and the demo really merges; every flag it
documents exists; CI runs the README's test command."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO, run_cli, run_cli_all

README = (REPO / "README.md").read_text()


def test_two_commands_are_in_the_readme_and_ci_runs_the_test_one() -> None:
    assert "bash scripts/demo.sh" in README and "bash scripts/test.sh" in README
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_documented_flags_exist() -> None:
    commands = ("merge", "plan", "verify", "report", "make-tiny")
    help_text = "".join(r.stdout for r in run_cli_all(*[(command, "--help") for command in commands], ("--help",)))
    documented = set(re.findall(r"`(--[a-z-]+)", README))
    assert {"--eta", "--address", "--workers", "--output-format"} <= documented
    missing = sorted(flag for flag in documented if flag not in help_text and flag != "--help")
    assert not missing, f"README documents flags no star-dist command has: {missing}"


@pytest.mark.ray
@pytest.mark.slow
def test_demo_command_merges_on_an_embedded_ray_cluster(tmp_path: Path) -> None:
    env = {**os.environ, "SKIP_SETUP": "1", "DEMO_WORK": str(tmp_path / "in"), "DEMO_OUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], capture_output=True, text=True,
                            timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "STAR kept rank per task matrix" in result.stdout
    assert "ray: " in result.stderr  # the embedded cluster ran the shards
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").exists() and (out / "README.md").exists()


def _readme_block(after: str, language: str) -> str:
    """The first ```language block after the line containing `after`."""
    rest = README[README.index(after):]
    match = re.search(rf"```{language}\n(.*?)```", rest, re.S)
    assert match, f"no {language} block after {after!r}"
    return match.group(1)


def test_the_readme_config_runs_as_written_with_its_hub_base(tmp_path: Path) -> None:
    """The README's example config, byte for byte: its base is a hub id (served by a loopback
    hub, tests/fake_hub.py), its models a local fine-tune and a local PEFT adapter."""
    import shutil

    from .fake_hub import FakeHub

    config = _readme_block("A config (keys as in mergekit", "yaml")
    hub_id = re.search(r"^base_model: (\S+)", config, re.M).group(1)
    demo, work = tmp_path / "demo", tmp_path / "work"
    made = run_cli("make-tiny", str(demo), "--lora", "1")
    assert made.returncode == 0, made.stderr
    work.mkdir()
    shutil.copytree(demo / "ft0", work / "math-ft")
    shutil.copytree(demo / "lora0", work / "code-lora")
    (work / "merge.yaml").write_text(config)
    with FakeHub({hub_id: demo / "base"}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
               "STAR_DIST_CACHE": str(tmp_path / "cache"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        result = run_cli("merge", "merge.yaml", "out/", "--runtime", "local", "-q", "--json", cwd=work, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = work / "out"
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    card = (out / "README.md").read_text()
    assert f"base_model: {hub_id}" in card  # the hub id, as the user wrote it
