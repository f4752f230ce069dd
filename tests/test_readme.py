"""The README's promises: its two commands exist and the demo really merges; every flag it
documents exists; CI runs the README's test command."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO, run_cli_all

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
