"""Shared fixtures: tiny real checkpoints on disk, the CLI in a subprocess, one Ray cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from star_dist.tiny_models import make_tiny_merge

# Every Ray process stays on loopback (DESIGN §5); no auth prompt; never join a stray cluster.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def architecture_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """star_dist's architecture cache (arch_cache.py) under the session's temp folder, not the
    user's home; shared by every test and CLI subprocess, as a user's cache is by their runs."""
    folder = tmp_path_factory.mktemp("star_dist_cache")
    previous = os.environ.get("STAR_DIST_CACHE")
    os.environ["STAR_DIST_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("STAR_DIST_CACHE", None)
    else:
        os.environ["STAR_DIST_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base + 3 fine-tunes, bfloat16, each sharded over 2 files, and merge.yaml (STAR)."""
    folder = tmp_path_factory.mktemp("tiny_bf16")
    make_tiny_merge(folder, n_models=3, dtype="bfloat16", shards=2)
    return folder


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base + 3 fine-tunes, float32, sharded over 3 files."""
    folder = tmp_path_factory.mktemp("tiny_fp32")
    make_tiny_merge(folder, n_models=3, dtype="float32", shards=3, seed=7)
    return folder


@pytest.fixture
def tiny_copy(tiny_fp32: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the fp32 models (for tests that corrupt inputs)."""
    dest = tmp_path / "models"
    shutil.copytree(tiny_fp32, dest)
    return dest


@pytest.fixture(scope="session")
def medium_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big enough that one worker takes several seconds over many shards (for kills and signals)."""
    from star_dist.tiny_models import TinyShape

    folder = tmp_path_factory.mktemp("medium")
    shape = TinyShape(hidden=384, intermediate=1024, layers=4, heads=6, kv_heads=2, vocab=1024)
    make_tiny_merge(folder, n_models=3, dtype="float32", shape=shape, shards=2)
    return folder


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real `star-dist` command in a subprocess (in `cwd`, default this one)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env.get('PATH', '')}"
    return subprocess.run(
        [str(BIN / "star-dist"), *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd
    )


def run_cli_all(*commands: tuple[str, ...], timeout: float = 300) -> list[subprocess.CompletedProcess[str]]:
    """Several independent `star-dist` commands at once (each its own real subprocess, as
    `run_cli` runs it), results in the order given: they wait on one another's start-up
    (~2 s each, mostly importing torch) no longer."""
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(lambda args: run_cli(*args, timeout=timeout), commands))


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> dict[str, bytes]:
    """The merged weight files of a folder, for byte-identity checks."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder, to prove a failed command left it untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local loopback Ray cluster for the whole session (2 CPUs, no dashboard)."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        log_to_driver=False,
        logging_level="ERROR",
    )
    yield
    ray.shutdown()
